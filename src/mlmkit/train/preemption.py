"""Pre-emption: SIGTERM (Slurm's time-limit warning, a pre-empting scheduler) and SIGINT stop a
run cleanly -- every process finishes the same step, a checkpoint is saved, and it exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path


class StopSignal:
    """SIGTERM (Slurm's pre-emption / time-limit warning) and SIGINT set a flag; the loop asks
    :meth:`agreed` at each step boundary, so every process stops after the same step, writes one
    checkpoint before any tracker call, and exits 0.

    Launchers, as each treats a signal:

    * torchrun (``accelerate launch`` with 2+ processes or DeepSpeed, ``torchrun`` itself)
      catches SIGTERM and SIGINT, forwards them to every worker, SIGKILLs the workers still alive
      after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by default: raise it when a checkpoint
      takes longer to write) and exits non-zero itself.
    * Accelerate >= 1.16's one-process launcher sends SIGTERM to the whole process tree (the
      recipe, W&B's service, data workers) and SIGKILLs what is alive 5 s later: the stop (the
      step in flight plus the checkpoint) must fit in those 5 s. The data workers ignore the
      signal (`steps.Prefetcher`), a tracker that dies under it is a warning
      (`tracking.MetricsLog`), and the recipe warns once when a checkpoint takes longer than
      `LAUNCHER_GRACE_S` allows (`StopSignal.warn_if_stop_outlasts_launcher`). Give a big
      checkpoint time by running one process without that launcher (``python recipes/mlm.py``,
      ``ACCELERATE_MIXED_PRECISION=bf16`` for bf16) or under ``torchrun --nproc_per_node 1``
      with TORCH_ELASTIC_SHUTDOWN_TIMEOUT.
    * Older one-process launchers neither forward the signal nor wait; the recipe gets SIGTERM
      from the kernel when its launcher dies (PR_SET_PDEATHSIG, see ``_terminate_with_launcher``),
      so ``kill <launcher pid>`` works there too.
    * Slurm (recipes/slurm/mlm.sbatch) starts torchrun-based launchers with SIGTERM ignored and
      signals every training process itself, waiting up to its STOP_TIMEOUT.

    Whether a signal reaches only the launcher or every process (``kill -TERM -<pgid>``, Slurm's
    job-step signalling), every process stops after the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}
        self._in_flight: list = []  # CUDA: (pinned host flag, event) per step, oldest first
        self._warned = False  # the checkpoint-time warning, once per run

    def install(self) -> "StopSignal":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        _terminate_with_launcher()
        return self

    def _handle(self, signum, frame) -> None:  # no I/O here: it may interrupt a print
        self.received = self.received or signal.Signals(signum).name

    # On CUDA the processes agree on a flag all-reduced CUDA_LAG steps earlier, copied to the
    # host asynchronously: asking every step must not stall the GPU (no host-device sync).
    CUDA_LAG = 2

    def agreed(self, accelerator) -> bool:
        """True on every process when any process got a signal; a collective every process calls
        at every step boundary. One process: at once. Several on CPU: at this step. Several on
        CUDA: ``CUDA_LAG`` steps later (the same step on every process)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        import torch
        flag = torch.tensor([1.0 if self.received else 0.0])
        if accelerator.device.type != "cuda":
            return bool(accelerator.reduce(flag.to(accelerator.device), "sum").item() > 0)
        reduced = accelerator.reduce(flag.pin_memory().to(accelerator.device, non_blocking=True),
                                     "sum")
        host = torch.empty_like(flag).pin_memory()
        host.copy_(reduced, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._in_flight.append((host, event))
        if len(self._in_flight) <= self.CUDA_LAG:
            return False
        host, event = self._in_flight.pop(0)
        event.synchronize()  # recorded CUDA_LAG steps ago: long done, this does not stall
        return bool(host[0] > 0)

    def warn_if_stop_outlasts_launcher(self, save_seconds: float, log, **kwargs) -> bool:
        """After a periodic checkpoint: log `stop_outlasts_launcher_warning`, once per run.
        True when it warned."""
        if self._warned:
            return False
        warning = stop_outlasts_launcher_warning(save_seconds, **kwargs)
        if warning:
            self._warned = True
            log(warning)
        return warning is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _parent_cmdline(parent: int) -> list[bytes]:
    """The command line of process ``parent`` (the launcher, if any); empty off Linux."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        return Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _terminate_with_launcher() -> bool:
    """Ask Linux for SIGTERM when the launcher that started this process dies (PR_SET_PDEATHSIG).

    Accelerate's one-process launcher before 1.16 (``subprocess.Popen`` + ``wait``) neither
    forwards SIGTERM nor waits for its child: ``kill <launcher pid>`` would leave the run going,
    orphaned. torchrun
    forwards signals, but starts every worker in a session of its own, so a launcher that is
    SIGKILLed (OOM killer, ``kill -9``) would leave its workers running unsupervised. With this,
    the run checkpoints and stops instead. Only when the parent is such a launcher, Linux only.
    """
    parent = os.getppid()
    cmdline = _parent_cmdline(parent)
    if not any(name in part for part in cmdline
               for name in (b"accelerate", b"torchrun", b"torch.distributed.run")):
        return False
    import ctypes
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True


# Accelerate >= 1.16's one-process launcher SIGKILLs the process tree this long after SIGTERM.
LAUNCHER_GRACE_S = 5.0
LAUNCHER_MIN_VERSION = (1, 16)


def under_tree_killing_launcher() -> bool:
    """True when this process was started by Accelerate's one-process launcher (>= 1.16), which
    kills its process tree `LAUNCHER_GRACE_S` seconds after a SIGTERM or Ctrl-C."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return False  # a torchrun worker: torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    cmdline = _parent_cmdline(os.getppid())
    if not any(b"accelerate" in part for part in cmdline) or b"launch" not in cmdline:
        return False
    try:
        from importlib.metadata import version
        major, minor = (int(x) for x in version("accelerate").split(".")[:2])
    except Exception:  # noqa: BLE001 -- unknown version: assume the old launcher
        return False
    return (major, minor) >= LAUNCHER_MIN_VERSION


def stop_outlasts_launcher_warning(save_seconds: float, *, launcher: bool | None = None,
                                   budget: float = 0.6 * LAUNCHER_GRACE_S) -> str | None:
    """The warning a periodic checkpoint that took ``save_seconds`` deserves: one when writing
    it took more than ``budget`` seconds under a launcher that kills the run `LAUNCHER_GRACE_S`
    after a signal (a stop there would lose its checkpoint; the previous one is kept), else
    None. ``launcher``: whether this is such a launch (None: `under_tree_killing_launcher`)."""
    if save_seconds <= budget:
        return None
    if not (under_tree_killing_launcher() if launcher is None else launcher):
        return None
    return (f"warning: a checkpoint took {save_seconds:.1f} s to write, but Accelerate's "
            f"one-process launcher kills the run {LAUNCHER_GRACE_S:.0f} s after SIGTERM or "
            "Ctrl-C, so a stop would keep only the previous checkpoint. To give a stop time, run "
            "one process without that launcher (`python recipes/mlm.py ...`; "
            "ACCELERATE_MIXED_PRECISION=bf16 for bf16) or with `TORCH_ELASTIC_SHUTDOWN_TIMEOUT="
            "120 torchrun --nproc_per_node 1 recipes/mlm.py ...`.")
