"""The same recipe on 2-process DDP, ZeRO-2, ZeRO-3 (+ CPU offload) and a simulated 2-node launch,
all on CPU with gloo. Launch settings come only from accelerate_configs/, and every launch is the
README's own `accelerate launch` line for that config (tests/readme_commands.py) with only the
README's CPU note applied (`--num_processes 2 --mixed_precision no`): no flag the README does not
tell a CPU user to add."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import ACCELERATE, RECIPE, ROOT, exported_eval_loss, free_port, launch, launch_env
from mlmkit import tracking as M
from mlmkit.tracking import read_metrics
from readme_commands import accelerate_args, accelerate_launch, cpu_note, launches_of

# The README's single-node launch lines (ddp, zero2, zero3, zero3_offload, ...).
SINGLE_NODE = [launch.config for launch in launches_of("accelerate")
               if "--num_machines" not in launch.argv]


def accel(config: str) -> list[str]:
    """The README's `accelerate launch` options for this config, plus its CPU note."""
    return accelerate_args(accelerate_launch(config))


def test_the_readme_shows_a_launch_line_for_each_single_node_config():
    assert {"ddp", "zero2", "zero3", "zero3_offload"} <= set(SINGLE_NODE)
    assert cpu_note()[0][:2] == ["--num_processes", "2"]  # what "2 processes" below relies on


@pytest.mark.parametrize("config", SINGLE_NODE)
def test_two_process_training_exports_the_trained_weights(tmp_path, tiny_args, config):
    out = tmp_path / config
    proc = launch([*tiny_args, "--output_dir", str(out), "--max_train_steps", "4",
                   "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                   "--learning_rate", "3e-3", "--max_train_samples", "200",
                   "--eval_pad_sensitivity", "false"],
                  accelerate_args=accel(config))
    assert "x 2 processes" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary[M.STEP] == 4
    assert summary[M.EVAL_LOSS] < summary["first/" + M.EVAL_LOSS]
    # model/ is a plain HF checkpoint (consolidated from ZeRO-3 shards) holding the weights the
    # engine evaluated: re-evaluating it in a fresh process gives the recipe's final eval loss.
    assert exported_eval_loss(out) == pytest.approx(summary[M.EVAL_LOSS], rel=1e-5)
    # only the main process writes: one line per logging step, no duplicates
    steps = [r[M.STEP] for r in read_metrics(out) if M.TRAIN_LOSS in r]
    assert steps == [2, 4]


def test_global_batch_equivalence_across_processes_and_accumulation(tmp_path, tiny_args):
    """1 process x B == 2 processes x B/2 == 1 process x B/2 x 2 accumulation (fp32, no dropout):
    token-weighted normalisation and sharding make the per-step losses the same."""
    common = [*tiny_args, "--max_train_steps", "5", "--logging_steps", "1", "--learning_rate",
              "3e-3", "--max_train_samples", "200", "--eval_pad_sensitivity", "false",
              "--max_eval_samples", "16"]
    runs = {
        "one": (["--per_device_train_batch_size", "8"], None),
        "ddp": (["--per_device_train_batch_size", "4"], accel("ddp")),
        "accum": (["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], None),
        "zero2": (["--per_device_train_batch_size", "4"], accel("zero2")),
    }
    losses = {}
    for name, (extra, launch_args) in runs.items():
        out = tmp_path / name
        launch([*common, *extra, "--output_dir", str(out)], accelerate_args=launch_args)
        losses[name] = [r[M.TRAIN_LOSS] for r in read_metrics(out) if M.TRAIN_LOSS in r]
    assert len(losses["one"]) == 5
    for name in ("ddp", "accum", "zero2"):
        for a, b in zip(losses["one"], losses[name]):
            assert abs(a - b) / abs(a) <= 1e-4, (name, losses["one"], losses[name])
    # and training moved: later losses differ from the first (the comparison is not vacuous)
    assert abs(losses["one"][-1] - losses["one"][0]) > 1e-3


def test_simulated_two_node_launch(tmp_path, tiny_args):
    """The README's "several nodes by hand" line, run twice on this machine as its comment says
    ("the same command on every node, with its own --machine_rank"): ranks 0 and 1 form one
    group. The placeholders of a cluster become this machine's: --main_process_ip node-0 ->
    127.0.0.1, --main_process_port -> a free port."""
    (line,) = [launch for launch in launches_of("accelerate") if "--num_machines" in launch.argv]
    assert line.argv[line.argv.index("--num_machines") + 1] == "2"
    out = tmp_path / "multi"
    port = free_port()
    cmd = lambda rank: [  # noqa: E731
        str(ACCELERATE), "launch",
        *accelerate_args(line, replace={"--machine_rank": rank, "--main_process_ip": "127.0.0.1",
                                        "--main_process_port": port}),
        str(RECIPE), *tiny_args,
        "--output_dir", str(out), "--max_train_steps", "3", "--max_train_samples", "100",
        "--eval_pad_sensitivity", "false"]
    procs = [subprocess.Popen(cmd(rank), cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary[M.STEP] == 3
