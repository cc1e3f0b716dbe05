"""Data preparation off the training step's critical path.

`planned_steps` turns the batch plan into ready steps: each planned micro-batch fetched, collated
(masks are a pure function of (seed, epoch, example index)), made a dummy where this process ran
out of examples, given the flat indices of its masked positions (so the masked-only head gathers
without a data-dependent shape on the device), counted on the host (positions computed, real
tokens, masked tokens, model FLOPs) and, on CUDA, pinned so its copy to the device is
asynchronous. `Prefetcher` runs that generator on a background thread, a few steps ahead of the
training loop, and reports how long the loop waited for each step.

Exact resume is untouched: what a step holds depends only on the plan and (epoch, step_in_epoch),
never on how far ahead the thread ran; the loop's own counters say where to resume.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .collator import drop_targets


@dataclass
class PreparedStep:
    """One optimizer step's micro-batches for this process, with host-side counts."""
    epoch: int
    step_in_epoch: int
    micro_batches: list[dict]
    computed: int       # positions computed (padding and dummies included)
    real: int           # real tokens (dummies excluded)
    flops: float        # model FLOPs (`flops.FlopCounter`), 0 without a counter


def add_masked_positions(batch: dict, multiple: int | None = None) -> dict:
    """The flat indices of ``labels != -100`` as ``masked_positions`` (host side, in place).

    With ``multiple``, padded up to a multiple of it with the index ``labels.numel()`` (one past
    the end), which `modeling.MaskedLMModule` reads as "no target": a compiled graph (CUDA graphs
    above all) then sees a handful of shapes instead of a new one every step."""
    positions = (batch["labels"].flatten() != -100).nonzero().squeeze(1)
    if multiple:
        pad = -len(positions) % multiple
        positions = torch.cat([positions, positions.new_full((pad,), batch["labels"].numel())])
    batch["masked_positions"] = positions
    return batch


def planned_steps(plan, collator, examples, *, start_epoch: int, start_step: int,
                  num_epochs: int, max_length: int, flop_counter=None, sparse_head: bool = True,
                  pin_memory: bool = False,
                  positions_multiple: int | None = None) -> Iterator[PreparedStep]:
    """Every step of ``plan`` from (``start_epoch``, ``start_step``) to the end of
    ``num_epochs`` epochs, prepared (see the module doc; ``positions_multiple``: see
    `add_masked_positions`)."""
    lengths = examples.lengths
    for epoch in range(start_epoch, num_epochs):
        collator.set_epoch(epoch)
        first = start_step if epoch == start_epoch else 0
        for step_in_epoch, micro_plan in plan.epoch(epoch, start_step=first):
            micro_batches, computed, real, flops = [], 0, 0, 0.0
            for micro in micro_plan:
                indices, rows = plan.layout(micro)  # rows: the packed layout, or None
                batch = collator(examples.fetch(indices or [0]), rows=rows)
                if not indices:  # this process ran out of examples: a zero-weight dummy
                    drop_targets(batch)
                add_masked_positions(batch, positions_multiple)
                computed += batch["input_ids"].numel()
                if indices:
                    real += int(batch["num_real_tokens"])
                    if flop_counter is not None:
                        flops += flop_counter.step_flops(
                            [min(lengths[i], max_length) for i in indices],
                            int(batch["num_masked_tokens"]), sparse_head)
                if pin_memory:
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                             for k, v in batch.items()}
                micro_batches.append(batch)
            yield PreparedStep(epoch, step_in_epoch, micro_batches, computed, real, flops)


class Prefetcher:
    """Runs an iterator on a daemon thread, ``depth`` items ahead; ``next()`` returns
    ``(item, seconds waited)``. An exception in the thread is raised in the caller; `close`
    stops the thread (call it when the loop ends early). ``depth=0`` runs inline."""

    _END = object()

    def __init__(self, items: Iterator, depth: int = 2):
        self._items = iter(items)
        self._depth = depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name="mlmkit-prefetch", daemon=True)
            self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put((item, None)):
                    return
        except BaseException as err:  # noqa: BLE001 -- handed to the consumer, raised there
            self._put((None, err))
            return
        self._put((self._END, None))

    def next(self):
        """The next item and the seconds the caller waited for it; StopIteration at the end."""
        t0 = time.perf_counter()
        if self._thread is None:
            item = next(self._items)
            return item, time.perf_counter() - t0
        item, err = self._queue.get()
        waited = time.perf_counter() - t0
        if err is not None:
            raise err
        if item is self._END:
            self._queue.put((self._END, None))  # stay exhausted
            raise StopIteration
        return item, waited

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
