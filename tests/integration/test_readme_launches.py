"""Every launch the README and the docs show works as written.

The commands come from README.md and docs/*.md themselves (tests/readme_commands.py): each
`accelerate launch --config_file accelerate_configs/...` line, each one-GPU line (`accelerate
launch --num_processes 1 --mixed_precision bf16 ...`) and each `sbatch` line of their code
blocks, and the README's CPU note ("**Without a GPU**"), which is the only change made for this
GPU-less machine (that the docs show them: tests/unit/test_readme_commands.py). `...` is the
docs' placeholder for recipe flags; here it becomes the flags of a tiny, few-step run.

* Each `accelerate launch` line as written -- no CPU note: 8 processes (one on the one-GPU and
  CPU lines), bf16 -- goes through Accelerate's own launcher code up to the worker's DeepSpeed
  setup, where a precision written next to a DeepSpeed JSON is refused. That is what a GPU node
  runs first.
* Each `accelerate launch` line runs for real with the CPU note in test_distributed.py (its
  configs and its two-node launch are read from the README) and test_fsdp.py (FSDP2); the CPU
  line (as written) and the one-GPU lines ("your data on one GPU": its data paths pointed at two
  small text files, the model at the tiny BERT) run here.
* Each `sbatch` line runs for real here, on a real Slurm cluster of two nodes on this machine
  (the ``slurm_cluster`` fixture, tests/slurm_cluster.py): the script, its flags and
  ACCELERATE_CONFIG as written, plus the CPU note's sbatch options and MIXED_PRECISION=no.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from helpers import (
    ROOT,
    SLURM_CLUSTER,
    assert_logged_once,
    free_port,
    launch,
    run_recipe,
    slurm_attempts,
    slurm_env,
    train_losses,
)
from readme_commands import (
    RECIPE_PATH,
    accelerate_args,
    accelerate_launch,
    launches_of,
    sbatch_command,
    single_gpu_launches,
)

from mlmkit.data.corpus import embedded_corpus
from mlmkit.train import tracking as M
from mlmkit.train.tracking import read_metrics

# Runs, in one fresh interpreter, Accelerate's `accelerate launch` code for each command line
# (argument parsing, config-file merging, the launcher's environment for the workers) and then
# what each worker's Accelerator does with that environment for DeepSpeed (DeepSpeedPlugin,
# set_mixed_precision) -- everything but starting processes.
CHECK = textwrap.dedent("""
    import json, sys
    import accelerate.commands.launch as launch
    from accelerate.utils import DeepSpeedPlugin, patch_environment
    from accelerate.utils.launch import (prepare_deepspeed_cmd_env, prepare_multi_gpu_env,
                                         prepare_simple_launcher_cmd_env)

    def check(argv):
        seen = {}
        launch.deepspeed_launcher = lambda a: seen.update(env=prepare_deepspeed_cmd_env(a)[1])
        launch.multi_gpu_launcher = lambda a: seen.update(env=prepare_multi_gpu_env(a))
        launch.simple_launcher = lambda a: seen.update(env=prepare_simple_launcher_cmd_env(a)[1])
        try:
            launch.launch_command(launch.launch_command_parser().parse_args(argv))
            env = seen["env"]
            result = {"ok": True, "mixed_precision": env.get("ACCELERATE_MIXED_PRECISION"),
                      "deepspeed": env.get("ACCELERATE_USE_DEEPSPEED") == "true"}
            if result["deepspeed"]:
                with patch_environment(**env):
                    plugin = DeepSpeedPlugin()
                    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
                result["zero_stage"] = plugin.deepspeed_config["zero_optimization"]["stage"]
                result["bf16"] = plugin.deepspeed_config["bf16"]["enabled"]
            return result
        except BaseException as err:  # argparse exits with SystemExit
            return {"ok": False, "error": f"{type(err).__name__}: {err}"}

    print(json.dumps([check(argv) for argv in json.loads(sys.argv[1])]))
