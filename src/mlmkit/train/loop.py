"""Optimizer groups, scheduler and one optimizer step with the token-weighted loss.

Loss normalisation lives here and only here: the loss of a step is the sum of the MLM loss over
every masked token of the global batch (all gradient-accumulation micro-batches on all processes)
divided by the number of those tokens. Each micro-batch's summed loss is scaled by
``grad_accum * num_processes / global_masked`` before backward, because Accelerate (or DeepSpeed)
divides by ``grad_accum`` and data-parallel all-reduce averages over processes; the gradient is then
exactly the gradient of the global token mean.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from accelerate.utils import send_to_device
from transformers import get_scheduler

from mlmkit.batch.collator import model_inputs
from mlmkit.config.choices import GRAPHED_COMPILE_MODES
from mlmkit.config.errors import ConfigError
from mlmkit.model.checks import position_offset
from mlmkit.model.flops import FlopCounter
from mlmkit.model.loading import MaskedLMModule, attn_implementation
from mlmkit.train.tracking import (
    TRAIN_COMPILE_SECONDS,
    TRAIN_GPU_BUSY_FRACTION,
    train_metrics,
)


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (the 1-D parameters).

    The fused implementation (CPU and CUDA) is used: on a 2-core CPU the default ``foreach``
    AdamW took 1.8-3 s per step for the 22M-parameter demo model, the fused one about 0.05 s.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, fused=True)


def scheduler_phases(cfg, num_training_steps: int) -> dict[str, int]:
    """Warmup steps (``num_warmup_steps``, else ``warmup_ratio`` of the steps) and, for
    ``warmup_stable_decay``, decay steps (``decay_ratio`` of the steps, at least 1)."""
    phases = {"warmup": cfg.num_warmup_steps or math.ceil(cfg.warmup_ratio * num_training_steps)}
    if cfg.lr_scheduler_type == "warmup_stable_decay":
        phases["decay"] = max(1, math.ceil(cfg.decay_ratio * num_training_steps))
        if phases["warmup"] + phases["decay"] > num_training_steps:
            raise ConfigError(
                f"decay_ratio={cfg.decay_ratio!r}: {phases['warmup']} warmup + {phases['decay']} "
                f"decay steps exceed the {num_training_steps} training steps. Fix: lower "
                "--num_warmup_steps/--warmup_ratio or --decay_ratio, or train longer.")
    return phases


def build_scheduler(optimizer, cfg, num_training_steps: int):
    """The LR schedule for ``num_training_steps`` optimizer steps; every name in
    `choices.SCHEDULERS` builds here. Each takes transformers' defaults for its own knobs
    (cosine_with_restarts: 1 cycle; polynomial: power 1 down to lr_end 1e-7; inverse_sqrt:
    timescale = warmup), except warmup_stable_decay, whose decay phase is ``decay_ratio`` of the
    steps (cosine decay to 0; stable at the peak rate in between)."""
    phases = scheduler_phases(cfg, num_training_steps)
    specific = {"num_decay_steps": phases["decay"]} if "decay" in phases else None
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=phases["warmup"],
                         num_training_steps=num_training_steps,
                         scheduler_specific_kwargs=specific)


def train_step(accelerator, module, optimizer, scheduler, micro_batches, *, mask_padding: bool,
               max_grad_norm: float, forward=None) -> dict:
    """Run one optimizer step over this process's ``grad_accum`` micro-batches (on the device).

    Returns device tensors, read by nobody here: ``loss_sum`` (the global sum of the MLM loss over
    masked tokens), ``masked_tokens`` (their global count) and ``grad_norm`` (or None). The step
    makes no host-device synchronisation (no ``.item()``, no data-dependent shapes): the global
    count is all-reduced on the device and the scale stays a device tensor, so a GPU is fed as
    fast as the host can queue kernels. `StepResults` reads the results at log steps.
    ``forward``: what computes each micro-batch's loss, e.g. ``torch.compile(module)``
    (default: ``module``); accumulation and the backward still go through ``module``.

    A compiled forward with accumulation over several micro-batches keeps every gradient in one
    buffer of the parameter's own for the whole run (zeroed, never set to None): under CUDA graphs
    (compile mode reduce-overhead) a first backward into a None ``.grad`` would adopt the graph's
    output memory, which the next micro-batch's replay overwrites (pytorch/pytorch#169545).
    """
    forward = module if forward is None else forward
    device = accelerator.device
    keep_grads = forward is not module and accelerator.gradient_accumulation_steps > 1
    if keep_grads:
        own_grads(module)
    # Pinned batches (prefetch.Prefetcher, with workers) are copied while earlier kernels still run.
    micro_batches = [send_to_device(b, device, non_blocking=True) for b in micro_batches]
    local_masked = sum(b["num_masked_tokens"] for b in micro_batches).float()
    global_masked = accelerator.reduce(local_masked, "sum") if accelerator.num_processes > 1 \
        else local_masked
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / \
        global_masked.clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    grad_norm = None
    for batch in micro_batches:
        if forward is not module:  # CUDA graphs (compile mode reduce-overhead): a new step
            torch.compiler.cudagraph_mark_step_begin()
        with accelerator.accumulate(module):
            micro_loss_sum, _ = forward(**model_inputs(batch, mask_padding=mask_padding))
            accelerator.backward(micro_loss_sum * scale)
            loss_sum += micro_loss_sum.detach().float()
            if accelerator.sync_gradients:
                if max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(module.parameters(), max_grad_norm)
                    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor (every process)
                        grad_norm = grad_norm.full_tensor()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=not keep_grads)
    if not accelerator.sync_gradients:
        raise RuntimeError("internal error: a step ended off a gradient-accumulation boundary")
    if accelerator.num_processes > 1:
        loss_sum = accelerator.reduce(loss_sum, "sum")
    return {"loss_sum": loss_sum, "masked_tokens": global_masked, "grad_norm": grad_norm}


def own_grads(module: torch.nn.Module) -> None:
    """Give every trainable parameter without a gradient a zeroed one of its own (`train_step`:
    gradients then accumulate in place, in memory no compiled graph owns)."""
    for param in module.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)


class StepResults:
    """The device-side results of the steps since the last read, read in one transfer.

    `add` keeps each step's tensors and its host time (no synchronisation); `read` (at log and
    eval steps, checkpoints and the end) stacks them, copies them to the host once and returns
    per-step ``(loss, masked_tokens, grad_norm, seconds)`` -- the same numbers, in the same order,
    as reading every step would give, so the log and the checkpointed statistics do not depend on
    when reads happen. The wait for the device is added to the last step's seconds: the steps'
    seconds then sum to the wall time the device needed for them.
    """

    def __init__(self, clock: "BusyClock | None" = None):
        self._steps: list[tuple[dict, float]] = []
        self.grad_norm: float | None = None  # the newest step's, once read
        self.clock = clock  # its events are read here, after the one synchronisation

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, out: dict, seconds: float) -> None:
        self._steps.append((out, seconds))

    def read(self) -> list[tuple[float, int, float | None, float]]:
        if not self._steps:
            return []
        t0 = time.perf_counter()
        rows = []
        for out, _ in self._steps:
            loss_sum, norm = out["loss_sum"].float(), out["grad_norm"]
            if not isinstance(norm, torch.Tensor):  # None, or DeepSpeed's float
                norm = loss_sum.new_full((), float("nan") if norm is None else float(norm))
            rows.append(torch.stack([loss_sum, out["masked_tokens"].float(), norm.float()]))
        values = torch.stack(rows).cpu().tolist()  # the one synchronisation
        if self.clock is not None:
            self.clock.read()
        waited = time.perf_counter() - t0
        result = []
        for i, ((loss_sum, masked, norm), (out, seconds)) in enumerate(zip(values, self._steps)):
            masked = int(masked)
            result.append((loss_sum / max(masked, 1), masked,
                           None if out["grad_norm"] is None else norm,
                           seconds + (waited if i == len(values) - 1 else 0.0)))
        self._steps = []
        return result

    def read_into(self, state) -> None:
        """`read`, then add each step to ``state.window`` and ``state.total`` (a
        `checkpoint.TrainState`) and keep the newest gradient norm in ``grad_norm``."""
        for loss, masked, norm, seconds in self.read():
            for stats in (state.window, state.total):
                stats.add_step(loss, masked, seconds)
            self.grad_norm = norm


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
    `checkpoint.RunningStats`): device seconds per computed position x the span's computed
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
        """The busy fraction of a span of steps (`checkpoint.RunningStats`), or None."""
        if self.per_position is None or stats.seconds <= 0:
            return None
        return min(1.0, self.per_position * stats.computed / stats.seconds)


@dataclass
class Training:
    """What trains: the prepared module and optimizer, the training forward (compiled with
    ``--torch_compile``, else the module), and what the model's layout tells the collator."""
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    forward: torch.nn.Module | None
    flop_counter: FlopCounter
    position_offset: int
    attn_implementation: str

    @property
    def inner(self):
        """The unwrapped `modeling.MaskedLMModule` (probes, the head switch)."""
        from accelerate.utils import extract_model_from_parallel
        return extract_model_from_parallel(self.module)


