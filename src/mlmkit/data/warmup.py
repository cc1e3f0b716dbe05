"""How steps are cut during a warm-up (``--seq_len_warmup_steps``, ``--batch_warmup_steps``):
each step at its own shape (`shape.Ramps`: a length, units per micro-batch or a token budget),
from the run's step ``t`` that the cut begins at. The plans call these (`plans.TrainPlan`
for an epoch begun in a warm-up, `plans.StreamPlan` for a stream's windows); each returns or
yields every step's `shape.StepShape` with it, and is a pure function of its inputs, so a
resumed run cuts the same steps.

* `cut_counts`: a sequence of examples, ``units(t) x micro-batches`` a step.
* `cut_budget`: a sequence of examples, each micro-batch filled greedily to ``budget(t)`` padded
  tokens with lengths cropped to ``seq_length(t)`` (the token-budget plan's rule).
* `shaped_windows`: `layout.WindowPacker`'s window loop with a packer a window, at the shape of
  the window's first step (rows of that length when packing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlmkit.batch.layout import WindowPacker, round_up
from mlmkit.config.shape import Ramps, StepShape


def cut_counts(items: list, ramps: Ramps, t: int, *, full: int,
               micro_batches: int) -> tuple[list[list], list[StepShape]]:
    """``(steps, shapes)``: ``items`` cut into steps of ``ramps.units(t, full)`` per micro-batch
    (the last step may be short)."""
    steps, shapes, i = [], [], 0
    while i < len(items):
        n = ramps.units(t, full) * micro_batches
        steps.append(items[i:i + n])
        shapes.append(ramps.shape(t, full))
        i, t = i + n, t + 1
    return steps, shapes


def cut_budget(items: list[int], lengths, ramps: Ramps, t: int, *, budget: int,
               micro_batches: int,
               pad_to_multiple_of: int | None) -> tuple[list[list[list[int]]], list[StepShape]]:
    """``(steps, shapes)``: example indices ``items`` (``lengths[i]`` tokens, at most
    max_seq_length) cut into steps of ``micro_batches`` micro-batches, each as many examples as
    fit ``rows x padded width <= ramps.budget(t, budget)`` at their lengths cropped to
    ``ramps.seq_length(t)`` (at least one example; the last step may hold fewer)."""
    steps, shapes, i = [], [], 0
    while i < len(items):
        cap, fill = ramps.seq_length(t), ramps.budget(t, budget)
        step = []
        while len(step) < micro_batches and i < len(items):
            micro, widest = [], 0
            while i < len(items):
                n = min(int(lengths[items[i]]), cap)
                width = round_up(max(widest, n), pad_to_multiple_of)
                if micro and (len(micro) + 1) * width > fill:
                    break
                micro.append(items[i])
                widest, i = max(widest, n), i + 1
            step.append(micro)
        steps.append(step)
        shapes.append(ramps.shape(t, budget, tokens=True))
        t += 1
    return steps, shapes


def shaped_windows(source, carry: list, ramps: Ramps, t: int, *, full: int, multiple: int,
                   packed: bool, length: Callable[[Any, int], int],
                   rng: Callable[[int], Any]):
    """Yield ``(steps, carry, shape)`` per window of ``source``, as `WindowPacker.windows`
    does, each window at the shape of its first step (the run's step ``t`` for the first):
    ``units(t, full) x multiple`` units a step, rows of ``seq_length(t)`` tokens when
    ``packed`` (an item's tokens: ``length(item, cap)``). ``rng(k)``: the k-th window's
    generator."""
    k = 0
    while carry or not source.exhausted():
        shape = ramps.shape(t, full)
        cap = shape.length if packed else None
        packer = WindowPacker(ramps.units(t, full) * multiple, cap,
                              length=lambda item, cap=cap: length(item, cap))
        steps, carry = packer.window(source, carry, rng(k))
        yield steps, carry, shape
        k, t = k + 1, t + len(steps)
