"""recipes/slurm/mlm.sbatch executed the way sbatch runs it, on stand-ins for Slurm's commands
(tests/slurm_standins: one machine plays every node; srun starts one process group per node with
SLURM_NODEID/SLURM_PROCID set, turns a SIGTERM into SIGKILL for its tasks and returns the highest
task status, as the real one does; scontrol requeue and scancel are recorded).

Here: two nodes under DDP (multi_node.yaml, the script's default), a SIGTERM to the batch shell
(what `--signal=B:TERM@120` sends before the time limit) that checkpoints, requeues and exits 0,
and the requeued job resuming to the result of an uninterrupted run (one process with the same
global batch, in this process: no dropout, so DDP's per-step losses equal it within float noise,
as tests/integration/test_distributed.py shows). The README's two sbatch lines (DDP on 4 nodes,
ZeRO-3 on 2 via ACCELERATE_CONFIG) run in test_readme_launches.py: training on simulated nodes
is shown there.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from mlmkit import tracking as M
from mlmkit.checkpoint import validate_checkpoint
from mlmkit.tracking import read_metrics
from helpers import kill_tree, run_recipe, slurm_env, submit, train_losses

SCRIPT = "recipes/slurm/mlm.sbatch"


@pytest.fixture()
def slow_args(tiny_args) -> list[str]:
    """24 optimizer steps of 2 x 2 examples (fp32, no dropout), logged every step: slow enough
    to be signalled mid-run, small enough to run twice."""
    return [*tiny_args, "--max_train_steps", "24", "--max_train_samples", "200",
            "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--max_eval_samples", "32"]


def wait_for_training(out, proc, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        if (out / "metrics.jsonl").exists() and any(
                M.TRAIN_LOSS in r for r in read_metrics(out)):
            return
        time.sleep(0.2)
    raise AssertionError("no training step logged")


def test_sigterm_checkpoints_requeues_and_the_requeued_job_resumes_to_the_same_result(
        tmp_path, slow_args):
    # --- uninterrupted: the same 24 global batches of 4 in one process
    ref = tmp_path / "reference"
    reference = run_recipe([*slow_args, "--per_device_train_batch_size", "4",
                            "--output_dir", ref], threads=1).result
    assert reference[M.STEP] == 24

    # --- the same job, SIGTERM to its batch shell once training runs
    out, state = tmp_path / "preempted", tmp_path / "slurm"
    env = slurm_env(state, GPUS_PER_NODE="1", SLURM_JOB_ID="4242")
    job = submit(["sbatch", SCRIPT, *slow_args, "--output_dir", str(out)], env, background=True)
    try:
        wait_for_training(out, job)
        t0 = time.monotonic()
        job.send_signal(signal.SIGTERM)
        log = job.communicate(timeout=120)[0]
    finally:
        if job.poll() is None:  # a failure above: leave no process behind
            kill_tree(job.pid)
            job.communicate()
    assert job.returncode == 0, log[-4000:]  # the documented status after a requeue
    assert time.monotonic() - t0 < 60
    assert (state / "scancel.log").read_text() == "--signal=TERM 4242\n"
    assert (state / "requeue.log").read_text() == "requeue 4242\n"
    assert "requeued job 4242" in log and "training step ended with status 0" in log
    # the launchers exit 0 without torchrun's SignalException traceback; srun killed nobody
    assert "Traceback" not in log and "forcing job termination" not in log
    assert not (out / "summary.json").exists() and not (out / "model").exists()
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and validate_checkpoint(checkpoints[0]) is None
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 1 <= stopped_at < 24
    assert f"stopped by SIGTERM after step {stopped_at} of 24" in log

    # --- Slurm runs the requeued job: the same script, the same arguments
    again = submit(["sbatch", SCRIPT, *slow_args, "--output_dir", str(out)],
                   {**env, "SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stdout[-4000:]
    assert f"resuming from {checkpoints[0]}" in again.stdout
    assert "restart 1" in again.stdout and "2 nodes x 1 GPUs = 2 processes" in again.stdout
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["num_processes"] == 2 and resumed[M.STEP] == 24
    steps = [r[M.STEP] for r in read_metrics(out) if M.TRAIN_LOSS in r]
    assert steps == list(range(1, 25))  # each step once, across the requeue
    # every step, before and after the requeue, and the final eval: the uninterrupted result
    for a, b in zip(train_losses(ref), train_losses(out), strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert resumed[M.EVAL_LOSS] == pytest.approx(reference[M.EVAL_LOSS], abs=1e-5, rel=1e-5)


def test_a_bad_recipe_flag_fails_before_any_node_starts(tmp_path, tiny_args):
    state = tmp_path / "slurm"
    done = submit(["sbatch", SCRIPT, *tiny_args, "--learning_rate", "-1",
                   "--output_dir", str(tmp_path / "out")],
                  slurm_env(state, GPUS_PER_NODE="1"), timeout=60)
    assert done.returncode != 0
    assert "mlmkit: error: learning_rate=-1.0: must be positive" in done.stdout
    assert not list(state.glob("step-*"))  # srun never ran
