"""Kill it anywhere, resume to the same result: the recipe launched for real, interrupted by
SIGKILL or SIGTERM mid-epoch, then started again with the same command.

The tiny BERT here has dropout 0.1, so equal results prove that every process's RNG state was
restored, not just the weights, optimizer, scheduler and data position. One-process runs that are
not interrupted (the reference, a resume after SIGKILL) run in this process
(helpers.run_recipe, one thread like the launches: bit-identical results). The output-folder
refusals are tested in process: tests/unit/test_recipe.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import psutil
import pytest
import torch
from helpers import (
    RECIPE,
    ROOT,
    assert_same_run,
    complete_checkpoints,
    kill_tree,
    launch,
    launch_env,
    recipe_pids,
    run_recipe,
    start,
    train_losses,
    wait_for_checkpoint,
    wait_gone,
)
from safetensors.torch import load_file

from mlmkit.train import tracking as M
from mlmkit.train.checkpoint import STATE_FILE, validate_checkpoint
from mlmkit.train.tracking import read_metrics

DDP = ["--config_file", str(ROOT / "accelerate_configs" / "ddp.yaml"), "--num_processes", "2",
       "--mixed_precision", "no"]


@pytest.fixture(scope="module")
def args(tiny_bert_dropout_dir, tokenizer_path) -> list[str]:
    """128 examples, 8 per step: 16 steps an epoch, 32 steps in all; a checkpoint every 3 steps
    (mostly mid-epoch and mid logging window), the newest 2 kept."""
    return ["--config_name", tiny_bert_dropout_dir, "--tokenizer_name", tokenizer_path,
            "--report_to", "none", "--progress_bar", "false", "--max_eval_samples", "64",
            "--per_device_eval_batch_size", "32", "--eval_pad_sensitivity", "false",
            "--fill_mask_check", "false",
            "--max_train_samples", "128", "--per_device_train_batch_size", "8",
            "--max_train_steps", "32", "--learning_rate", "1e-3", "--logging_steps", "2",
            "--eval_steps", "8", "--checkpointing_steps", "3", "--save_total_limit", "2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, args) -> Path:
    """The uninterrupted run (one process) that every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    run_recipe([*args, "--output_dir", out], threads=1)
    return out


# ------------------------------------------------------------------------------ tests
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, args, reference):
    """SIGKILL (no chance to save) after checkpoint 6; the newest checkpoint is then damaged, so
    the rerun skips it with a warning and resumes from the one before: same result, to the bit."""
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == [
        "checkpoint-27", "checkpoint-30"]  # retention: save_total_limit 2, newest kept

    out = tmp_path / "run"
    cmd = [*args, "--output_dir", str(out)]
    proc = start(cmd)
    wait_for_checkpoint(proc, out, 6)
    kill_tree(proc)
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    steps = complete_checkpoints(out)
    assert len(steps) == 2 and steps[-1] < 32, steps
    newest, previous = (out / "checkpoints" / f"checkpoint-{s}" for s in (steps[-1], steps[0]))
    optimizer = newest / "optimizer.bin"  # as if the disk had lost its tail
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    (out / "checkpoints" / ".tmp-checkpoint-99").mkdir()  # a save killed half-way

    stdout = run_recipe(cmd, threads=1).stdout  # the same command again, in this process
    assert f"skipping checkpoint {newest}: optimizer.bin is truncated" in stdout
    assert f"resuming from {previous} (step {steps[0]}" in stdout
    assert_same_run(out, reference)
    # the damaged checkpoint was rewritten on the way; the newest 2 remain, no temporaries
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-27", "checkpoint-30"]