""")


def launch_checks(argvs: list[list[str]]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(argvs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_accelerate_line_as_written_passes_accelerates_launch_checks():
    launches = launches_of("accelerate") + single_gpu_launches()
    # --main_process_port: a free one (other tests on this machine may hold 29500 right now)
    argvs = [[*accelerate_args(launch, cpu=False, replace={
        "--main_process_port": free_port()} if "--main_process_port" in launch.argv else None),
        RECIPE_PATH] for launch in launches]
    for launch, result in zip(launches, launch_checks(argvs)):
        assert result["ok"], f"{launch.text}\n{result.get('error')}"
        # from the config file, or the one-GPU line's flag; the CPU config runs fp32
        want = "no" if launch.config == "cpu" else "bf16"
        assert result["mixed_precision"] == want, launch.text
        if result["deepspeed"]:
            assert result["bf16"] is True and result["zero_stage"] in (2, 3), launch.text


def test_the_launch_check_refuses_precision_next_to_a_deepspeed_json(tmp_path):
    """Not vacuous: the previous ZeRO configs (a DeepSpeed JSON plus the config file's
    mixed_precision) fail it as they failed on GPU nodes."""
    (tmp_path / "zero3.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3}}))
    (tmp_path / "zero3.yaml").write_text(textwrap.dedent(f"""\
        compute_environment: LOCAL_MACHINE
        distributed_type: DEEPSPEED
        deepspeed_config:
          deepspeed_config_file: {tmp_path / "zero3.json"}
        num_processes: 8
        num_machines: 1
        mixed_precision: bf16
        """))
    (result,) = launch_checks([["--config_file", str(tmp_path / "zero3.yaml"), RECIPE_PATH]])
    assert not result["ok"] and "mixed_precision" in result["error"]
    assert "will be ignored" in result["error"]


def test_the_cpu_line_as_written(tmp_path, tiny_args):
    """The CPU line needs no note: it runs one process as written."""
    out = tmp_path / "cpu"
    launch([*tiny_args, "--max_train_steps", "3", "--max_train_samples", "100",
            "--output_dir", str(out)], accelerate_args=accelerate_args(accelerate_launch("cpu")))
    assert json.loads((out / "summary.json").read_text())["num_processes"] == 1


@pytest.mark.parametrize("line", single_gpu_launches(), ids=lambda line: (
    "your_data" if "--train_file" in line.argv else "dots"))
def test_the_one_gpu_lines_with_the_cpu_note(line, tmp_path, tiny_args, tiny_bert_weights):
    """The one-GPU lines with the CPU note's `--mixed_precision no`: their placeholder data paths
    (data/train.txt, data/valid.txt) become two small text files, and the flags of a tiny,
    few-step run follow theirs (later flags win): the tiny BERT's weights for the hub model, a
    token budget and length it fits, 3 steps with a checkpoint and an eval at the last."""
    texts = embedded_corpus()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("\n".join(texts[:240]) + "\n")
    (tmp_path / "data" / "valid.txt").write_text("\n".join(texts[240:300]) + "\n")
    paths = {f"data/{name}": str(tmp_path / "data" / name) for name in ("train.txt", "valid.txt")}
    args = [paths.get(arg, arg) for arg in line.recipe_args]
    assert set(paths.values()) <= set(args) or "--train_file" not in line.argv, args
    i = tiny_args.index("--config_name")
    tiny = [*tiny_args[:i], "--model_name_or_path", tiny_bert_weights, *tiny_args[i + 2:]]
    out = tmp_path / "run"
    proc = launch([*args, *tiny, "--max_seq_length", "128", "--per_device_train_tokens", "512",
                   "--max_train_steps", "3", "--eval_steps", "3", "--checkpointing_steps", "3",
                   "--output_dir", str(out)], accelerate_args=accelerate_args(line))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 1 and summary[M.STEP] == 3, proc.stdout[-3000:]
    assert (out / "checkpoints" / "checkpoint-3").is_dir()
    assert (out / "model" / "config.json").is_file()


SBATCH_STEPS = 4


@pytest.fixture(scope="module")
def sbatch_args(tiny_args, tiny_bert_weights) -> list[str]:
    """4 steps (fp32, no dropout), each logged, fine-tuning the tiny BERT's saved weights."""
    i = tiny_args.index("--config_name")
    return [*tiny_args[:i], "--model_name_or_path", tiny_bert_weights, *tiny_args[i + 2:],
            "--max_train_steps", str(SBATCH_STEPS), "--logging_steps", "1",
            "--learning_rate", "3e-3", "--max_train_samples", "200"]


