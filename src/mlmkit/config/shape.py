"""`run_shape`: the settings that follow, once, from the config, the launch and the resolved
padding (workers, collator widths, global batch), and `micro_batch`, the one reading of the
micro-batch flags."""

from __future__ import annotations

from dataclasses import dataclass

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
        pad_to_multiple_of=cfg.max_seq_length if cfg.torch_compile and packed
        else cfg.pad_to_multiple_of,
        # CUDA graphs (reduce-overhead, max-autotune): few distinct shapes of masked positions
        positions_multiple=POSITIONS_MULTIPLE if cfg.torch_compile
        and cfg.torch_compile_mode in GRAPHED_COMPILE_MODES else None,
        global_batch_size=micro * cfg.gradient_accumulation_steps * num_processes,
        unit="rows" if packed else "examples", micro_batch_size=micro, micro_batch_tokens=budget)
