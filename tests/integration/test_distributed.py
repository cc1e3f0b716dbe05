"""The same recipe on 2-process DDP, ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload and a simulated
2-node launch, all on CPU with gloo (FSDP2: test_fsdp.py). Launch settings come only from
accelerate_configs/, and every launch is the README's own `accelerate launch` line for that
config (tests/readme_commands.py) with only the README's CPU note applied (`--num_processes 2
--mixed_precision no`): no flag the README does not tell a CPU user to add.

Each engine is launched once: 2 processes x 4 examples x 2 accumulation steps, compared step by
step with one process taking the whole global batch of 16 (in this process), and its exported
model/ re-evaluated. The runs start from the same saved weights: a model built from a config is
initialised differently where ZeRO-3 builds it already sharded (zero3_init_flag)."""

from __future__ import annotations

import json

import pytest
from helpers import (
    exported_eval_loss,
    finish,
    free_port,
    kill_tree,
    launch,
    run_recipe,
    start,
    tiny_model,
    train_losses,
)
from readme_commands import accelerate_args, accelerate_launch, launches_of

from mlmkit.train import tracking as M
from mlmkit.train.tracking import read_metrics

# The README's multi-GPU single-node launch lines but FSDP2's (test_fsdp.py): ddp, zero2,
# zero3, ... (the CPU line, one process as written: test_readme_launches.py)
ENGINES = [launch.config for launch in launches_of("accelerate")
           if "--num_machines" not in launch.argv and launch.config not in ("fsdp2", "cpu")]
STEPS = 4


def accel(config: str) -> list[str]:
    """The README's `accelerate launch` options for this config, plus its CPU note."""
    return accelerate_args(accelerate_launch(config))


@pytest.fixture(scope="module")
def args(tmp_path_factory, tiny_args) -> list[str]:
    """4 steps (fp32, no dropout), each logged, fine-tuning the tiny BERT's saved weights; a
    checkpoint at step 2 averaged with the final weights (model_avg/: the engine's checkpoint
    consolidated)."""
    weights = tmp_path_factory.mktemp("tiny_bert_weights")
    tiny_model("bert").save_pretrained(weights)
    i = tiny_args.index("--config_name")
    return [*tiny_args[:i], "--model_name_or_path", str(weights), *tiny_args[i + 2:],
            "--max_train_steps", str(STEPS), "--logging_steps", "1", "--learning_rate", "3e-3",
            "--max_train_samples", "200", "--checkpointing_steps", "2",
            "--average_checkpoints", "2"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, args) -> list[float]:
    """The per-step losses of one process taking the whole global batch of 16 at once."""
    out = tmp_path_factory.mktemp("one") / "run"
    run_recipe([*args, "--per_device_train_batch_size", "16", "--output_dir", out], threads=1)
    losses = train_losses(out)
    assert len(losses) == STEPS
    assert abs(losses[-1] - losses[0]) > 1e-3  # training moved: the comparison has teeth
    return losses


@pytest.mark.parametrize("config", ENGINES)
def test_engine_matches_one_process_and_exports_the_trained_weights(tmp_path, args, one_process,
                                                                    config):
    """2 processes x 4 x 2 accumulation == 1 process x 16 (fp32, no dropout): token-weighted
    normalisation, sharding and accumulation make the per-step losses the same, under every
    engine."""
    out = tmp_path / config
    proc = launch([*args, "--per_device_train_batch_size", "4",
                   "--gradient_accumulation_steps", "2", "--output_dir", str(out)],
                  accelerate_args=accel(config))
    assert "x 2 processes" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary[M.STEP] == STEPS
    assert summary[M.EVAL_LOSS] < summary["first/" + M.EVAL_LOSS]
    losses = train_losses(out)
    assert len(losses) == len(one_process), (losses, one_process)  # an engine that logged none
    for a, b in zip(one_process, losses, strict=True):
        assert abs(a - b) / abs(a) <= 1e-4, (config, one_process, losses)
    # only the main process writes: one line per logging step, no duplicates
    assert [r[M.STEP] for r in read_metrics(out) if M.TRAIN_LOSS in r] == list(range(1, STEPS + 1))
    # model/ is a plain HF checkpoint (consolidated from ZeRO-3 shards) holding the weights the
    # engine evaluated: re-evaluating it in a fresh process gives the recipe's final eval loss.
    assert exported_eval_loss(out) == pytest.approx(summary[M.EVAL_LOSS], rel=1e-5)
    # model_avg/: the final weights and checkpoint-2 (ZeRO's shards through DeepSpeed's
    # zero_to_fp32), re-evaluated to the run's eval/avg_loss
    assert summary[M.AVERAGED_CHECKPOINTS] == [2, STEPS]
    assert exported_eval_loss(out, "model_avg") == pytest.approx(summary[M.EVAL_AVG_LOSS],
                                                                 rel=1e-5)


def test_simulated_two_node_launch(tmp_path, tiny_args):
    """The README's "several nodes by hand" line, run twice on this machine as its comment says
    ("the same command on every node, with its own --machine_rank"): ranks 0 and 1 form one
    group. The placeholders of a cluster become this machine's: --main_process_ip node-0 ->
    127.0.0.1, --main_process_port -> a free port."""
    (line,) = [launch for launch in launches_of("accelerate") if "--num_machines" in launch.argv]
    assert line.argv[line.argv.index("--num_machines") + 1] == "2"
    out = tmp_path / "multi"
    port = free_port()
    args = [*tiny_args, "--output_dir", str(out), "--max_train_steps", "3",
            "--max_train_samples", "100"]
    nodes = [start(args, accelerate_args(line, replace={
        "--machine_rank": rank, "--main_process_ip": "127.0.0.1", "--main_process_port": port}))
        for rank in (0, 1)]
    try:
        for node in nodes:
            finish(node)
    finally:
        for node in nodes:
            if node.poll() is None:  # a failure: leave no process behind
                kill_tree(node)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary[M.STEP] == 3
