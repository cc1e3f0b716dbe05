"""Data preparation off the training step's critical path.

`PlannedSteps` turns the batch plan into ready steps: each planned micro-batch fetched, collated
(masks are a pure function of (seed, epoch, example index)), made a dummy where this process ran
out of examples, given the flat indices of its masked positions (so the masked-only head gathers
without a data-dependent shape on the device) and counted on the host (positions computed, real
tokens, masked tokens, model FLOPs). `Prefetcher` hands them to the training loop: inline
(``--dataloader_num_workers 0``, the default on CPU, where workers would compete with training
for the same cores), or prepared ahead by worker processes (a torch ``DataLoader``; the default
on a GPU is 2), pinned so the copy to the device is asynchronous, without holding the training
process's GIL while it launches kernels. It reports how long the loop waited for each step.

`StepPreparer` is that preparation for one step, built once (`RunSteps.source`) and handed to
`PlannedSteps` and to `streaming.StreamSteps` (whose steps come from a stream instead of a plan);
with ``--mixture_files`` it also counts real tokens per source. The per-step schedules
(`shape.Ramps`) are applied here, for the step each batch is *for*: the run's step index comes
with the step's position (``DataPosition.done``), so a worker that prepares steps ahead sets the
collator's mask rate of that step, crops the examples to the step's length (its
`shape.StepShape`, from the plan) and reports both with the step (`PreparedStep.scheduled`).

Exact resume is untouched: worker ``w`` of ``W`` prepares the steps ``k`` with ``k % W == w``
and the loader returns them round-robin, i.e. in plan order; what a step holds depends only on
the plan and its position (`checkpoint.DataPosition`: epoch, step of it), never on the number of
workers. Both step sources take the same arguments: what they read, the `StepPreparer`, their
plan and the position to start from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mlmkit.batch.collator import MaskedLMCollator, drop_targets
from mlmkit.batch.layout import round_up
from mlmkit.batch.rows import PackedRows
from mlmkit.config.fields import MLMConfig
from mlmkit.config.keys import TRAIN_BATCH_FRACTION, TRAIN_MLM_PROBABILITY, TRAIN_SEQ_LENGTH
from mlmkit.config.shape import POSITIONS_MULTIPLE, Ramps, RunShape, StepShape, run_shape
from mlmkit.data.files import DataRepairs
from mlmkit.data.plans import Schedule, micro_layout, plan_schedule
from mlmkit.data.position import DataPosition
from mlmkit.data.run import RunData
from mlmkit.data.streaming import PASS_SHIFT, StreamExamples, StreamPosition
from mlmkit.train.optim import Training, build_scheduler


@dataclass
class PreparedStep:
    """One optimizer step's micro-batches for this process, with host-side counts."""
    position: DataPosition  # where the data stands after this step: resume from here
    micro_batches: list[dict]
    computed: int       # positions computed (padding and dummies included)
    real: int           # real tokens (dummies excluded)
    flops: float        # model FLOPs (`flops.FlopCounter`), 0 without a counter
    source_tokens: list[int] | None = None  # real tokens per --mixture_files source
    scheduled: dict = field(default_factory=dict)  # the step's scheduled values, by metric name

    @property
    def epoch(self) -> int:
        """The epoch of the step (the stream's pass of its newest example)."""
        return self.position.epoch

    def pin_memory(self) -> "PreparedStep":
        """Called by the DataLoader's pinning thread."""
        return replace(self, micro_batches=[
            {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            for b in self.micro_batches])


def add_masked_positions(batch: dict, multiple: int | None = None,
                         capacity: int | None = None) -> dict:
    """The flat indices of ``labels != -100`` as ``masked_positions`` (host side, in place).

    With ``multiple``, padded up to a multiple of it with the index ``labels.numel()`` (one past
    the end), which `loading.MaskedLMModule` reads as "no target": a compiled graph (CUDA graphs
    above all) then sees a handful of shapes instead of a new one every step. With ``capacity``
    too, padded to at least ``capacity`` (one shape for the run while the targets fit; more are
    never dropped: the next multiple holds them)."""
    positions = (batch["labels"].flatten() != -100).nonzero().squeeze(1)
    if multiple:
        size = max(capacity or 0, round_up(len(positions), multiple))
        positions = torch.cat([positions, positions.new_full((size - len(positions),),
                                                             batch["labels"].numel())])
    batch["masked_positions"] = positions
    return batch


# boundary entries are padded to a multiple of this (masked positions: POSITIONS_MULTIPLE)
SEGMENTS_MULTIPLE = 64


@dataclass(frozen=True)
class StaticShapes:
    """The one shape of every tensor a compiled training forward sees in a packed run, so that
    it compiles (and records its CUDA graph) once: ``rows`` rows of ``width`` tokens per
    micro-batch (a short micro-batch -- an epoch's last step, a dummy -- gets empty rows),
    ``masked`` masked positions (padded with "no target"), and with the flash form
    (`rows.PackedRows.flash_inputs`) ``segments`` boundary entries (`PackedRows.pad_boundaries`:
    empty segments at the end) and ``max_length_q/k`` = ``width`` (an upper bound). A step that
    exceeds a capacity is not cut: it takes the next multiple (`POSITIONS_MULTIPLE`,
    `SEGMENTS_MULTIPLE`), a new shape that compiles once more."""
    rows: int
    width: int
    masked: int
    segments: int

    @classmethod
    def for_run(cls, cfg, shape) -> "StaticShapes | None":
        """The run's shapes under ``--torch_compile`` with packed rows (``shape``:
        `config.RunShape`), else None. Capacities: the masked positions of a full micro-batch at
        ``mlm_probability`` (a schedule's higher end) with a quarter more and a margin (a
        binomial count stays well inside); boundaries for one example per 16 tokens of each row
        plus its padding tail."""
        if not cfg.torch_compile or shape.unit != "rows" or Ramps.from_config(cfg).shaped:
            return None  # (warm-ups change the rows and their length)
        rows, width = shape.micro_batch_size, cfg.max_seq_length
        rate = max(cfg.mlm_probability, cfg.mlm_probability_final or 0.0)  # a schedule's top
        masked = round_up(math.ceil(rows * width * rate * 1.25) + 64,
                          POSITIONS_MULTIPLE)
        segments = round_up(rows * (width // 16 + 1) + 1, SEGMENTS_MULTIPLE)
        return cls(rows, width, masked, segments)

    def fill_rows(self, rows: list[list[int]]) -> list[list[int]]:
        """``rows`` (positions into a micro-batch's examples) with empty rows up to ``rows``."""
        if len(rows) > self.rows:
            raise RuntimeError(f"internal error: a micro-batch of {len(rows)} rows, planned "
                               f"{self.rows}")
        return [*rows, *([] for _ in range(self.rows - len(rows)))]

    def fix(self, batch: dict) -> dict:
        """Masked positions and boundaries of a collated micro-batch at their fixed sizes."""
        add_masked_positions(batch, POSITIONS_MULTIPLE, self.masked)
        cu = batch.get("cu_seq_lens_q")
        if cu is not None:
            size = max(self.segments, round_up(len(cu), SEGMENTS_MULTIPLE))
            cu = PackedRows.pad_boundaries(cu, size)  # (size,)
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=self.width,
                         max_length_k=self.width)
        return batch


class StepPreparer:
    """One optimizer step of this process made ready for the training loop, whichever source
    its micro-batches come from (`PlannedSteps`, `streaming.StreamSteps`): each collated (masks
    of the ``mask_epoch``), made a zero-weight dummy where empty, given its masked positions
    (`add_masked_positions`, ``positions_multiple``) and counted on the host (positions
    computed, real tokens, model FLOPs with ``flop_counter``, real tokens per ``--mixture_files``
    source with ``num_sources``); with ``static`` (a `StaticShapes`) at the run's one shape;
    with ``ramps`` (a `shape.Ramps`) at the step's mask rate and shape."""

    def __init__(self, collator, *, max_length: int, flop_counter=None, sparse_head: bool = True,
                 positions_multiple: int | None = None, num_sources: int = 0,
                 static: StaticShapes | None = None, ramps: Ramps | None = None):
        self.collator, self.max_length, self.flop_counter = collator, max_length, flop_counter
        self.sparse_head, self.positions_multiple = sparse_head, positions_multiple
        self.num_sources, self.static, self.ramps = num_sources, static, ramps

    def schedule(self, position: DataPosition, shape: StepShape | None) -> dict:
        """The step's scheduled values, by metric name, the mask rate set on the collator: the
        step is the run's step ``position.done - 1`` (``position``: after it)."""
        ramps, scheduled = self.ramps, {}
        if ramps is None:
            return scheduled
        if ramps.mlm_final is not None:
            scheduled[TRAIN_MLM_PROBABILITY] = ramps.mlm_probability(position.done - 1)
            self.collator.set_mlm_probability(scheduled[TRAIN_MLM_PROBABILITY])
        if ramps.length_steps:  # no shape: a step after the warm-up
            scheduled[TRAIN_SEQ_LENGTH] = shape.length if shape is not None else self.max_length
        if ramps.batch_steps:
            scheduled[TRAIN_BATCH_FRACTION] = shape.fraction if shape is not None else 1.0
        return scheduled

    def __call__(self, micro_batches: list, position: DataPosition, *, mask_epoch: int,
                 fetch=None, shape: StepShape | None = None) -> PreparedStep:
        """The step at ``position`` (after it) from ``micro_batches``, each a list of examples,
        or with packing a list of rows of them (`plans.micro_layout`). With ``fetch``
        (`data.IndexedExamples.fetch`) the items are example indices, fetched here; an empty
        micro-batch (this process ran out of examples) is a zero-weight dummy of example 0.
        ``shape``: the step's `shape.StepShape` in a warm-up (examples cropped to its length)."""
        self.collator.set_epoch(mask_epoch)
        scheduled = self.schedule(position, shape)
        crop = shape.length if shape is not None and shape.length < self.max_length else None
        batches, computed, real, flops = [], 0, 0, 0.0
        source_tokens = [0] * self.num_sources if self.num_sources else None
        for micro in micro_batches:
            items, rows = micro_layout(micro)
            static = self.static
            if not items:  # this process ran out of examples: a zero-weight dummy
                batch = drop_targets(self.collator(
                    fetch([0]), rows=static.fill_rows([[0]]) if static else None))
            else:
                examples = fetch(items) if fetch is not None else items
                if crop is not None:
                    examples = [crop_example(e, crop) for e in examples]
                batch = self.collator(examples, rows=static.fill_rows(rows) if static else rows)
                real += int(batch["num_real_tokens"])
                lengths = [min(len(e["input_ids"]), self.max_length) for e in examples]
                if self.flop_counter is not None:
                    flops += self.flop_counter.step_flops(
                        lengths, int(batch["num_masked_tokens"]), self.sparse_head)
                if source_tokens is not None:
                    for e, n in zip(examples, lengths):
                        source_tokens[e["source"]] += n
            if static:
                static.fix(batch)
            else:
                add_masked_positions(batch, self.positions_multiple)
            computed += batch["input_ids"].numel()
            batches.append(batch)
        return PreparedStep(position, batches, computed, real, flops, source_tokens, scheduled)


# The per-token keys an example may carry, cut alike when it is cropped.
CROPPED_KEYS = ("input_ids", "special_tokens_mask", "attention_mask", "token_type_ids")


def crop_example(example: dict, length: int) -> dict:
    """``example`` (a dict) cropped to its first ``length`` tokens, as the collator truncates
    at ``max_length`` (a copy; the example itself is left as it is)."""
    if len(example["input_ids"]) <= length:
        return example
    return {k: v[:length] if k in CROPPED_KEYS and v is not None else v
            for k, v in example.items()}


class PlannedSteps(torch.utils.data.IterableDataset):
    """Every step of ``plan`` (a `plans.TrainPlan` over ``examples``) from ``position`` (a
    `checkpoint.DataPosition`) to the end of ``num_epochs`` epochs, made ready by ``preparer``
    (a `StepPreparer`). In a DataLoader worker, only that worker's share of the steps. The run's
    step that begins the position's epoch is ``position.done - position.step`` (what the
    plan's warm-up cuts from: `plans.TrainPlan.epoch_steps`)."""

    def __init__(self, examples, preparer: StepPreparer, *, plan, position: DataPosition,
                 num_epochs: int):
        self.examples, self.preparer, self.plan = examples, preparer, plan
        self.position, self.num_epochs = position, num_epochs

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k, begins = 0, self.position.done - self.position.step
        for epoch in range(self.position.epoch, self.num_epochs):
            batches, shapes = self.plan.epoch_steps(epoch, begins)
            first = self.position.step if epoch == self.position.epoch else 0
            for step_in_epoch in range(first, len(batches)):
                if k % workers == worker:
                    done = begins + step_in_epoch + 1
                    yield self.preparer(self.plan.split(batches[step_in_epoch]),
                                        DataPosition(epoch, step_in_epoch + 1, done=done),
                                        mask_epoch=epoch, fetch=self.examples.fetch,
                                        shape=shapes[step_in_epoch] if shapes else None)
                k += 1
            begins += len(batches)


class StreamSteps(torch.utils.data.IterableDataset):
    """Prepared steps from the stream of ``examples`` (`StreamExamples`) as ``plan`` (a
    `plans.StreamPlan`) cuts it, from ``position`` (a `checkpoint.DataPosition`) on, made ready by
    ``preparer`` (a `StepPreparer`); see the module doc. Each step's ``position`` is the
    one to resume from after it. Iterated by one process (inline or one DataLoader worker: its
    order is its state)."""

    def __init__(self, examples: StreamExamples, preparer: StepPreparer, *, plan,
                 position: DataPosition):
        self.examples, self.preparer, self.plan = examples, preparer, plan
        self.position = position

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError("StreamSteps is read by one worker at most (its order is its state)")
        skip, done = self.position.step, self.position.done
        begins = done - skip  # the run's step that began the position's window
        for start, steps in self.windows():
            for k, units in enumerate(steps):
                if k >= skip:
                    done += 1
                    yield self._prepare(units, start, k, done, self.plan.step_shape(begins, k))
            skip, begins = 0, begins + len(steps)

    def windows(self):
        """Yield ``(window's start position, its steps of units)`` from ``position`` on; a unit
        is a packed row (a list of examples) or one example."""
        stream = self.position.stream
        start = StreamPosition.from_dict(stream) if stream else StreamPosition()
        reader = self.examples.at(start)
        for steps, carry in self.plan.windows(reader, start.carry, start.window,
                                              self.position.done - self.position.step):
            yield start, steps
            start = StreamPosition(*reader.position(), carry=carry, window=start.window + 1)

    def _prepare(self, units: list, start: StreamPosition, k: int, done: int,
                 shape: StepShape | None) -> PreparedStep:
        micro_batches = self.plan.split(units)
        newest = max(e["idx"] for micro in micro_batches for e in micro_layout(micro)[0])
        # epoch: the pass of the step's newest example; then the window's k + 1 steps are done
        position = DataPosition(newest >> PASS_SHIFT, k + 1, start.to_dict(), done)
        # stream masks are keyed by the example id, which holds the pass: one mask epoch
        return self.preparer(micro_batches, position, mask_epoch=0, shape=shape)


@dataclass
class RunSteps:
    """The run's training steps, assembled once, by the recipe's builders in the recipe's order:
    ``shape`` (`shape.run_shape`), the train ``collator`` (`MaskedLMCollator.from_config`),
    ``schedule`` (`plans.plan_schedule`: the plan and the run's length) and the LR ``scheduler``
    (`optim.build_scheduler`, on the prepared optimizer); `prefetcher` then hands out the steps
    from a data position: `PlannedSteps` over the schedule's plan, or under ``--streaming``
    `StreamSteps` (read, tokenized and packed on the fly), both made ready by one `StepPreparer`.
    What the recipe, the benchmarks, the GPU checks and the step tests train on."""
    cfg: MLMConfig
    training: Training
    tokenizer: Any
    data: RunData
    shape: RunShape
    collator: MaskedLMCollator
    schedule: Schedule
    scheduler: Any
    process_index: int
    num_processes: int
    on_gpu: bool

    @classmethod
    def build(cls, cfg: MLMConfig, accelerator, training: Training, tokenizer, data, *,
              padding: str) -> "RunSteps":
        """This process's steps over ``data`` (a `run.RunData`, or one process's
        `corpus.IndexedExamples`, then also its validation set) with ``padding`` resolved."""
        if not isinstance(data, RunData):
            data = RunData(data, data, frozenset(), DataRepairs())
        rank, world = accelerator.process_index, accelerator.num_processes
        on_gpu = accelerator.device.type == "cuda"
        shape = run_shape(cfg, num_processes=world, on_gpu=on_gpu, padding=padding)
        collator = MaskedLMCollator.from_config(
            tokenizer, cfg, position_offset=training.position_offset, padding=padding,
            attn_implementation=training.attn_implementation,
            pad_to_multiple_of=shape.pad_to_multiple_of)
        schedule = plan_schedule(cfg, data.train, padding=padding, num_processes=world,
                                 process_index=rank)
        scheduler = build_scheduler(training.optimizer, cfg, schedule.max_steps)
        return cls(cfg, training, tokenizer, data, shape, collator, schedule, scheduler, rank,
                   world, on_gpu)

    def source(self, position: DataPosition | None = None):
        """The steps from ``position`` (default: the start): `PlannedSteps` or `StreamSteps`."""
        cfg, training, position = self.cfg, self.training, position or DataPosition()
        preparer = StepPreparer(self.collator, max_length=cfg.max_seq_length,
                                flop_counter=training.flop_counter,
                                sparse_head=training.inner.sparse_prediction,
                                positions_multiple=self.shape.positions_multiple,
                                num_sources=len(cfg.mixture_files),
                                static=StaticShapes.for_run(cfg, self.shape),
                                ramps=self.schedule.ramps)
        if cfg.streaming:
            examples = StreamExamples(cfg, self.tokenizer, process_index=self.process_index,
                                      num_processes=self.num_processes,
                                      exclude=self.data.stream_exclude)
            return StreamSteps(examples, preparer, plan=self.schedule.plan, position=position)
        return PlannedSteps(self.data.train, preparer, plan=self.schedule.plan,
                            position=position, num_epochs=self.schedule.num_epochs)

    def prefetcher(self, position: DataPosition | None = None) -> "Prefetcher":
        """The steps from ``position``, prepared ahead by the run's workers (pinned on a GPU)."""
        workers = self.shape.workers
        return Prefetcher(self.source(position), num_workers=workers,
                          pin_memory=workers > 0 and self.on_gpu)


def _identity(item):
    return item


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A worker ignores SIGTERM and SIGINT: a launcher that signals the whole process tree
    (Accelerate >= 1.16's one-process launcher), or Ctrl-C's process group, must not kill it
    under the step in flight; the main process stops the run and `Prefetcher.close` the workers."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class Prefetcher:
    """Hands out the items of ``steps`` (an iterable dataset): inline with ``num_workers=0``,
    else from a DataLoader's worker processes, ``prefetch_factor`` items ahead per worker and
    pinned with ``pin_memory``. ``next()`` returns ``(item, seconds waited)``; an exception in a
    worker is raised here; `close` stops the workers (call it when the loop ends early)."""

    def __init__(self, steps, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2):
        if num_workers > 0:
            loader = torch.utils.data.DataLoader(
                steps, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                prefetch_factor=prefetch_factor, collate_fn=_identity,
                worker_init_fn=_leave_stop_signals_to_the_main_process)
            self._items = iter(loader)
        else:
            self._items = iter(steps)

    def next(self):
        """The next item and the seconds the caller waited for it; StopIteration at the end."""
        t0 = time.perf_counter()
        item = next(self._items)
        return item, time.perf_counter() - t0

    def close(self) -> None:
        self._items = iter(())  # drops the DataLoader iterator: its workers shut down
