"""Batch plans: which examples every process sees in every micro-batch of every step.

The plan is computed, not sampled on the fly, so it is reproducible (a function of seed, epoch
and the dataset's lengths), distributed-aware without a DistributedSampler, and resumable at any
step. Every process computes the same global plan and takes its own slice.

One optimizer step consumes one *global batch* of ``per_device_batch_size x grad_accum x
num_processes`` examples, split into ``grad_accum x num_processes`` micro-batches. The last global
batch of an epoch may be short: it is split as evenly as possible, and a process whose micro-batch
comes out empty runs a *dummy* micro-batch (returned as an empty list) that contributes no loss and
no gradient. Every process therefore runs the same number of forward passes (ZeRO-3 needs this),
every example is seen exactly once per epoch, and because the loss is normalised by the global
count of masked tokens, uneven micro-batches weigh exactly as they should.

With ``pack_capacity`` (``--padding packed``) a batch counts *rows* of ``pack_capacity`` tokens,
not examples: the shuffled order is packed window by window (about ``layout.WINDOW_STEPS`` global
batches of examples at a time) with the collator's best-fit packer (`layout.WindowPacker`, the
stream's window loop too); the fullest rows are emitted in a shuffled order and the examples of
the least-full leftover rows are carried into the next window, so rows stay nearly full (pad
fraction ~1% on the embedded corpus). A micro-batch is then a list of
rows (lists of example indices), which the collator lays out exactly as planned.

With ``token_budget`` (``--per_device_train_tokens`` with padded rows) a micro-batch is not a
count: the planner's order (shuffled, or with ``group_by_length`` its sorted mega-batches) is cut
greedily into micro-batches, each as many examples as fit with ``rows x padded width <= budget``
(the width the collator pads to: the longest, rounded up to ``pad_to_multiple_of``; at least one
example), and every ``grad_accum x num_processes`` micro-batches form a step; a short last step
gives its missing micro-batches to dummies. Still a pure function of (seed, epoch, lengths), so
resume is exact as before; sorted mega-batches give few distinct shapes.

With ``group_by_length`` the shuffled order is cut into mega-batches of 50 global batches, each
sorted by length (longest first) and cut into global batches, whose order is then shuffled again:
micro-batches hold examples of similar length (little padding), while the step order stays random.

With warm-ups (``ramps``: ``--seq_len_warmup_steps``, ``--batch_warmup_steps``) an epoch that
begins during one is cut step by step (`TrainPlan.epoch_steps`, given the run's step that begins
it; `warmup.py`): the same order, each step at its `shape.StepShape`; later epochs as without.
Still a pure function of (seed, epoch, lengths, the epoch's first step); the run's length
(`Schedule`, and the LR schedule's) counts the epochs' real steps.

Under ``--streaming`` there is no global plan: `StreamPlan` cuts each process's own stream into
steps a window at a time with the same window loop (see `streaming.py`), in a warm-up each
window at the shape of its first step. `plan_schedule` builds
either plan and the run's length (`Schedule`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlmkit.batch.layout import WindowPacker, round_up
from mlmkit.config.shape import Ramps, StepShape, micro_batch
from mlmkit.data.warmup import cut_budget, cut_counts, shaped_windows, window_steps

MEGABATCH_MULT = 50


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


class TrainPlan:
    def __init__(self, lengths, *, per_device_batch_size: int, grad_accum: int,
                 num_processes: int, process_index: int, seed: int, group_by_length: bool = False,
                 pack_capacity: int | None = None, token_budget: int | None = None,
                 max_length: int | None = None, pad_to_multiple_of: int | None = None,
                 ramps: Ramps | None = None):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.per_device_batch_size = per_device_batch_size
        self.grad_accum = grad_accum
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.group_by_length = group_by_length
        self.pack_capacity = pack_capacity
        self.token_budget = None if pack_capacity is not None else token_budget
        self.max_length, self.pad_to_multiple_of = max_length, pad_to_multiple_of
        # examples per step, or rows per step when packing
        self.global_batch_size = per_device_batch_size * grad_accum * num_processes
        self.ramps = ramps if ramps is not None and ramps.shaped else None
        self._len: int | None = None
        self._ramped: list[int] | None = None

    def __len__(self) -> int:
        """Optimizer steps per epoch (the last one may be short)."""
        if self.pack_capacity is None and self.token_budget is None:
            return -(-len(self.lengths) // self.global_batch_size)
        if self._len is None:  # packing (budgets) decide the steps; about the same every epoch
            self._len = len(self.global_batches(0))
        return self._len

    def global_batches(self, epoch: int) -> list:
        rng = _rng(self.seed, epoch)
        order = rng.permutation(len(self.lengths))
        gbs = self.global_batch_size
        if self.pack_capacity is not None:
            return self._packed_batches(order, rng)
        if self.token_budget is not None:
            return self._budget_batches(order, rng)
        if not self.group_by_length:
            return [order[i:i + gbs] for i in range(0, len(order), gbs)]
        mega = gbs * MEGABATCH_MULT
        batches: list[np.ndarray] = []
        for start in range(0, len(order), mega):
            chunk = order[start:start + mega]
            # stable sort, longest first: a pure function of (seed, epoch, lengths)
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + gbs] for i in range(0, len(chunk), gbs)]
        # Shuffle whole batches, keeping the short tail batch last so that only the final step
        # of an epoch can be uneven.
        full = [b for b in batches if len(b) == gbs]
        tail = [b for b in batches if len(b) < gbs]
        return [full[i] for i in rng.permutation(len(full))] + tail

    def epoch_steps(self, epoch: int, first: int = 0) -> tuple[list, list[StepShape] | None]:
        """``(global batches, their StepShapes)`` of ``epoch`` when the run's step ``first``
        (0-based) begins it; the shapes are None (full steps) unless it begins in a warm-up."""
        ramps = self.ramps
        if ramps is None or first >= ramps.warmup_end:
            return self.global_batches(epoch), None
        n_micro, per = self.grad_accum * self.num_processes, self.per_device_batch_size
        if self.pack_capacity is not None:  # the same windows, a packer a window
            rng, steps, shapes = _rng(self.seed, epoch), [], []
            lengths = np.minimum(self.lengths, self.pack_capacity).tolist()
            for window, _, window_shapes in shaped_windows(
                    _Order(rng.permutation(len(self.lengths))), [], ramps, first, full=per,
                    multiple=n_micro, packed=True, length=lambda i, cap: min(lengths[i], cap),
                    rng=lambda _: rng):
                steps += window
                shapes += window_shapes
            return steps, shapes
        standard = self.global_batches(epoch)  # its order, cut again
        if self.token_budget is None:
            return cut_counts([int(x) for batch in standard for x in batch], ramps, first,
                              full=per, micro_batches=n_micro)
        return cut_budget([x for step in standard for micro in step for x in micro],
                          self.lengths, ramps, first, budget=self.token_budget,
                          micro_batches=n_micro, pad_to_multiple_of=self.pad_to_multiple_of)

    def _ramped_epochs(self) -> list[int]:
        """The real lengths of the epochs that begin during the warm-up, from epoch 0."""
        if self._ramped is None:
            lengths, first = [], 0
            while self.ramps is not None and first < self.ramps.warmup_end:
                lengths.append(len(self.epoch_steps(len(lengths), first)[0]))
                first += lengths[-1]
            self._ramped = lengths
        return self._ramped

    def steps_for_epochs(self, epochs: float) -> int:
        """The optimizer steps of ``epochs`` (fractional: the last one's share) passes."""
        if self.ramps is None:
            return math.ceil(epochs * len(self))
        ramped, whole = self._ramped_epochs(), int(epochs)
        lengths = ramped + [len(self)] * max(0, whole + 1 - len(ramped))
        return sum(lengths[:whole]) + math.ceil((epochs - whole) * lengths[whole])

    def epochs_for_steps(self, steps: int) -> int:
        """The epochs that ``steps`` optimizer steps reach into."""
        if self.ramps is None:
            return math.ceil(steps / len(self))
        done = 0
        for e, n in enumerate(self._ramped_epochs()):
            if done >= steps:
                return e
            done += n
        return len(self._ramped_epochs()) + max(0, math.ceil((steps - done) / len(self)))

    def epochs_done(self, steps: int) -> float:
        """Passes over the data after ``steps`` optimizer steps (the ``epoch`` metric)."""
        ramped = self._ramped_epochs() if self.ramps is not None else []
        for e, n in enumerate(ramped):
            if steps < n:
                return e + steps / n
            steps -= n
        return len(ramped) + steps / len(self)

    def _packed_batches(self, order: np.ndarray, rng: np.random.Generator) -> list[list[list[int]]]:

        # the collator truncates to the row length
        lengths = np.minimum(self.lengths, self.pack_capacity).tolist()
        packer = WindowPacker(self.global_batch_size, self.pack_capacity,
                              length=lengths.__getitem__)
        return [batch for steps, _ in packer.windows(_Order(order), rng=lambda _: rng)
                for batch in steps]

    def _budget_batches(self, order: np.ndarray, rng: np.random.Generator) -> list[list[list[int]]]:
        """Steps of ``grad_accum x num_processes`` micro-batches, each filled to the token
        budget (the short last step holds fewer)."""

        lengths = np.minimum(self.lengths, self.max_length or np.iinfo(np.int64).max).tolist()
        n_micro = self.grad_accum * self.num_processes
        chunks = [order]
        if self.group_by_length:  # mega-batches of 50 nominal steps, each sorted, longest first
            mega = self.global_batch_size * MEGABATCH_MULT
            chunks = [c[np.argsort(-self.lengths[c], kind="stable")]
                      for c in (order[i:i + mega] for i in range(0, len(order), mega))]
        micros: list[list[int]] = []
        for chunk in chunks:
            micro, widest = [], 0
            for i in chunk.tolist():
                width = round_up(max(widest, lengths[i]), self.pad_to_multiple_of)
                if micro and (len(micro) + 1) * width > self.token_budget:
                    micros.append(micro)
                    micro, widest = [], 0
                micro.append(i)
                widest = max(widest, lengths[i])
            micros += [micro] if micro else []
        steps = [micros[i:i + n_micro] for i in range(0, len(micros), n_micro)]
        if not self.group_by_length:
            return steps
        full = [s for s in steps if len(s) == n_micro]  # shuffled, the short tail last
        return [full[i] for i in rng.permutation(len(full))] + steps[len(full):]

    def split(self, global_batch) -> list[list]:
        """This process's ``grad_accum`` micro-batches of one global batch (empty = dummy).

        A micro-batch is a list of example indices, or with packing a list of rows of indices.
        """
        n_micro = self.grad_accum * self.num_processes
        if self.token_budget is not None:  # the step is its micro-batches already
            return [list(global_batch[c]) if c < len(global_batch) else []
                    for c in (g * self.num_processes + self.process_index
                              for g in range(self.grad_accum))]
        items = list(global_batch)
        per = len(items) // n_micro
        extra = len(items) % n_micro  # the first `extra` chunks get one more (array_split's rule)
        bounds = [g * per + min(g, extra) for g in range(n_micro + 1)]
        # micro-batch g of process r is chunk g * num_processes + r
        out = []
        for g in range(self.grad_accum):
            c = g * self.num_processes + self.process_index
            out.append([_plain(x) for x in items[bounds[c]:bounds[c + 1]]])
        return out

    def epoch(self, epoch: int, start_step: int = 0, first: int = 0):
        """Yield ``(step_in_epoch, micro_batches)`` from ``start_step`` on (resume skips ahead);
        ``first``: the run's step that begins the epoch (`epoch_steps`)."""
        for step, gb in enumerate(self.epoch_steps(epoch, first)[0]):
            if step >= start_step:
                yield step, self.split(gb)


class _Order:
    """An epoch's shuffled order as a `layout.WindowPacker` source: one example index a read."""

    def __init__(self, order: np.ndarray):
        self.order, self.pos = order, 0

    def read(self) -> list[int]:
        self.pos += 1
        return [int(self.order[self.pos - 1])]

    def exhausted(self) -> bool:
        return self.pos >= len(self.order)


def _plain(x):
    return [int(i) for i in x] if isinstance(x, (list, np.ndarray)) else int(x)


def micro_layout(micro_batch: list) -> tuple[list, list[list[int]] | None]:
    """``(items, rows as positions into them, or None)`` of a micro-batch of a plan or a stream:
    a list of items (example indices or examples), or with packing a list of rows of them."""
    if micro_batch and isinstance(micro_batch[0], list):
        items = [i for row in micro_batch for i in row]
        rows, start = [], 0
        for row in micro_batch:
            rows.append(list(range(start, start + len(row))))
            start += len(row)
        return items, rows
    return micro_batch, None


def eval_plan(n: int, batch_size: int, num_processes: int, process_index: int) -> list[list[int]]:
    """Shard ``range(n)`` into this process's eval batches without duplicating any example.

    All processes get the same number of batches; where a process runs out, it gets an empty
    (dummy) batch, which the caller runs with zero weight.
    """
    shard = list(range(process_index, n, num_processes))
    n_batches = -(-(-(-n // num_processes)) // batch_size)  # ceil(ceil(n / P) / B)
    return [shard[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


@dataclass(frozen=True)
class StreamPlan:
    """How a stream becomes this process's steps (`streaming.StreamSteps` reads it): windows of
    about ``layout.WINDOW_STEPS`` steps' worth of examples (`layout.WindowPacker`, as the packed
    `TrainPlan`), packed in rows of ``pack_capacity`` tokens or one example a unit, shuffled by
    (seed, process, window); a step is ``per_device_batch_size x grad_accum`` units of this
    process's own stream, always whole. With warm-ups (``ramps``, shaped) each window takes the
    length of its first step, its steps their own batch (`step_shape`), as the packed
    `TrainPlan`'s do: processes cut their own windows, so their lengths may differ near a change
    (each still runs grad_accum micro-batches, and the loss is normalised globally)."""
    per_device_batch_size: int
    grad_accum: int
    process_index: int
    seed: int
    pack_capacity: int | None = None
    ramps: Ramps | None = None

    def windows(self, source, carry: list, first_window: int, first_step: int = 0):
        """Yield ``(steps of units, carried examples)`` per window of ``source`` (a
        `streaming.StreamExamples`), from window number ``first_window`` and its ``carry`` on;
        ``first_step``: the run's step that begins that window."""

        cap = self.pack_capacity
        if self.ramps is None:
            packer = WindowPacker(self.per_device_batch_size * self.grad_accum, cap,
                                  length=lambda e: min(len(e["input_ids"]), cap))
            return packer.windows(source, carry=carry,
                                  rng=lambda k: self.window_rng(first_window + k))
        return ((steps, carry) for steps, carry, _ in shaped_windows(
            source, list(carry), self.ramps, first_step, full=self.per_device_batch_size,
            multiple=self.grad_accum, packed=cap is not None,
            length=lambda e, cap: min(len(e["input_ids"]), cap),
            rng=lambda k: self.window_rng(first_window + k)))

    def window_rng(self, window: int) -> np.random.Generator:
        """The generator that shuffles window number ``window`` of this process."""
        return np.random.default_rng([self.seed, self.process_index, window])

    def step_shape(self, begins: int, k: int) -> StepShape | None:
        """The `shape.StepShape` of step ``k`` of a window begun at the run's step ``begins``
        (None: full steps)."""
        if self.ramps is None:
            return None
        return window_steps(self.ramps, begins, k, self.per_device_batch_size)

    def split(self, step: list) -> list[list]:
        """The ``grad_accum`` micro-batches of one step (see `micro_layout`)."""
        per = self.per_device_batch_size if self.ramps is None else \
            -(-len(step) // self.grad_accum)  # a warm-up's step: its own units
        return [step[g * per:(g + 1) * per] for g in range(self.grad_accum)]


@dataclass
class Schedule:
    """How long the run trains: ``max_steps`` optimizer steps, this process's ``plan`` and, for
    map-style data, the ``num_epochs`` it spans (``--streaming``: a `StreamPlan`, no epochs);
    ``ramps``: the per-step schedules over those steps (`shape.Ramps`)."""
    plan: TrainPlan | StreamPlan
    max_steps: int
    num_epochs: int | None
    ramps: Ramps | None = None

    def describe(self, cfg, shape, padding: str, sparse_head: bool, num_processes: int) -> str:
        """The log's ``train:`` line (``shape``: `config.RunShape`)."""
        per_device = (f"{shape.micro_batch_size} per device" if shape.micro_batch_tokens is None
                      else f"as many as fit in {shape.micro_batch_tokens} padded tokens, at "
                      f"least {shape.micro_batch_size}, per device")
        at_least = "at least " if shape.micro_batch_tokens is not None else ""
        ramps = []
        if cfg.mlm_probability_final is not None:
            ramps.append(f"mask rate {cfg.mlm_probability} -> {cfg.mlm_probability_final}")
        if cfg.seq_len_warmup_steps:
            ramps.append(f"length {cfg.seq_len_warmup_start} -> {cfg.max_seq_length} over "
                         f"{cfg.seq_len_warmup_steps} steps")
        if cfg.batch_warmup_steps:
            ramps.append(f"batch warm-up over {cfg.batch_warmup_steps} steps")
        return (f"train: {self.max_steps} steps x {at_least}{shape.global_batch_size} "
                f"{shape.unit} ({per_device} x "
                f"{cfg.gradient_accumulation_steps} accumulation x {num_processes} processes), "
                f"padding={padding}, mask_padding={cfg.mask_padding}, "
                f"sparse_prediction={sparse_head}" + "".join(f", {r}" for r in ramps))

    def where(self, state) -> str:
        """Where the data stands in ``state`` (a `checkpoint.TrainState`), for the log."""
        if self.num_epochs is None:
            return f"pass {state.epoch} of the stream"
        return f"epoch {state.epoch}, batch {state.step_in_epoch} of it"

    def epoch_at(self, step: int, data_epoch: int) -> float:
        """The ``epoch`` metric after ``step`` steps (the stream's pass when streaming)."""
        return data_epoch if self.num_epochs is None else self.plan.epochs_done(step)


def plan_schedule(cfg, examples, *, padding: str, num_processes: int,
                  process_index: int) -> Schedule:
    """The plan over map-style ``examples`` (`data.IndexedExamples`; None: streaming, a
    `StreamPlan`) and the run's length."""

    pack_capacity = cfg.max_seq_length if padding == "packed" else None
    micro, budget = micro_batch(cfg, padding)  # --per_device_train_batch_size or _tokens
    ramps = Ramps.from_config(cfg)
    if examples is None:
        return Schedule(StreamPlan(micro, cfg.gradient_accumulation_steps, process_index,
                                   cfg.seed, pack_capacity, ramps if ramps.shaped else None),
                        cfg.max_train_steps, None, ramps.over(cfg.max_train_steps))
    plan = TrainPlan(examples.lengths, per_device_batch_size=micro,
                     grad_accum=cfg.gradient_accumulation_steps, num_processes=num_processes,
                     process_index=process_index, seed=cfg.seed,
                     group_by_length=cfg.group_by_length,
                     pack_capacity=pack_capacity, token_budget=budget,
                     max_length=cfg.max_seq_length, pad_to_multiple_of=cfg.pad_to_multiple_of,
                     ramps=ramps)
    # the warm-ups' real step counts: the LR schedule spans the steps the run takes
    max_steps = cfg.max_train_steps or plan.steps_for_epochs(cfg.num_train_epochs)
    return Schedule(plan, max_steps, plan.epochs_for_steps(max_steps), ramps.over(max_steps))