def test_sigterm_checkpoints_stops_cleanly_and_resumes(tmp_path, args, reference):
    """`kill <launcher pid>` under the one-process launcher (which does not forward signals): the
    recipe finishes its step, saves, prints how to resume and exits without summary or model;
    the rerun continues the same (offline) W&B run and ends exactly like the reference."""
    out = tmp_path / "run"
    cmd = [*args, "--output_dir", str(out), "--report_to", "wandb"]
    env = {"WANDB_MODE": "offline"}
    proc = start(cmd, env=env)
    pids = recipe_pids(proc)
    wait_for_checkpoint(proc, out, 3)
    os.kill(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]  # EOF once the recipe process has exited too
    wait_gone(pids)
    match = re.search(r"stopped by SIGTERM after step (\d+) of 32; saved (\S+) in [\d.]+ s\. To "
                      r"resume, run the same command again", output)
    assert match, output[-4000:]
    assert "Traceback" not in output
    step, saved = int(match.group(1)), Path(match.group(2))
    assert 3 <= step < 32 and saved == out / "checkpoints" / f"checkpoint-{step}"
    assert validate_checkpoint(saved) is None
    state = json.loads((saved / STATE_FILE).read_text())
    assert state["step"] == step and state["wandb_run_id"]
    assert not (out / "summary.json").exists() and not (out / "model").exists()
    assert max(r[M.STEP] for r in read_metrics(out)) <= step

    proc = launch(cmd, env=env)
    assert f"resuming from {saved} (step {step}" in proc.stdout
    assert_same_run(out, reference)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + state["wandb_run_id"]) for r in runs)



def test_sigterm_under_torchrun_with_one_process(tmp_path, args):
    """The docs' way to give a big checkpoint time: one process under torchrun, which forwards
    SIGTERM and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (not Accelerate's 5 s) before
    killing; W&B's service stays up, the stop is clean and the launcher reports the signal."""
    import subprocess
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "1",
           str(RECIPE), *args, "--output_dir", str(out), "--report_to", "wandb"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env=launch_env(WANDB_MODE="offline",
                                           TORCH_ELASTIC_SHUTDOWN_TIMEOUT="300"))
    wait_for_checkpoint(proc, out, 3)
    os.kill(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    match = re.search(r"stopped by SIGTERM after step (\d+) of 32; saved (\S+) in", output)
    assert match, output[-4000:]
    assert "the wandb tracker failed" not in output  # torchrun signals the recipe only
    assert not (out / "summary.json").exists()
    assert validate_checkpoint(Path(match.group(2))) is None

def test_ddp_signal_to_one_rank_then_sigkill_then_resume(tmp_path, args, tiny_bert_dir):
    """Two DDP processes. SIGTERM to rank 1 only: both ranks agree to stop after the same step,
    save, and exit 0. The resumed run is SIGKILLed (every process) after a later checkpoint. The
    third launch finishes like the uninterrupted run of one process taking the global batch of
    16 (in this process): the same losses, eval loss and weights within 1e-5. Without dropout here: DDP's per-rank RNG states are
    restored in test_streaming_launch.py's DDP resume."""
    i = args.index("--config_name")
    args = [*args[:i], "--config_name", tiny_bert_dir, *args[i + 2:]]
    ref = tmp_path / "reference"
    run_recipe([*args, "--per_device_train_batch_size", "16", "--output_dir", ref], threads=1)

    out = tmp_path / "run"
    cmd = [*args, "--output_dir", str(out)]
    proc = start(cmd, DDP)
    ranks = recipe_pids(proc, count=2)
    wait_for_checkpoint(proc, out, 3)
    rank1 = next(p for p in ranks if psutil.Process(p).environ().get("RANK") == "1")
    os.kill(rank1, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-4000:]  # both recipes exited 0: torchrun did too
    match = re.search(r"stopped by a signal to another process after step (\d+)", output)
    assert match, output[-4000:]  # rank 0 never got the signal, but stopped at the same step
    stopped = int(match.group(1))
    state = json.loads((out / "checkpoints" / f"checkpoint-{stopped}" / STATE_FILE).read_text())
    assert state["step"] == stopped and state["launch"]["num_processes"] == 2

    proc = start(cmd, DDP)
    wait_for_checkpoint(proc, out, stopped + 4)
    kill_tree(proc)
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"

    proc = launch(cmd, accelerate_args=DDP)
    assert re.search(r"resuming from \S+checkpoint-\d+ \(step \d+", proc.stdout)
    # the reference's rows are packed from 16 examples, not 2 x 8: the same losses and weights,
    # other pad fractions
    assert [r[M.STEP] for r in read_metrics(out) if M.TRAIN_LOSS in r] == list(range(2, 33, 2))
    for a, b in zip(train_losses(ref), train_losses(out), strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    got, want = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    assert got[M.EVAL_LOSS] == pytest.approx(want[M.EVAL_LOSS], rel=1e-5)
    weights = [load_file(d / "model" / "model.safetensors") for d in (out, ref)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=0, atol=1e-5)
