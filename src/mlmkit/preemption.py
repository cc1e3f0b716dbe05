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
    :meth:`agreed` at each step boundary, so every process stops after the same step.

    Launchers: torchrun (``accelerate launch`` with 2+ processes, DeepSpeed too) catches SIGTERM
    and SIGINT and forwards them to every worker, then SIGKILLs the workers still alive after
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by default: raise it when a checkpoint takes
    longer to write), and exits non-zero itself. Accelerate's one-process launcher does not
    forward signals and dies at once; the recipe gets SIGTERM from the kernel when its launcher
    dies (PR_SET_PDEATHSIG, see ``_terminate_with_launcher``), so ``kill <launcher pid>`` works
    there too. Whether a signal reaches only the launcher or every process (``kill -TERM -<pgid>``,
    Slurm's job-step signalling), every process stops after the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}
        self._in_flight: list = []  # CUDA: (pinned host flag, event) per step, oldest first

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

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _terminate_with_launcher() -> bool:
    """Ask Linux for SIGTERM when the launcher that started this process dies (PR_SET_PDEATHSIG).

    Accelerate's one-process launcher (``subprocess.Popen`` + ``wait``) neither forwards SIGTERM
    nor waits for its child: ``kill <launcher pid>`` would leave the run going, orphaned. torchrun
    forwards signals, but starts every worker in a session of its own, so a launcher that is
    SIGKILLed (OOM killer, ``kill -9``) would leave its workers running unsupervised. With this,
    the run checkpoints and stops instead. Only when the parent is such a launcher, Linux only.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
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