@pytest.fixture(scope="module")
def readme_jobs(slurm_cluster, tmp_path_factory, sbatch_args) -> dict:
    """Every README sbatch line, submitted at once to the test cluster as a CPU user submits it
    (the README's CPU note; recipe flags for `...`): each job 2 nodes x 1 process x 4 examples x
    2 accumulation steps. Two jobs share the nodes at a time (1 of each node's 2 CPUs each; the
    third waits in the queue): their rendezvous ports must not collide. -> {config name: (job id, output_dir)}"""
    jobs = {}
    for launch in launches_of("sbatch"):
        argv, env = sbatch_command(launch)
        out = tmp_path_factory.mktemp(f"sbatch_{launch.config}") / "out"
        job = slurm_cluster.sbatch(
            [*argv, *sbatch_args, "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "2", "--output_dir", str(out)],
            slurm_env(slurm_cluster, **env))
        jobs[launch.config] = (job, out)
    return jobs


@SLURM_CLUSTER
@pytest.mark.parametrize("launch", launches_of("sbatch"), ids=lambda launch: launch.config)
def test_readme_sbatch_line_trains_on_two_slurm_nodes_like_one_process(
        launch, readme_jobs, slurm_cluster, tmp_path, sbatch_args):
    """The README's sbatch line on a real Slurm cluster of 2 nodes (DDP; ZeRO-2 and ZeRO-3 through
    ACCELERATE_CONFIG) gives the per-step losses and final eval of one process taking the whole
    global batch of 16 (fp32, no dropout), within the suite's 1e-4; each recipe line is in the
    job's output once, from the main process, not once per node."""
    job, out = readme_jobs[launch.config]
    ref = tmp_path / "one_process"  # meanwhile, in this process: the same flags, batch 16
    reference = run_recipe([*launch.recipe_args, *sbatch_args, "--per_device_train_batch_size",
                            "16", "--output_dir", ref], threads=1).result
    record = slurm_cluster.wait(job)
    log = slurm_cluster.output(job)
    assert record["JobState"] == "COMPLETED", log[-6000:]
    assert record["StdOut"] == str(ROOT / f"slurm-mlmkit-{job}.out")  # the name README gives
    assert record["Restarts"] == "0" and record["NodeList"] == "node[1-2]"
    (attempt,) = slurm_attempts(log)
    assert "2 nodes x 1 processes = 2 processes" in attempt
    # the head node by its address (NodeAddr): the node names do not resolve on this machine
    assert "head node node1 at 127.0.0.1:" in attempt
    assert_logged_once(attempt)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary[M.STEP] == SBATCH_STEPS
    assert [r[M.STEP] for r in read_metrics(out) if M.TRAIN_LOSS in r] == [1, 2, 3, 4]
    losses, want = train_losses(out), train_losses(ref)
    assert abs(want[-1] - want[0]) > 1e-3  # training moved: the comparison has teeth
    for a, b in zip(want, losses, strict=True):
        assert abs(a - b) / abs(a) <= 1e-4, (launch.config, want, losses)
    assert summary[M.EVAL_LOSS] == pytest.approx(reference[M.EVAL_LOSS], rel=1e-4)
    assert (out / "model" / "config.json").is_file()
