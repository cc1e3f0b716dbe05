"""`run_shape`: the settings that follow, once, from the config, the launch and the resolved
padding (workers, collator widths, global batch), `micro_batch`, the one reading of the
micro-batch flags, and `Ramps`, the run's per-step schedules (mask rate, sequence length, batch
size), pure functions of the step."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mlmkit.config.choices import GRAPHED_COMPILE_MODES
from mlmkit.config.fields import MLMConfig


@dataclass(frozen=True)
class RunShape:
    """Settings derived from the config, the launch and the resolved padding, computed once."""
    workers: int                    # DataLoader workers that prepare steps ahead
    pad_to_multiple_of: int | None  # train collator's width multiple (compile+packed: fixed)
    positions_multiple: int | None  # masked positions padded to a multiple (CUDA-graph friendly)
    global_batch_size: int          # examples (or packed rows) per optimizer step, all processes
    unit: str                       # "rows" when packed, else "examples"
    micro_batch_size: int           # examples (rows) per device per micro-batch; with
    #                                 micro_batch_tokens, the count at full width (a lower bound)
    micro_batch_tokens: int | None  # padded map-style --per_device_train_tokens: the plan fills
    #                                 each micro-batch to rows x padded width <= this


# Masked positions are padded (with "no target") to a multiple of this for compiled steps: few
# shapes under CUDA graphs (`RunShape.positions_multiple`), and the step of a static-shape run
# that outgrows its capacity takes the next multiple (`steps.StaticShapes`).
POSITIONS_MULTIPLE = 256


def micro_batch(cfg: MLMConfig, padding: str | None = None) -> tuple[int, int | None]:
    """``(examples or rows per device per micro-batch, padded token budget or None)`` of ``cfg``
    under the resolved ``padding`` (None: not yet known; the count is then the one every layout
    reaches). The one reading of --per_device_train_batch_size / --per_device_train_tokens.

    Tokens, packed: ``N // max_seq_length`` rows. Tokens, padded: rows vary with the width, so
    the map-style plan (`plans.TrainPlan`) fills each micro-batch to ``N``; ``--padding
    max_length`` (width always max_seq_length) and streams take the count that always fits,
    ``N // max_seq_length``."""
    tokens = cfg.per_device_train_tokens
    if tokens is None:
        return cfg.per_device_train_batch_size, None
    fits = tokens // cfg.max_seq_length
    budget = padding == "longest" and not cfg.streaming
    return fits, tokens if budget else None


def run_shape(cfg: MLMConfig, *, num_processes: int, on_gpu: bool, padding: str) -> RunShape:
    """The `RunShape` of a run of ``cfg`` on ``num_processes`` processes, with ``padding`` the
    resolved layout (``probe.resolve_padding``: never "auto")."""
    workers = cfg.dataloader_num_workers if cfg.dataloader_num_workers is not None else \
        (2 if on_gpu else 0)
    if cfg.streaming:  # one process reads the stream (its order is its state): one worker at most
        workers = min(workers, 1)
    packed = padding == "packed"
    micro, budget = micro_batch(cfg, padding)
    return RunShape(
        workers=workers,
        # compiled + packed: rows at a fixed (rows, max_seq_length) shape, so the graph is static
        # (not while the length warms up: rows are shorter then)
        pad_to_multiple_of=cfg.max_seq_length if cfg.torch_compile and packed
        and not cfg.seq_len_warmup_steps else cfg.pad_to_multiple_of,
        # CUDA graphs (reduce-overhead, max-autotune): few distinct shapes of masked positions
        positions_multiple=POSITIONS_MULTIPLE if cfg.torch_compile
        and cfg.torch_compile_mode in GRAPHED_COMPILE_MODES else None,
        global_batch_size=micro * cfg.gradient_accumulation_steps * num_processes,
        unit="rows" if packed else "examples", micro_batch_size=micro, micro_batch_tokens=budget)


# Lengths during --seq_len_warmup_steps are rounded down to a multiple of this (never below the
# start length, never above max_seq_length): a handful of shapes, each held for many steps.
SEQ_LEN_MULTIPLE = 64


