"""Host-device synchronisation, checked: the training step must make none (`loop.train_step`).

`SyncCounter` counts, on any device (the CPU included), the tensor calls that would synchronise
with a GPU: ``.item()``, ``.tolist()``, ``bool()/float()/int()`` of a tensor, ``.cpu()``,
``.numpy()``, ``nonzero`` and boolean-mask indexing (data-dependent shapes). `steps_without_sync`
runs the recipe's own steps (a `loop.Stepper`) on CUDA under ``torch.cuda.set_sync_debug_mode
("error")``, which raises at any operation that synchronises. Used by the step tests
(tests/unit/train/test_step_sync.py) and by the GPU checks (benchmarks/gpu_checks.py ``sync``).
"""

from __future__ import annotations

import time
import traceback

import torch
from torch.overrides import TorchFunctionMode

SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy",
           "nonzero", "masked_select", "bincount", "unique", "repeat_interleave"}


class SyncCounter(TorchFunctionMode):
    """Records each syncing tensor call as ``(name, "file:line")`` in ``calls`` (thread-local:
    a prefetch thread is not counted)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        boolean_index = name in ("__getitem__", "__setitem__") and len(args) > 1 and \
            isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        if name in SYNCING or boolean_index:
            frame = traceback.extract_stack(limit=2)[0]  # the calling line
            self.calls.append((name, f"{frame.filename}:{frame.lineno}"))
        return func(*args, **(kwargs or {}))


def take_steps(stepper, prefetcher, n: int) -> None:
    """``n`` steps of ``prefetcher`` (a `steps.Prefetcher`) run by ``stepper`` (a
    `loop.Stepper`), as the recipe's loop runs them (results left on the device)."""
    for _ in range(n):
        t0 = time.perf_counter()
        prepared, _ = prefetcher.next()
        stepper(prepared, t0)


def steps_without_sync(stepper, prefetcher, *, warmup: int, steps: int = 4) -> list[tuple]:
    """``warmup`` steps (lazy CUDA initialisation, compilation and CUDA-graph recording may
    synchronise), read; then ``steps`` steps under CUDA's sync debug mode "error" -- the first
    a `metrics.BusyClock` calibration, queued behind its spin -- and their one read, returned
    (`loop.Stepper.read`). Raises at the first synchronisation inside those steps (on CUDA; on
    another device the steps only run)."""
    take_steps(stepper, prefetcher, warmup)
    stepper.read()
    stepper.clock.recalibrate()  # the next step is the busy clock's calibration
    cuda = stepper.accelerator.device.type == "cuda"  # elsewhere (a CPU dry run): steps only
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        take_steps(stepper, prefetcher, steps)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    return stepper.read()
