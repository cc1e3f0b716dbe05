"""One run per output folder: ``<output_dir>/run.lock``, taken before anything is written.

Two runs started into the same ``--output_dir`` would interleave metrics.jsonl, overwrite each
other's checkpoints and die on half-written files. The first run's main process creates
``run.lock`` atomically (``O_CREAT | O_EXCL``) holding its host, pid and start time as JSON; a
second run finds it and fails at once with a :class:`~mlmkit.config.ConfigError` naming the holder
and the fix. The lock is removed when the run exits (:meth:`RunLock.release`, also at interpreter
exit); a run killed with SIGKILL leaves it behind, and then:

* same host, holder process gone (its pid no longer runs, or runs a process started later, or
  the machine rebooted): the lock is stale and is taken over, with a warning returned in
  :attr:`RunLock.warning`;
* the same Slurm job, an earlier incarnation (the job was requeued: ``SLURM_RESTART_COUNT``
  differs): stale as well, whatever the host -- Slurm runs one incarnation of a job at a time;
* another Slurm job that Slurm no longer runs (``squeue`` knows it no more, or lists it ended):
  stale, whatever the host -- e.g. a job whose node was lost, resubmitted as a new job;
* another host: considered live (its process cannot be checked from here); the error says so,
  with the fix: delete the lock file if that job is dead.

Only the launch's main process takes the lock (:func:`lock_output_dir`). Before it does,
:func:`check_output_path` makes sure ``--output_dir`` is a folder or can be created (not a file,
not under a file, writable), so a wrong path is one ConfigError, not an OSError. A folder that the
lock created is removed again at release if the run left it empty (it failed before writing).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from mlmkit.config.errors import ConfigError
from mlmkit.train.runfolder import LOCK as LOCK_NAME

BREAK_SUFFIX = ".break"   # a short-lived mutex held while a stale lock is being replaced
BREAK_STALE_S = 30.0      # a break mutex older than this was left by a killed process
UNREADABLE_GRACE_S = 5.0  # a lock file still empty/unparseable after this was left half-written


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder_info() -> dict:
    pid = os.getpid()
    info = {"host": socket.gethostname(), "pid": pid,
            "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "boot_id": _boot_id(), "proc_start": _proc_start(pid), "token": uuid.uuid4().hex}
    for key, env in (("slurm_job_id", "SLURM_JOB_ID"),
                     ("slurm_restart_count", "SLURM_RESTART_COUNT")):
        if os.environ.get(env) is not None:
            info[key] = os.environ[env]
    return info


SLURM_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
               "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def slurm_job_ended(job_id: str) -> bool:
    """Whether Slurm says job ``job_id`` runs no longer (False where ``squeue`` is absent or does
    not answer: then nobody can tell)."""
    if not shutil.which("squeue"):
        return False
    try:
        asked = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if "Invalid job id" in asked.stderr:  # finished longer ago than Slurm keeps jobs
        return True
    states = set(asked.stdout.split())
    return asked.returncode == 0 and states <= SLURM_ENDED


def describe(info: dict) -> str:
    """``pid 123 on host gpu-7, started 2025-01-01T10:00:00+00:00`` (+ the Slurm job, if any)."""
    text = f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"
    if info.get("slurm_job_id"):
        text += f", Slurm job {info['slurm_job_id']}"
    return text


def check_output_path(output_dir: str | os.PathLike) -> None:
    """ConfigError, naming the fix, unless ``output_dir`` is a folder this user can write in, or
    a path where one can be created (its nearest existing ancestor a writable folder)."""
    path = Path(output_dir)
    where = f"output_dir={str(output_dir)!r}"
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{where} is a broken symbolic link (to {os.readlink(path)}). Fix: "
                          "create its target folder, or pass another --output_dir.")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where} is an existing file, not a folder. Fix: pass a folder path "
                          f"(e.g. --output_dir {str(output_dir).rstrip('/')}_run), or move the "
                          "file away.")
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{where} cannot be created: {existing} is a file, not a folder. Fix: "
                          "pass a path under a folder, e.g. --output_dir outputs/run1.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "it" if existing == Path(os.path.abspath(path)) else f"{existing}"
        raise ConfigError(f"{where}: {what} is not writable by this user. Fix: pass a folder you "
                          "can write in (e.g. under $HOME or your scratch space), or change its "
                          "permissions.")


class RunLock:
    """The lock on one output folder. ``acquire()`` or ``with RunLock(dir):``; ``release()``."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self.info: dict | None = None     # what this process wrote, while it holds the lock
        self.warning: str | None = None   # set when a stale lock was taken over
        self.created = False              # output_dir did not exist before acquire()

    # ------------------------------------------------------------------------------ public
    def acquire(self) -> "RunLock":
        """Take the lock or raise ConfigError naming the live holder (or what is wrong with the
        path, `check_output_path`); returns ``self``."""
        check_output_path(self.output_dir)
        self.created = self.created or not self.output_dir.exists()
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # e.g. a read-only file system, a name too long
            raise ConfigError(f"output_dir={str(self.output_dir)!r} cannot be created "
                              f"({err.strerror}). Fix: pass a folder you can write in.") from err
        deadline = time.monotonic() + 2 * UNREADABLE_GRACE_S
        while True:
            if self._try_create():
                atexit.register(self.release)
                return self
            holder = self._read()
            if holder is None:  # vanished, or being written right now by its creator
                if self._age() > UNREADABLE_GRACE_S and self._break(None):
                    self.warning = (f"replaced the unreadable lock file {self.path} (left "
                                    "half-written by a killed run)")
                    continue
                if time.monotonic() > deadline:
                    raise ConfigError(f"output_dir={str(self.output_dir)!r}: its lock file "
                                      f"{self.path} cannot be read. Fix: if no run is using "
                                      f"this folder, delete {self.path}.")
                time.sleep(0.1)
                continue
            why = self._stale_because(holder)
            if why is None:
                raise ConfigError(self._live_message(holder))
            if self._break(holder):
                self.warning = (f"took over the stale lock {self.path} of {describe(holder)}: "
                                f"{why}")
            else:
                time.sleep(0.1)  # another process is replacing it; try again

    def release(self) -> None:
        """Remove the lock if this process still holds it (idempotent), and output_dir too if
        acquire() created it and it is empty (the run failed before writing anything)."""
        if self.info is None:
            return
        holder = self._read()
        if holder is not None and holder.get("token") == self.info["token"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            if self.created:
                try:
                    self.output_dir.rmdir()  # only if empty
                except OSError:
                    pass
        self.info = None
        atexit.unregister(self.release)

    @property
    def held(self) -> bool:
        return self.info is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------------------ internals
    def _try_create(self, retry: bool = True) -> bool:
        info = _holder_info()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:  # a run that failed early removed its empty folder meanwhile
            if not retry:
                raise
            self.output_dir.mkdir(parents=True, exist_ok=True)
            return self._try_create(retry=False)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.info = info
        return True

    def _read(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _stale_because(self, holder: dict) -> str | None:
        """Why the holder is certainly gone, or None when it may be alive."""
        job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT")
        if (job is not None and holder.get("slurm_job_id") == job
                and holder.get("slurm_restart_count") != restarts):
            return (f"it belongs to an earlier run of this Slurm job (restart "
                    f"{holder.get('slurm_restart_count')}; this is restart {restarts})")
        holder_job = holder.get("slurm_job_id")
        if holder_job is not None and holder_job != job and slurm_job_ended(holder_job):
            return f"Slurm runs its job {holder_job} no longer"
        if holder.get("host") != socket.gethostname():
            return None
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return "it names no process"
        if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
            return "this machine has rebooted since"
        if not _pid_running(pid):
            return "that process is no longer running"
        if holder.get("proc_start") and _proc_start(pid) not in (None, holder["proc_start"]):
            return "that process is no longer running (its pid now belongs to another process)"
        return None

    def _live_message(self, holder: dict) -> str:
        where = str(self.output_dir)
        if holder.get("host") != socket.gethostname():
            return (f"output_dir={where!r} is in use by another run ({describe(holder)}; this is "
                    f"host {socket.gethostname()}, so whether it still runs cannot be checked "
                    f"from here). Fix: wait for it or pass another --output_dir; if that job is "
                    f"dead, delete {self.path}.")
        return (f"output_dir={where!r} is in use by another run ({describe(holder)}; lock file "
                f"{self.path}). Fix: wait for it to finish, stop it, or pass another "
                "--output_dir.")

    def _break(self, expected: dict | None) -> bool:
        """Remove the lock file if it still holds ``expected`` (None: still unreadable), under a
        mutex so that two runs replacing the same stale lock cannot both win."""
        mutex = self.path.with_name(self.path.name + BREAK_SUFFIX)
        try:
            fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - mutex.stat().st_mtime > BREAK_STALE_S:
                    mutex.unlink()  # left by a process killed while breaking
            except OSError:
                pass
            return False
        os.close(fd)
        try:
            current = self._read()
            if current != expected:  # someone else replaced it meanwhile
                return False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            return True
        finally:
            mutex.unlink()


def lock_output_dir(output_dir: str | os.PathLike) -> RunLock | None:
    """Take ``<output_dir>/run.lock`` on the launch's main process (global rank 0, or a launch
    without ``RANK``); None on every other process. Raises ConfigError when another run holds it.
    The lock is released at interpreter exit (or call ``.release()``)."""
    if os.environ.get("RANK", "0") != "0":
        return None
    return RunLock(output_dir).acquire()