@dataclass(frozen=True)
class StepShape:
    """What one step of a warm-up holds: examples cropped to their first ``length`` tokens
    (packed rows of ``length``), and ``fraction`` of a full step's examples, rows or tokens at
    that length (train/seq_length, train/batch_fraction)."""
    length: int
    fraction: float


@dataclass(frozen=True)
class Ramps:
    """The run's per-step schedules, pure functions of a step's index ``t`` (0: the run's first
    optimizer step), so a resumed run takes the very values the uninterrupted one took.

    * Mask rate (``--mlm_probability_final``): linear from ``mlm_start`` at ``t = 0`` to
      ``mlm_final`` at the last of ``total_steps`` (the schedule's length, set once it is known).
    * Length (``--seq_len_warmup_steps`` N, ``--seq_len_warmup_start`` L0): linear from L0 to
      ``max_length`` over the first N steps, rounded down to `SEQ_LEN_MULTIPLE` (at least L0);
      ``max_length`` from step N on. A step at length L holds ``max_length / L`` times the rows
      (the same tokens).
    * Batch (``--batch_warmup_steps`` N): step ``t < N`` takes ``(t + 1) / N`` of a full step's
      units (examples or rows per micro-batch, at least 1; a token budget's tokens).
    """
    max_length: int
    length_start: int | None = None
    length_steps: int = 0
    batch_steps: int = 0
    mlm_start: float = 0.15
    mlm_final: float | None = None
    total_steps: int = 1

    @classmethod
    def from_config(cls, cfg: MLMConfig, total_steps: int = 1) -> "Ramps":
        return cls(cfg.max_seq_length, cfg.seq_len_warmup_start, cfg.seq_len_warmup_steps,
                   cfg.batch_warmup_steps, cfg.mlm_probability, cfg.mlm_probability_final,
                   total_steps)

    def over(self, total_steps: int) -> "Ramps":
        """These schedules for a run of ``total_steps`` steps."""
        return replace(self, total_steps=total_steps)

    @property
    def shaped(self) -> bool:
        """Whether the steps' shapes warm up (length or batch): the plan cuts them so."""
        return bool(self.length_steps or self.batch_steps)

    @property
    def warmup_end(self) -> int:
        """The first step at full shape."""
        return max(self.length_steps, self.batch_steps)

    def seq_length(self, t: int) -> int:
        if t >= self.length_steps:
            return self.max_length
        start = self.length_start
        linear = start + (self.max_length - start) * t // self.length_steps
        return min(self.max_length, max(start, linear // SEQ_LEN_MULTIPLE * SEQ_LEN_MULTIPLE))

    def _fraction(self, t: int) -> tuple[int, int]:
        return (t + 1, self.batch_steps) if t < self.batch_steps else (1, 1)

    def units(self, t: int, full: int, length: int | None = None) -> int:
        """Examples or rows per micro-batch of step ``t``, ``full`` of them at full shape
        (``length``: at that length instead of the step's own, e.g. its window's)."""
        num, den = self._fraction(t)
        return max(1, full * self.max_length * num // ((length or self.seq_length(t)) * den))

    def budget(self, t: int, full: int) -> int:
        """The padded-token budget of a micro-batch of step ``t`` (``full`` at full shape)."""
        num, den = self._fraction(t)
        return max(1, full * num // den)

    def shape(self, t: int, full: int, *, tokens: bool = False,
              length: int | None = None) -> StepShape:
        """Step ``t``'s `StepShape`: ``full`` units per micro-batch at full shape (``tokens``:
        a token budget; ``length``: at that length, as `units`)."""
        length = length or self.seq_length(t)
        if tokens:
            return StepShape(length, self.budget(t, full) / full)
        return StepShape(length, self.units(t, full, length) /
                         max(1, full * self.max_length // length))

    def mlm_probability(self, t: int) -> float:
        """The training mask rate of step ``t``."""
        span = max(self.total_steps - 1, 1)
        if self.mlm_final is None or t >= span:
            return self.mlm_start if self.mlm_final is None else self.mlm_final
        return self.mlm_start + (self.mlm_final - self.mlm_start) * max(t, 0) / span
