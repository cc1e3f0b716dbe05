"""The Slurm stand-ins (tests/slurm_standins) behave like the commands they replace, as far as
recipes/slurm/mlm.sbatch relies on them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import STANDINS
from slurm_standins.slurm_standin import expand_hostlist


@pytest.fixture()
def env(tmp_path) -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
            "PATH": f"{STANDINS}{os.pathsep}{os.environ['PATH']}",
            "SLURM_STANDIN_STATE": str(tmp_path), "SLURM_JOB_ID": "77", "SLURM_NNODES": "3",
            "SLURM_JOB_NODELIST": "127.0.0.[1-3]"}


def run(cmd, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, **kw)


def test_hostlists_expand_like_scontrol_show_hostnames(env):
    assert expand_hostlist("node[01-03,7],login") == ["node01", "node02", "node03", "node7",
                                                      "login"]
    assert expand_hostlist("127.0.0.[1-2]") == ["127.0.0.1", "127.0.0.2"]
    done = run(["scontrol", "show", "hostnames", "127.0.0.[1-3]"], env)
    assert done.stdout.splitlines() == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def test_srun_runs_one_task_per_node_and_returns_the_highest_status(env):
    done = run(["srun", "bash", "-c",
                'echo "$SLURM_NODEID $SLURM_PROCID $SLURMD_NODENAME $SLURM_NNODES"; '
                'exit $SLURM_NODEID'], env)
    assert done.returncode == 2
    assert sorted(done.stdout.splitlines()) == ["0 0 127.0.0.1 3", "1 1 127.0.0.2 3",
                                                "2 2 127.0.0.3 3"]


def test_srun_kill_on_bad_exit_stops_the_other_tasks(env):
    t0 = time.monotonic()
    done = run(["srun", "--kill-on-bad-exit=1", "bash", "-c",
                '[ "$SLURM_NODEID" = 0 ] && exit 3; exec sleep 60'], env)
    assert time.monotonic() - t0 < 20
    assert done.returncode == 128 + signal.SIGKILL  # the killed tasks' status is the highest


def test_srun_answers_sigterm_by_sigkilling_every_task_and_scancel_reaches_every_process(
        env, tmp_path):
    # each task starts a child in a session of its own (as torchrun starts its workers) that
    # records the signals it gets
    child = ('import signal, sys, time; '
             'signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], "a").write("TERM\\n"))); '
             'open(sys.argv[1], "a").write("up\\n"); time.sleep(60)')
    task = (f'setsid {sys.executable} -c \'{child}\' {tmp_path}/got-$SLURM_NODEID & '
            'trap "" TERM; wait')
    srun = subprocess.Popen(["srun", "bash", "-c", task], env=env, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("got-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    assert run(["scancel", "--signal=TERM", "77"], env).returncode == 0
    time.sleep(1)
    assert srun.poll() is None  # scancel signals the step's processes, not srun
    for node in range(3):
        assert (tmp_path / f"got-{node}").read_text() == "up\nTERM\n"
    srun.send_signal(signal.SIGTERM)
    assert srun.wait(timeout=30) == 128 + signal.SIGKILL
    assert "forcing job termination" in srun.stderr.read()
    assert (tmp_path / "scancel.log").read_text() == "--signal=TERM 77\n"


def test_scontrol_requeue_is_recorded(env, tmp_path):
    assert run(["scontrol", "requeue", "77"], env).returncode == 0
    assert (tmp_path / "requeue.log").read_text() == "requeue 77\n"
