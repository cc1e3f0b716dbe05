"""What is logged, computed in one place: the running statistics of a span of steps and their
rates (`RunningStats`: tokens/s, padding, TFLOP/s, MFU, data wait), the GPU's busy fraction
(`BusyClock`), one log line's metrics (`train_metrics`), the mixture's entries and the run's
summary (`build_summary`), peak memory and perplexity.

The metric names are `mlmkit.config.keys` (re-exported by `tracking`, where the records are
written); a new logged metric is computed here and named there. Nothing here imports torch at
module level: the checkpoints (`TrainState` holds two `RunningStats`) load before the heavy
libraries.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from mlmkit.config.keys import (
    DATA_MIXTURE,
    DATA_SOURCE_SHARE,
    DATA_SOURCE_TOKENS,
    EPOCH,
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    EVAL_PROBE_ACCURACY,
    EVAL_PROBE_ACCURACY_UNMASKED,
    EVAL_PSEUDO_PERPLEXITY,
    FILL_MASK,
    FIRST,
    FIRST_EVAL_LOSS,
    FIRST_EVAL_PERPLEXITY,
    NUM_PROCESSES,
    STEP,
    SYS_PEAK_MEM_GB,
    TRAIN_DATA_WAIT_FRACTION,
    TRAIN_EXAMPLES_SEEN,
    TRAIN_GPU_BUSY_FRACTION,
    TRAIN_GRAD_NORM,
    TRAIN_LOSS,
    TRAIN_LR,
    TRAIN_MASKED_TOKENS,
    TRAIN_MFU,
    TRAIN_PAD_FRACTION,
    TRAIN_PEAK_TFLOPS,
    TRAIN_REAL_TOKENS_PER_S,
    TRAIN_RUNTIME,
    TRAIN_TFLOPS,
    TRAIN_TOKENS_PER_S,
    TRAIN_TOKENS_SEEN,
)


@dataclass
class RunningStats:
    """Sums over a span of optimizer steps -- one log window, or the whole run.

    ``computed`` counts every position this process computed (padding and dummy micro-batches
    included) and ``real`` its real tokens: ``train/tokens_per_s``, ``train/real_tokens_per_s``
    and ``train/pad_fraction`` come from them. ``masked`` and ``loss_sum`` (loss x masked tokens)
    are global (all processes), so ``mean_loss`` is the token-weighted mean over the span.
    ``flops`` (this process's model FLOPs, `flops.FlopCounter`) gives ``train/tflops`` and
    ``train/mfu``; ``data_wait`` (seconds the loop waited for a prepared step) gives
    ``train/data_wait_fraction``. ``skipped``: steps skipped for a non-finite loss or gradient
    norm (``--skip_nonfinite_steps``, `add_skipped`): their time counts, their loss does not.
    """
    computed: int = 0
    real: int = 0
    masked: int = 0
    loss_sum: float = 0.0
    seconds: float = 0.0               # wall time of the training steps (data wait included)
    flops: float = 0.0
    data_wait: float = 0.0
    skipped: int = 0

    def add_data(self, computed: int, real: int, flops: float = 0.0,
                 data_wait: float = 0.0) -> None:
        self.computed += computed
        self.real += real
        self.flops += flops
        self.data_wait += data_wait

    def add_step(self, loss: float, masked: int, seconds: float) -> None:
        self.loss_sum += loss * masked
        self.masked += masked
        self.seconds += seconds

    def add_skipped(self, seconds: float) -> None:
        """A step whose update was skipped (its loss or gradient norm was not finite)."""
        self.skipped += 1
        self.seconds += seconds

    def mean_loss(self) -> float:
        """The token-weighted mean loss; NaN for a span whose every step was skipped."""
        if self.skipped and not self.masked:
            return math.nan
        return self.loss_sum / max(self.masked, 1)

    def rates(self, num_processes: int, peak_tflops: float | None = None) -> dict[str, float]:
        """Throughput over all processes (every process sees statistically the same load);
        TFLOP/s per device, and MFU against ``peak_tflops`` when it is known."""
        seconds = max(self.seconds, 1e-9)
        out = {TRAIN_TOKENS_PER_S: self.computed * num_processes / seconds,
               TRAIN_REAL_TOKENS_PER_S: self.real * num_processes / seconds,
               TRAIN_PAD_FRACTION: 1.0 - self.real / max(self.computed, 1),
               TRAIN_DATA_WAIT_FRACTION: self.data_wait / seconds}
        if self.flops:
            out[TRAIN_TFLOPS] = self.flops / seconds / 1e12
            if peak_tflops:
                out[TRAIN_MFU] = out[TRAIN_TFLOPS] / peak_tflops
        return out


class BusyClock:
    """``train/gpu_busy_fraction``: the share of wall time the GPU spends computing the steps.

    Events recorded around an eager step do not measure that: when the host is the bottleneck
    the GPU reaches the start event at once and idles between the step's kernels, so the events'
    interval is the wall time. Here one *calibration* step is queued behind a spin kernel
    (``torch.cuda._sleep``, about twice the host's time for a step): the host enqueues the whole
    step while the GPU spins, so from the event after the spin to the event after the step the
    GPU never waits for the host, and that interval is the step's pure device time. It is valid
    only if the spin outlasted the enqueueing: ``query()`` of the start event, right after the
    step is enqueued, must still say "not reached" (else the calibration is dropped and retried
    at the next step with a spin twice as long, a few times at most). The events are read by
    `StepResults.read`, after its synchronisation; nothing here synchronises.

    A calibration runs ``WARMUP`` steps into the run (allocator, kernels, compilation settled)
    and again at the step after each eval (`recalibrate`); it costs about one spin (twice a
    step's host time) of wall time. ``fraction(stats)`` for a span of steps (a
    `RunningStats`): device seconds per computed position x the span's computed
    positions / its wall seconds, at most 1 (shapes that vary are scaled by positions, an
    approximation; fixed shapes, packed rows, are exact). None (the metric absent) on CPU and
    before the first calibration is read. ``event``/``sleep``/``timer`` replace CUDA's events,
    its spin kernel and the host clock in tests.
    """
    WARMUP = 5          # steps of this run before the first calibration
    ATTEMPTS = 4        # calibrations tried in a row before waiting for the next recalibrate
    MAX_SPIN_S = 1.0    # the longest spin (a step that takes the host longer is not measured)

    def __init__(self, device, *, warmup: int = WARMUP, event=None, sleep=None,
                 timer=time.perf_counter, cycles_per_s: float = 1.5e9):
        import torch  # lazily: this module loads with the checkpoints, before the heavy libraries
        self.on = event is not None or (device is not None and torch.device(device).type == "cuda")
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._sleep = sleep or torch.cuda._sleep
        self.cycles_per_s = cycles_per_s  # the spin's clock; re-measured at every read
        self.per_position: float | None = None  # device seconds per computed position
        self._timer = timer
        self._due = warmup        # steps until the next calibration (0: this one)
        self._tries = 0           # calibrations dropped in a row
        self._host_s = math.inf   # the shortest host time of an uncalibrated step
        self._pending: tuple | None = None  # (spin, start, end, cycles, positions, valid)
        self._open: tuple | None = None

    def start(self, positions: int) -> None:
        """Before a step of ``positions`` computed positions (this process's)."""
        self._t0 = self._timer()
        self._open = None
        if not self.on or self._due > 0 or self._pending is not None or \
                not math.isfinite(self._host_s):
            return
        spin_s = min(2.0 * 2 ** self._tries * self._host_s + 1e-3, self.MAX_SPIN_S)
        cycles = int(spin_s * self.cycles_per_s)
        spin, start = self._event(), self._event()
        spin.record()
        self._sleep(cycles)  # the GPU spins while the host enqueues the step behind it
        start.record()
        self._open = (spin, start, cycles, positions)

    def stop(self) -> None:
        """After the step is enqueued."""
        host_s = self._timer() - self._t0
        if self._open is None:
            self._host_s = min(self._host_s, host_s)
            self._due -= 1
            return
        spin, start, cycles, positions = self._open
        end = self._event()
        end.record()
        # the GPU still spinning now: every kernel of the step was queued before it ran
        self._pending = (spin, start, end, cycles, positions, not start.query())
        self._open = None
        self._due = math.inf

    def recalibrate(self) -> None:
        """Calibrate again at the next step (shapes or load may have changed)."""
        self._due, self._tries = 0, 0

    def read(self) -> None:
        """Read the pending calibration's events; only after a synchronisation."""
        if self._pending is None:
            return
        spin, start, end, cycles, positions, valid = self._pending
        self._pending = None
        end.synchronize()  # already done after the read's synchronisation on this stream
        spin_ms = spin.elapsed_time(start)
        if spin_ms > 0:  # the spin's clock as measured, for the next spin's length
            self.cycles_per_s = cycles / (spin_ms / 1e3)
        if valid:
            self.per_position = start.elapsed_time(end) / 1e3 / max(positions, 1)
            self._tries = 0
        else:
            self._tries += 1
            if self._tries < self.ATTEMPTS:
                self._due = 0

    def fraction(self, stats) -> float | None:
        """The busy fraction of a span of steps (`RunningStats`), or None."""
        if self.per_position is None or stats.seconds <= 0:
            return None
        return min(1.0, self.per_position * stats.computed / stats.seconds)


def perplexity(loss: float) -> float:
    """``eval/perplexity`` of a mean loss (inf past e^50)."""
    return math.exp(loss) if loss < 50 else float("inf")


def peak_mem_gb() -> float:
    """Peak memory of this process: GPU memory allocated on CUDA, else the peak RSS."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train_metrics(window, *, lr: float, epoch: float, grad_norm: float | None,
                  num_processes: int, peak_tflops: float | None,
                  gpu_busy: float | None = None) -> dict:
    """One log line's metrics from a log window (`RunningStats`); ``gpu_busy``:
    `BusyClock.fraction` of the window (None: absent)."""
    metrics = {TRAIN_LOSS: window.mean_loss(), TRAIN_LR: lr, TRAIN_MASKED_TOKENS: window.masked,
               EPOCH: epoch, SYS_PEAK_MEM_GB: peak_mem_gb(),
               **window.rates(num_processes, peak_tflops)}
    if grad_norm is not None:
        metrics[TRAIN_GRAD_NORM] = grad_norm
    if gpu_busy is not None:
        metrics[TRAIN_GPU_BUSY_FRACTION] = gpu_busy
    return metrics


def mixture_summary(files: list[str], weights: list[float], counts: list[int]) -> dict:
    """The summary's ``data/*`` entries of a mixture (``counts``: tokens per source, summed)."""
    if not files:
        return {}
    total = max(sum(counts), 1)
    return {DATA_MIXTURE: dict(zip(files, weights)), DATA_SOURCE_TOKENS: dict(zip(files, counts)),
            DATA_SOURCE_SHARE: {f: n / total for f, n in zip(files, counts)}}


# the downstream metrics whose step-0 value the summary gives beside the final one
FIRST_DOWNSTREAM = {EVAL_PROBE_ACCURACY, EVAL_PROBE_ACCURACY_UNMASKED, EVAL_PSEUDO_PERPLEXITY}


def build_summary(state, final_eval: dict, *, num_processes: int, peak_tflops: float | None,
                  parts, fill_mask: list[dict]) -> dict:
    """``summary.json``: the final eval, the step-0 eval and the whole run's throughput (from
    ``state``, a `checkpoint.TrainState`), then ``parts`` (dicts: the data's, the padding
    decision's, the mixture's, the steps': `loop.Stepper.summary`) and the fill-mask check."""
    total = state.total
    summary = {**final_eval, FIRST_EVAL_LOSS: state.first_eval[EVAL_LOSS],
               FIRST_EVAL_PERPLEXITY: state.first_eval[EVAL_PERPLEXITY],
               TRAIN_RUNTIME: total.seconds, STEP: state.step, SYS_PEAK_MEM_GB: peak_mem_gb(),
               TRAIN_EXAMPLES_SEEN: state.examples_seen, TRAIN_TOKENS_SEEN: state.tokens_seen,
               TRAIN_MFU: None, TRAIN_PEAK_TFLOPS: peak_tflops,  # None: peak unknown
               **total.rates(num_processes, peak_tflops),      # whole-run throughput
               NUM_PROCESSES: num_processes}
    for key, value in state.first_eval.items():  # where the step-0 eval measured it (several
        base = key if key in FIRST_DOWNSTREAM else key.rpartition("/")[0]  # probes: key/<stem>)
        if base in FIRST_DOWNSTREAM:
            summary[FIRST + key] = value
    for part in parts:
        summary.update(part)
    if fill_mask:
        summary[FILL_MASK] = fill_mask
    return summary
