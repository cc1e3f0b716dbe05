"""How steps are cut during a warm-up (``--seq_len_warmup_steps``, ``--batch_warmup_steps``):
each step at its own shape (`shape.Ramps`: a length, units per micro-batch or a token budget),
from the run's step ``t`` that the cut begins at. The plans call these (`plans.TrainPlan`
for an epoch begun in a warm-up, `plans.StreamPlan` for a stream's windows); each returns or
yields every step's `shape.StepShape` with it, and is a pure function of its inputs, so a
resumed run cuts the same steps.

* `cut_counts`: a sequence of examples, ``units(t) x micro-batches`` a step.
* `cut_budget`: a sequence of examples, each micro-batch filled greedily to ``budget(t)`` padded
  tokens with lengths cropped to ``seq_length(t)`` (the token-budget plan's rule).
* `shaped_windows`: `layout.WindowPacker`'s window loop with a packer a window, at the length
  of the window's first step (rows of that length when packing), its steps cut one by one.
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
    """Yield ``(steps, carry, shapes)`` per window of ``source``, as `WindowPacker.windows`
    does, each window at the length L of its first step (the run's step ``t`` for the first;
    rows of L tokens when ``packed``, an item's tokens ``length(item, L)``), packed in steps of
    that first step's units; its units are then cut again step by step, ``units(t', full, L) x
    multiple`` for each step t' (the batch grows within a window), and the units past the last
    whole step go back to the carry as items (a finite source's last window: a short last
    step). ``rng(k)``: the k-th window's generator. `window_steps` gives a step's shape."""
    k = 0
    while carry or not source.exhausted():
        cap = ramps.seq_length(t)
        packer = WindowPacker(ramps.units(t, full, cap) * multiple, cap if packed else None,
                              length=lambda item, cap=cap: length(item, cap))
        window, carry = packer.window(source, carry, rng(k))
        units = [unit for step in window for unit in step]
        steps, i = [], 0
        while i < len(units):
            n = ramps.units(t + len(steps), full, cap) * multiple
            if i + n > len(units) and not source.exhausted():
                back = units[i:]  # not a whole step: its examples wait for the next window
                carry = [x for u in back for x in (u if packed else [u])] + carry
                break
            steps.append(units[i:i + n])
            i += n
        yield steps, carry, [ramps.shape(t + j, full, length=cap) for j in range(len(steps))]
        k, t = k + 1, t + len(steps)


def window_steps(ramps: Ramps, begins: int, k: int, full: int) -> StepShape | None:
    """The `shape.StepShape` of step ``k`` of a `shaped_windows` window begun at the run's step
    ``begins`` (None: a window begun after the warm-up, full steps)."""
    if begins >= ramps.warmup_end:
        return None
    return ramps.shape(begins + k, full, length=ramps.seq_length(begins))
