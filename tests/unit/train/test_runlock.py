"""One run per output folder (mlmkit.train.runlock), with real processes holding, losing and racing for
the lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlmkit.config.errors import ConfigError
from mlmkit.train.runlock import LOCK_NAME, RunLock, lock_output_dir

SRC = str(Path(__file__).resolve().parents[3] / "src")

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {src!r})
    from mlmkit.train.runlock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills this process)
    lock.release()
""")

RACER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {src!r})
    from mlmkit.config.errors import ConfigError
    from mlmkit.train.runlock import RunLock
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    try:
        lock = RunLock(sys.argv[1]).acquire()
    except ConfigError:
        print("lost", flush=True)
        sys.exit(0)
    print("won", flush=True)
    sys.stdin.read()
""")


def start_holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(src=SRC), str(folder)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_file_holds_host_pid_and_start_time_and_goes_at_release(tmp_path):
    out = tmp_path / "run"  # created by the lock: it is taken before anything else is written
    lock = RunLock(out).acquire()
    info = json.loads((out / LOCK_NAME).read_text())
    assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
    assert info["started"][:4].isdigit() and "T" in info["started"]
    assert lock.held and lock.warning is None
    lock.release()
    assert not (out / LOCK_NAME).exists() and not lock.held
    lock.release()  # idempotent
    with RunLock(out) as again:
        assert (out / LOCK_NAME).exists() and again.held
    assert not (out / LOCK_NAME).exists()


def test_a_live_holder_refuses_a_second_run_at_once_naming_it(tmp_path):
    holder = start_holder(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as err:
            RunLock(tmp_path).acquire()
        assert time.monotonic() - t0 < 1.0
        message = str(err.value)
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert "\n" not in message
        assert f"pid {holder.pid}" in message and socket.gethostname() in message
        assert info["started"] in message and "Fix:" in message and "--output_dir" in message
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert not (tmp_path / LOCK_NAME).exists()  # released by the holder at its exit
    RunLock(tmp_path).acquire().release()


def test_a_killed_holders_lock_is_taken_over_with_a_warning(tmp_path):
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (tmp_path / LOCK_NAME).exists()  # SIGKILL: no chance to release
    lock = RunLock(tmp_path).acquire()
    try:
        assert lock.held and f"pid {holder.pid}" in lock.warning
        assert "no longer running" in lock.warning
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_reused_pid_does_not_keep_a_stale_lock_alive(tmp_path):
    # the pid runs (it is this test's parent) but its process started at another time
    stale = {"host": socket.gethostname(), "pid": os.getppid(), "started": "2001-01-01T00:00:00",
             "proc_start": "1", "token": "x"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    lock = RunLock(tmp_path).acquire()
    assert "another process" in lock.warning
    lock.release()


def test_a_lock_from_another_host_is_live_and_the_message_says_how_to_clear_it(tmp_path):
    other = {"host": "gpu-node-that-is-not-this-one", "pid": 4242, "started": "2025-01-01T10:00:00"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(ConfigError) as err:
        RunLock(tmp_path).acquire()
    message = str(err.value)
    assert "\n" not in message
    assert "gpu-node-that-is-not-this-one" in message and "pid 4242" in message
    assert "2025-01-01T10:00:00" in message and "cannot be checked" in message
    assert f"delete {tmp_path / LOCK_NAME}" in message
    assert (tmp_path / LOCK_NAME).exists()  # never deleted on a guess


def test_a_requeued_slurm_job_takes_over_its_earlier_incarnations_lock(tmp_path, monkeypatch):
    earlier = {"host": "gpu-node-17", "pid": 4242, "started": "2025-01-01T10:00:00",
               "slurm_job_id": "777", "slurm_restart_count": "0"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(earlier))
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(tmp_path).acquire()
    assert "earlier run of this Slurm job" in lock.warning
    assert json.loads((tmp_path / LOCK_NAME).read_text())["slurm_restart_count"] == "1"
    lock.release()
    # another Slurm job's lock on another host stays live
    (tmp_path / LOCK_NAME).write_text(json.dumps({**earlier, "slurm_job_id": "778"}))
    with pytest.raises(ConfigError, match="Slurm job 778"):
        RunLock(tmp_path).acquire()


def test_a_half_written_lock_left_by_a_killed_run_is_replaced(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text("")
    old = time.time() - 60
    os.utime(path, (old, old))
    lock = RunLock(tmp_path).acquire()
    assert "unreadable" in lock.warning
    lock.release()


def test_release_never_removes_a_lock_another_run_holds(tmp_path):
    lock = RunLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "h", "pid": 1, "token": "theirs"}))
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "theirs"


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_processes_racing_for_one_folder_exactly_one_wins(tmp_path, stale):
    if stale:  # a dead process's lock that every racer wants to replace at the same moment
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (tmp_path / LOCK_NAME).write_text(json.dumps(
            {"host": socket.gethostname(), "pid": dead.pid, "started": "x", "proc_start": "0",
             "token": "dead"}))
    racers = [subprocess.Popen([sys.executable, "-c", RACER.format(src=SRC), str(tmp_path)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    try:
        assert [r.stdout.readline().strip() for r in racers] == ["ready"] * 4
        for r in racers:
            r.stdin.write("go\n")
            r.stdin.flush()
        results = [r.stdout.readline().strip() for r in racers]
    finally:
        for r in racers:
            r.stdin.close()
            r.wait(timeout=30)
    assert sorted(results) == ["lost", "lost", "lost", "won"]


def test_only_the_main_process_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert lock_output_dir(tmp_path / "a") is None
    assert not (tmp_path / "a" / LOCK_NAME).exists()
    monkeypatch.setenv("RANK", "0")
    lock = lock_output_dir(tmp_path / "a")
    assert lock is not None and (tmp_path / "a" / LOCK_NAME).exists()
    lock.release()
    monkeypatch.delenv("RANK")
    lock = lock_output_dir(tmp_path / "a")  # one process, no launcher: it is the main process
    assert lock is not None
    lock.release()