def prepare_training(cfg, accelerator, model) -> Training:
    """The training module around ``model`` (masked-only head per ``--sparse_prediction``),
    fused AdamW, both through ``accelerator.prepare`` (DDP, ZeRO, FSDP2 as launched), and the
    ``--torch_compile`` forward (eval and the probe run eager)."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offset, attn = position_offset(model), attn_implementation(model)
    flop_counter = FlopCounter.for_model(model)  # train/tflops and train/mfu
    module = MaskedLMModule(model, sparse_prediction=cfg.sparse_prediction)
    optimizer = build_optimizer(module, cfg)
    module, optimizer = accelerator.prepare(module, optimizer)
    forward = compile_forward(module, accelerator, cfg.torch_compile_mode) \
        if cfg.torch_compile else None
    return Training(module, optimizer, forward, flop_counter, offset, attn)


def compile_forward(module, accelerator, mode: str):
    """``torch.compile`` of the prepared training module (inductor; DDP or one process)."""
    from accelerate.utils import DistributedType
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU,
                                            DistributedType.MULTI_CPU):
        raise ConfigError(f"--torch_compile is supported with DDP or one process, not under "
                          f"{accelerator.distributed_type.value}. Fix: drop --torch_compile, or "
                          "launch without DeepSpeed/FSDP.")
    return torch.compile(module, mode=mode)


class Stepper:
    """The run's optimizer steps: `train_step` on each prepared step, its device time calibrated
    by a `BusyClock` (train/gpu_busy_fraction), its device results kept in `StepResults` and read
    into ``state`` (a `checkpoint.TrainState`) by `read`. A compiled run's warm-up -- its first
    step (compilation), and under CUDA graphs its second too (torch records the graphs at a
    function's second call) -- is read at once and its time kept (`compile_seconds`)."""

    def __init__(self, accelerator, training: Training, scheduler, cfg, state):
        self.accelerator, self.training, self.scheduler = accelerator, training, scheduler
        self.cfg, self.state = cfg, state
        self.clock = BusyClock(accelerator.device)
        self.results = StepResults(self.clock)
        self.compile_seconds: float | None = None
        graphed = cfg.torch_compile_mode in GRAPHED_COMPILE_MODES and \
            accelerator.device.type == "cuda"
        self.warm_steps = 0 if training.forward is None else 2 if graphed else 1
        self._warm_t0: float | None = None  # the warm-up's start
        self._warmed = 0  # its steps so far

    def __call__(self, prepared, t0: float) -> str | None:
        """One optimizer step on ``prepared`` (a `prefetch.PreparedStep` fetched from ``t0``,
        a `time.perf_counter`); a line to log after a compiled run's warm-up, else None."""
        training = self.training
        self.clock.start(prepared.computed)
        out = train_step(self.accelerator, training.module, training.optimizer, self.scheduler,
                         prepared.micro_batches, mask_padding=self.cfg.mask_padding,
                         max_grad_norm=self.cfg.max_grad_norm, forward=training.forward)
        self.clock.stop()
        self.results.add(out, time.perf_counter() - t0)
        if self.warm_steps == 0 or self.compile_seconds is not None:
            return None
        self._warm_t0 = t0 if self._warm_t0 is None else self._warm_t0
        self._warmed += 1
        if self._warmed < self.warm_steps:
            return None
        self.read()  # waits for the device once: the warm-up's whole time
        self.compile_seconds = time.perf_counter() - self._warm_t0
        what = ("the first 2 steps took", "compilation, CUDA-graph recording") \
            if self.warm_steps == 2 else ("the first step took", "compilation")
        return (f"compiled training step: {what[0]} {self.compile_seconds:.1f} s ({what[1]}); "
                "the first log window's throughput includes it")

    def read(self) -> None:
        """The steps' device results since the last read, into the train state (one transfer)."""
        self.results.read_into(self.state)

    def window_metrics(self, *, epoch: float, num_processes: int,
                       peak_tflops: float | None) -> dict:
        """The train/ metrics of the steps since the last log line (`tracking.train_metrics`)."""
        window = self.state.take_window()
        return train_metrics(window, lr=self.scheduler.get_last_lr()[0], epoch=epoch,
                             grad_norm=self.results.grad_norm, num_processes=num_processes,
                             peak_tflops=peak_tflops, gpu_busy=self.busy(window))

    def busy(self, stats) -> float | None:
        """train/gpu_busy_fraction of a span of steps (`checkpoint.RunningStats`), or None."""
        return self.clock.fraction(stats)

    def summary(self) -> dict:
        """What summary.json says of the steps beyond the train state: the compile time and the
        whole run's busy fraction, each where there is one."""
        found = {TRAIN_COMPILE_SECONDS: self.compile_seconds,
                 TRAIN_GPU_BUSY_FRACTION: self.busy(self.state.total)}
        return {key: value for key, value in found.items() if value is not None}
