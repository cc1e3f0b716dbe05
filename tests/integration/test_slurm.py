"""recipes/slurm/mlm.sbatch on a real Slurm cluster: slurmctld and two slurmd on this machine
(the ``slurm_cluster`` fixture, tests/slurm_cluster.py; node names node1/node2 that do not
resolve as host names, both nodes at 127.0.0.1). Every job is the README's DDP sbatch line as a
CPU user submits it (the README's CPU note) with the flags of a tiny run for its `...`:

* a real time limit (`--time=2`, the script's own `--signal=B:TERM@120`) pre-empts the run:
  every process checkpoints, the script requeues the job, the requeued attempt resumes and ends
  at the result of an uninterrupted run (one process, the same global batch, in this process),
  and the job's output holds both attempts, each recipe line once per attempt;
* a second job into the same output folder is refused at once, naming the first; then one
  node's processes are SIGKILLed mid-run (a lost node): the job fails within --ddp_timeout,
  and the same command submitted again resumes from the newest complete checkpoint to the
  uninterrupted result;
* a bad recipe flag fails the job before any node starts.

The README's two sbatch lines train and match one process in test_readme_launches.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from helpers import (
    SLURM_CLUSTER,
    assert_logged_once,
    complete_checkpoints,
    run_recipe,
    slurm_attempts,
    slurm_env,
    train_losses,
)
from readme_commands import launches_of, sbatch_command

from mlmkit.config.errors import ConfigError
from mlmkit.train import tracking as M
from mlmkit.train.checkpoint import validate_checkpoint
from mlmkit.train.runlock import RunLock
from mlmkit.train.tracking import read_metrics

STEPS = 60
DDP_TIMEOUT = 60
pytestmark = SLURM_CLUSTER  # one worker, one cluster, one job set at a time under `make test`


@pytest.fixture(scope="module")
def readme_line():
    """The README's DDP sbatch line (accelerate_configs/multi_node.yaml, the script's default)."""
    (line,) = [launch for launch in launches_of("sbatch") if launch.config == "multi_node"]
    return line


@pytest.fixture(scope="module")
def job_args(tiny_args) -> list[str]:
    """STEPS optimizer steps of 2 processes x 2 examples (fp32, no dropout), each logged, a
    checkpoint every 10: long enough to be pre-empted or to lose a node mid-run."""
    return [*tiny_args, "--max_train_steps", str(STEPS), "--max_train_samples", "200",
            "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--max_eval_samples", "32", "--checkpointing_steps", "10", "--save_total_limit", "2",
            "--ddp_timeout", str(DDP_TIMEOUT)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, readme_line, job_args):
    """The uninterrupted run: the same flags (the README line's own included), the global batch
    of 4 in one process, in this process. -> its output folder."""
    ref = tmp_path_factory.mktemp("reference") / "run"
    result = run_recipe([*readme_line.recipe_args, *job_args, "--per_device_train_batch_size",
                         "4", "--output_dir", ref], threads=1).result
    assert result[M.STEP] == STEPS
    return ref


def assert_same_as_reference(out, ref) -> None:
    """Every step once, across attempts; every step's loss and the final eval those of the
    uninterrupted run (DDP vs one process: within float noise, as test_distributed.py shows)."""
    steps = [r[M.STEP] for r in read_metrics(out) if M.TRAIN_LOSS in r]
    assert steps == list(range(1, STEPS + 1))
    for a, b in zip(train_losses(ref), train_losses(out), strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary[M.STEP] == STEPS
    want = json.loads((ref / "summary.json").read_text())[M.EVAL_LOSS]
    assert summary[M.EVAL_LOSS] == pytest.approx(want, abs=1e-5, rel=1e-5)


def test_a_time_limit_preempts_the_run_which_checkpoints_requeues_and_resumes_to_the_same_result(
        slurm_cluster, tmp_path, readme_line, job_args, request):
    # --time: what the README lets a user set; 2 minutes, so the script's --signal=B:TERM@120
    # asks for the warning at once: slurmctld sends it at its next time check (every 30 s), and
    # the limit itself leaves the stop a minute and more. Submitted 6-10 s before a check, so the
    # job's processes are running (they may still be starting: the script signals again every
    # 2 s until they stop).
    argv, env = sbatch_command(readme_line, "--time=2")
    out = tmp_path / "run"
    slurm_cluster.wait_for_time_check(within=(6, 10))
    job = slurm_cluster.sbatch([*argv, *job_args, "--output_dir", str(out)],
                               slurm_env(slurm_cluster, **env))
    reference = request.getfixturevalue("reference")  # computed while the job runs
    requeued = slurm_cluster.wait(
        job, lambda r: r["Restarts"] != "0" or r["JobState"] in slurm_cluster.FINAL, timeout=120)
    assert requeued["Restarts"] == "1", slurm_cluster.output(job)[-6000:]
    # A real cluster gives the requeued attempt the whole --time again; two minutes would warn
    # every attempt at its first time check. So the requeued job gets 10 (as an admin would).
    slurm_cluster.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"])
    record = slurm_cluster.wait(job)
    log = slurm_cluster.output(job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log[-6000:]

    # --- the job's output holds both attempts, each under its header
    first, second = slurm_attempts(log)
    assert f"job {job} attempt 1 (restart 0)" in first
    assert f"job {job} attempt 2 (restart 1)" in second
    assert "mlmkit: SIGTERM: every training process checkpoints" in first
    stopped = re.search(r"stopped by SIGTERM after step (\d+) of (\d+); saved (\S+) in [\d.]+ s\.", first)
    assert stopped, first[-6000:]
    step = int(stopped.group(1))
    assert 1 <= step < STEPS and stopped.group(3) == str(out / "checkpoints" / f"checkpoint-{step}")
    assert "training step ended with status 0" in first and f"requeued job {job}" in first
    # the launchers exit 0 without torchrun's SignalException traceback; srun killed nobody.
    # (torchrun's exit barrier may log a DistNetworkError traceback of its own, E-prefixed, when
    # the head node's agent, which holds the rendezvous store, exits first: a race inside torch's
    # elastic agent after every process exited 0, not ours.)
    ours = [line for line in log.splitlines() if "torch/distributed/elastic/agent/" not in line]
    assert "Traceback" not in "\n".join(ours) and "forcing job termination" not in log
    assert "SignalException" not in log
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{step}'} (step {step};" in second
    assert "done: eval perplexity" in second
    for attempt in (first, second):
        assert_logged_once(attempt)

    # --- the requeued attempt ended where the uninterrupted run did
    assert_same_as_reference(out, reference)


def test_a_second_job_into_the_folder_is_refused_and_a_lost_node_fails_the_job_which_resumes(
        slurm_cluster, tmp_path, readme_line, job_args, reference):
    argv, env = sbatch_command(readme_line)
    out = tmp_path / "run"
    command = [*argv, *job_args, "--output_dir", str(out)]
    env = slurm_env(slurm_cluster, **env)
    job = slurm_cluster.sbatch(command, env)
    lock = out / "run.lock"
    slurm_cluster.wait(job, lambda r: lock.exists() or r["JobState"] in slurm_cluster.FINAL,
                       timeout=120)
    holder = json.loads(lock.read_text())
    assert holder["slurm_job_id"] == job

    # --- the same command again while the first job runs: refused at once, naming the holder,
    # before any node starts
    t0 = time.monotonic()
    second = slurm_cluster.sbatch(command, env)
    refused = slurm_cluster.wait(second, timeout=60)
    assert time.monotonic() - t0 < 30
    second_log = slurm_cluster.output(second)
    assert refused["JobState"] == "FAILED", second_log
    assert (f"mlmkit: error: output_dir={str(out)!r} is in use by another run (pid "
            f"{holder['pid']} on host {holder['host']}, started {holder['started']}, Slurm job "
            f"{job};") in second_log
    assert "nodes x" not in second_log  # refused before srun
    assert slurm_cluster.job(job)["JobState"] == "RUNNING"

    # --- a complete checkpoint, then node2 is lost: SIGKILL to every process of the job there
    while not complete_checkpoints(out):
        assert slurm_cluster.job(job)["JobState"] == "RUNNING", slurm_cluster.output(job)[-6000:]
        time.sleep(0.05)
    victims = slurm_cluster.job_processes(job, "node2")
    assert victims
    t0 = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    record = slurm_cluster.wait(job, timeout=DDP_TIMEOUT + 60)
    assert time.monotonic() - t0 < DDP_TIMEOUT + 30  # a clear failure, not a hang
    log = slurm_cluster.output(job)
    assert record["JobState"] == "FAILED", log[-6000:]
    assert "srun: error: node2: task 1: Killed" in log
    assert "mlmkit: error: the training step failed" in log
    assert not (out / "summary.json").exists()
    newest = complete_checkpoints(out)[-1]
    assert validate_checkpoint(out / "checkpoints" / f"checkpoint-{newest}") is None
    assert newest < STEPS

    # --- the same command submitted again resumes from the newest complete checkpoint
    again = slurm_cluster.sbatch(command, env)
    record = slurm_cluster.wait(again)
    log = slurm_cluster.output(again)
    assert record["JobState"] == "COMPLETED", log[-6000:]
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{newest}'} (step {newest};" in log
    assert_logged_once(log)
    assert_same_as_reference(out, reference)


def test_a_bad_recipe_flag_fails_the_job_before_any_node_starts(slurm_cluster, tmp_path,
                                                                readme_line, tiny_args):
    argv, env = sbatch_command(readme_line)
    job = slurm_cluster.sbatch([*argv, *tiny_args, "--learning_rate", "-1",
                                "--output_dir", str(tmp_path / "out")],
                               slurm_env(slurm_cluster, **env))
    record = slurm_cluster.wait(job, timeout=60)
    log = slurm_cluster.output(job)
    assert record["JobState"] == "FAILED"
    assert "mlmkit: error: learning_rate=-1.0: must be positive" in log
    assert "nodes x" not in log  # srun never ran
    assert not (tmp_path / "out").exists()


def test_a_lock_left_by_a_job_that_slurm_no_longer_runs_is_stale(slurm_cluster, tmp_path,
                                                                 monkeypatch):
    """A run killed with its node leaves run.lock naming its job and a host this node cannot
    check: stale once Slurm lists that job as ended (the resubmitted job takes it over, with a
    warning), live while Slurm still has it (pending or running)."""
    env = slurm_env(slurm_cluster)
    ended = slurm_cluster.sbatch(["sbatch", "--wrap", "true"], env)
    assert slurm_cluster.wait(ended)["JobState"] == "COMPLETED"
    waiting = slurm_cluster.sbatch(["sbatch", "--wrap", "sleep 120"], env)
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    try:
        for job, stale in ((ended, True), (waiting, False), ("999999", True)):
            out = tmp_path / f"run-{job}"
            out.mkdir()
            holder = {"host": "node-lost", "pid": 4242, "started": "2026-11-30T00:00:00+00:00",
                      "slurm_job_id": job}
            (out / "run.lock").write_text(json.dumps(holder) + "\n")
            if stale:
                with RunLock(out) as lock:
                    assert f"Slurm runs its job {job} no longer" in lock.warning
                    assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
            else:
                with pytest.raises(ConfigError, match=rf"in use by another run .*Slurm job {job}"):
                    RunLock(out).acquire()
                assert json.loads((out / "run.lock").read_text()) == holder  # left alone
    finally:
        slurm_cluster.run(["scancel", waiting])
