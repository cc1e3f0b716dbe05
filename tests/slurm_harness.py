"""Running recipes/slurm/mlm.sbatch on this machine through the Slurm stand-ins
(tests/slurm_standins: sbatch, srun, scontrol, scancel), the way sbatch would run it."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from slurm_standins.slurm_standin import descendants  # the stand-ins' /proc walk

ROOT = Path(__file__).resolve().parents[1]
STANDINS = ROOT / "tests" / "slurm_standins"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=None)
def venv_shims() -> Path:
    """A folder with `python`, `python3` and `accelerate` that run this interpreter's (the venv's)
    -- and nothing else of the venv's bin/, so that every other tool resolves as it does for the
    other tests. (Putting .venv/bin on PATH would switch DeepSpeed's JIT builds from the system's
    `ninja` to the venv's, whose different command hashes rebuild the cached ops every time.)"""
    folder = Path(tempfile.mkdtemp(prefix="mlmkit-venv-shims-"))
    atexit.register(shutil.rmtree, folder, True)
    targets = {"python": sys.executable, "python3": sys.executable,
               "accelerate": str(Path(sys.executable).with_name("accelerate"))}
    for name, target in targets.items():
        (folder / name).write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        (folder / name).chmod(0o755)
    return folder


def slurm_env(state: Path, **extra: str) -> dict:
    """The environment of a login shell with the stand-ins first on PATH, then the venv's
    `python` and `accelerate` (`venv_shims`), which the script calls. MAIN_PORT: a free port, as
    other tests use torchrun's default 29500 on this machine."""
    path = os.pathsep.join([str(STANDINS), str(venv_shims()), os.environ["PATH"]])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PATH": path, "SLURM_STANDIN_STATE": str(state), "MAIN_PORT": str(free_port()),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", **extra}


def submit(argv: list[str], env: dict, *, background: bool = False, timeout: int = 400):
    """Run ``sbatch ...`` (argv[0] == "sbatch", resolved on the stand-in PATH) from the repo root;
    returns the CompletedProcess, or the Popen when ``background`` (its pid is the batch shell;
    call :func:`kill_tree` on it when done). A job still running after ``timeout`` is killed with
    every process it started (srun's tasks and the training processes live in sessions of their
    own, out of reach of a process-group kill)."""
    assert argv[0] == "sbatch"
    cmd = [str(STANDINS / "sbatch"), *argv[1:]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if background:
        return proc
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"sbatch still running after {timeout} s:\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (a no-op for processes already gone)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
