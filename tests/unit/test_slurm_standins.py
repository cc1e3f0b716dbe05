"""The Slurm stand-ins (tests/slurm_standins) behave like the commands they replace, as far as
recipes/slurm/mlm.sbatch relies on them; on them, the script's own logic: each node's launch from
Slurm's variables, in a second (a fake `accelerate` prints it). The script runs for real on a
real Slurm cluster in tests/integration/test_slurm.py and test_readme_launches.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import ROOT, STANDINS
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


# ------------------------------------------------------------------ recipes/slurm/mlm.sbatch's logic
def fake_accelerate(folder) -> str:
    """A folder holding `accelerate` (prints the node's launch: its arguments and threads) and
    the venv's `python` and `python3` (the script validates the recipe's flags with it; the
    stand-ins run on it)."""
    (folder / "accelerate").write_text(
        '#!/bin/sh\necho "node $SLURM_NODEID: threads=$OMP_NUM_THREADS launch $*"\n')
    for name in ("python", "python3"):
        (folder / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for name in ("accelerate", "python", "python3"):
        (folder / name).chmod(0o755)
    return str(folder)


def launches(done) -> dict[int, str]:
    """{node: its `accelerate launch` arguments} from the job's output."""
    found = {}
    for line in done.stdout.splitlines():
        if line.startswith("node ") and " launch " in line:
            node = int(line.split(":")[0].split()[1])
            found[node] = line
    return found


@pytest.mark.parametrize("options, extra_env, per_node, threads, precision", [
    ([], {}, 8, 4, None),  # the script's #SBATCH lines: 8 GPUs and 32 cores per node
    (["--gpus-per-node=0", "--cpus-per-task=4"], {"MIXED_PRECISION": "no"}, 1, 4, "no"),
    ([], {"GPUS_PER_NODE": "2"}, 2, 16, None),
], ids=["gpu-cluster", "cpu-cluster", "gpus-per-node-override"])
def test_the_script_launches_each_node_from_slurms_variables(tmp_path, env, options, extra_env,
                                                             per_node, threads, precision):
    """Processes per node from the GPUs Slurm gives a node (none: one), threads from the task's
    cores, each node's rank from SLURM_NODEID, the head node's address (NodeAddr, not its name),
    a port from the job id; everything the script is given goes to the recipe."""
    shims = fake_accelerate(tmp_path)
    env = {k: v for k, v in env.items() if k not in ("SLURM_NNODES", "SLURM_JOB_NODELIST",
                                                     "OMP_NUM_THREADS")}
    env.update(PATH=f"{STANDINS}{os.pathsep}{shims}{os.pathsep}{os.environ['PATH']}",
               SLURM_JOB_ID="24242", **extra_env)
    out = tmp_path / "out"
    done = run(["sbatch", *options, "recipes/slurm/mlm.sbatch", "--output_dir", str(out),
                "--seed", "3"], env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    nodes = launches(done)
    assert sorted(nodes) == [0, 1], done.stdout
    for rank, line in nodes.items():
        argv = line.split(" launch ", 1)[1].split()
        assert f"threads={threads}" in line
        assert argv[argv.index("--num_machines") + 1] == "2"
        assert argv[argv.index("--num_processes") + 1] == str(2 * per_node)
        assert argv[argv.index("--machine_rank") + 1] == str(rank)
        assert argv[argv.index("--main_process_ip") + 1] == "127.0.0.1"  # node1's NodeAddr
        assert argv[argv.index("--main_process_port") + 1] == str(10000 + 24242 % 20000)
        assert argv[argv.index("--config_file") + 1] == "accelerate_configs/multi_node.yaml"
        assert ("--mixed_precision" in argv) == (precision is not None)
        if precision:
            assert argv[argv.index("--mixed_precision") + 1] == precision
        assert argv[-5:] == ["recipes/mlm.py", "--output_dir", str(out), "--seed", "3"]
    assert f"2 nodes x {per_node} processes = {2 * per_node} processes" in done.stdout


def test_the_script_takes_the_next_port_when_the_jobs_own_is_taken(tmp_path, env):
    shims = fake_accelerate(tmp_path)
    env = {k: v for k, v in env.items() if k not in ("SLURM_NNODES", "SLURM_JOB_NODELIST")}
    env.update(PATH=f"{STANDINS}{os.pathsep}{shims}{os.pathsep}{os.environ['PATH']}",
               SLURM_JOB_ID="3777")
    with socket.socket() as busy:  # another job's rendezvous on the head node
        busy.bind(("", 10000 + 3777))
        busy.listen()
        done = run(["sbatch", "recipes/slurm/mlm.sbatch", "--output_dir", str(tmp_path / "o")],
                   env, cwd=ROOT)
        pinned = run(["sbatch", "recipes/slurm/mlm.sbatch", "--output_dir", str(tmp_path / "o")],
                     {**env, "MAIN_PORT": "29999"}, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "head node node1 at 127.0.0.1:13778" in done.stdout
    assert "head node node1 at 127.0.0.1:29999" in pinned.stdout  # MAIN_PORT: taken as given
