"""The training step: one optimizer step with the token-weighted loss (`train_step`), its device
results read in one transfer (`StepResults`), and the run's steps (`Stepper`: the step, its busy
clock, its reads into the train state). The optimizer, the schedule and what trains: `optim`;
what is logged: `metrics`.

Loss normalisation lives here and only here: the loss of a step is the sum of the MLM loss over
every masked token of the global batch (all gradient-accumulation micro-batches on all processes)
divided by the number of those tokens. Each micro-batch's summed loss is scaled by
``grad_accum * num_processes / global_masked`` before backward, because Accelerate (or DeepSpeed)
divides by ``grad_accum`` and data-parallel all-reduce averages over processes; the gradient is then
exactly the gradient of the global token mean.

Non-finite steps: every step's global loss and gradient norm (computed even without clipping) are
read at the next log, eval or checkpoint step with the rest of its results. A non-finite one stops
the run there (`NonFiniteError`, naming the first such step), before anything is evaluated, saved
or exported; with ``--skip_nonfinite_steps`` the step's update is skipped on the device instead
(fused AdamW's ``found_inf``: weights, moments and step count untouched) and counted
(train/skipped_steps). Under fp16 an overflowing gradient is the loss scaler's to skip: only the
loss counts there.
"""

from __future__ import annotations

import math
import time

import torch
from accelerate.utils import send_to_device

from mlmkit.batch.collator import model_inputs
from mlmkit.config.choices import GRAPHED_COMPILE_MODES
from mlmkit.config.errors import ConfigError
from mlmkit.config.keys import TRAIN_COMPILE_SECONDS, TRAIN_GPU_BUSY_FRACTION, TRAIN_SKIPPED_STEPS
from mlmkit.train.checkpoint import newest_complete_checkpoint
from mlmkit.train.metrics import BusyClock, train_metrics
from mlmkit.train.optim import Training


def train_step(accelerator, module, optimizer, scheduler, micro_batches, *, mask_padding: bool,
               max_grad_norm: float, forward=None, skip_nonfinite: bool = False) -> dict:
    """Run one optimizer step over this process's ``grad_accum`` micro-batches (on the device).

    Returns device tensors, read by nobody here: ``loss_sum`` (the global sum of the MLM loss over
    masked tokens), ``masked_tokens`` (their global count), ``seen`` (the global counts of real
    tokens and examples, int64, all-reduced with the masked count: one collective) and
    ``grad_norm`` (or None). The step
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
    # Pinned batches (steps.Prefetcher, with workers) are copied while earlier kernels still run.
    micro_batches = [send_to_device(b, device, non_blocking=True) for b in micro_batches]
    counts = torch.stack([sum(b[key] for b in micro_batches)  # masked, real tokens, examples
                          for key in ("num_masked_tokens", "num_real_tokens", "num_examples")])
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, "sum")
    global_masked = counts[0].float()
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
                if accelerator.num_processes > 1:  # the global loss, known before the update
                    loss_sum = accelerator.reduce(loss_sum, "sum")
                # the norm even without clipping (x 1.0 then): the non-finite check reads it
                grad_norm = accelerator.clip_grad_norm_(
                    module.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor (every process)
                    grad_norm = grad_norm.full_tensor()
                if skip_nonfinite:  # fused AdamW skips the update where found_inf is 1
                    getattr(optimizer, "optimizer", optimizer).found_inf = \
                        nonfinite_flag(loss_sum, grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=not keep_grads)
    if not accelerator.sync_gradients:
        raise RuntimeError("internal error: a step ended off a gradient-accumulation boundary")
    return {"loss_sum": loss_sum, "masked_tokens": global_masked, "grad_norm": grad_norm,
            "seen": counts[1:]}


def nonfinite_flag(loss_sum: torch.Tensor, grad_norm) -> torch.Tensor:
    """1.0 where the step's (global) loss or gradient norm is not finite, else 0.0: a float
    tensor on the loss's device, computed without a synchronisation (``found_inf``)."""
    bad = ~torch.isfinite(loss_sum)
    if isinstance(grad_norm, torch.Tensor):
        bad = bad | ~torch.isfinite(grad_norm)
    return bad.float()


def finite_step(loss: float, grad_norm: float | None, *, check_norm: bool = True) -> bool:
    """Whether a step read on the host is finite: its loss, and with ``check_norm`` its gradient
    norm (when there is one; fp16: the loss scaler's business, so not checked)."""
    return math.isfinite(loss) and (grad_norm is None or not check_norm or
                                    math.isfinite(grad_norm))


class NonFiniteError(ConfigError):
    """The loss or gradient norm of a step was not finite: the run stops (one line and its fix,
    like a ConfigError: a learning rate too high, clipping off...)."""

    @classmethod
    def at(cls, cfg, step: int | None, loss: float, grad_norm: float | None) -> "NonFiniteError":
        """The error of the first non-finite ``step``, naming the newest good checkpoint."""
        newest = newest_complete_checkpoint(cfg.output_dir)[0] if cfg.output_dir else None
        norm = "" if grad_norm is None else f", gradient norm {grad_norm}"
        skip = ""
        if cfg.optimizer == "adamw":
            where = f"resumes from {newest} (the newest good checkpoint)" if newest else \
                "starts again (no checkpoint was saved)"
            skip = f"; or add --skip_nonfinite_steps true to the same command: it {where} and " \
                "skips such steps"
        return cls(f"training diverged: step {step if step is not None else '?'} had loss {loss}"
                   f"{norm}; the run stopped at the next read, before evaluating or saving (no "
                   f"model/, no summary.json). Fix: lower --learning_rate, or clip with "
                   f"--max_grad_norm 1.0, and start afresh with --overwrite_output_dir true{skip}.")


def own_grads(module: torch.nn.Module) -> None:
    """Give every trainable parameter without a gradient a zeroed one of its own (`train_step`:
    gradients then accumulate in place, in memory no compiled graph owns)."""
    for param in module.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)


class StepResults:
    """The device-side results of the steps since the last read, read in one transfer.

    `add` keeps each step's tensors and its host time (no synchronisation); `read` (at log and
    eval steps, checkpoints and the end) stacks them (float64: counts exact), copies them to the
    host once and returns per-step ``(loss, masked_tokens, grad_norm, seconds, real_tokens,
    examples)`` (the counts global) -- the same numbers, in the same order,
    as reading every step would give, so the log and the checkpointed statistics do not depend on
    when reads happen. The wait for the device is added to the last step's seconds: the steps'
    seconds then sum to the wall time the device needed for them.
    """

    def __init__(self, clock: BusyClock | None = None, *, skip_nonfinite: bool = False,
                 check_norm: bool = True):
        self._steps: list[tuple[dict, float]] = []
        self.grad_norm: float | None = None  # the newest step's, once read
        self.clock = clock  # its events are read here, after the one synchronisation
        self.skip_nonfinite, self.check_norm = skip_nonfinite, check_norm  # `finite_step`
        self.nonfinite: tuple | None = None  # the first non-finite (step, loss, grad_norm) read

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, out: dict, seconds: float) -> None:
        self._steps.append((out, seconds))

    def read(self) -> list[tuple[float, int, float | None, float, int, int]]:
        if not self._steps:
            return []
        t0 = time.perf_counter()
        rows = []
        for out, _ in self._steps:
            loss_sum, norm = out["loss_sum"].float(), out["grad_norm"]
            if not isinstance(norm, torch.Tensor):  # None, or DeepSpeed's float
                norm = loss_sum.new_full((), float("nan") if norm is None else float(norm))
            rows.append(torch.cat([torch.stack([loss_sum, out["masked_tokens"].float(),
                                                norm.float()]).double(), out["seen"].double()]))
        values = torch.stack(rows).cpu().tolist()  # the one synchronisation
        if self.clock is not None:
            self.clock.read()
        waited = time.perf_counter() - t0
        result = []
        for i, (row, (out, seconds)) in enumerate(zip(values, self._steps)):
            loss_sum, masked, norm, real, examples = row
            masked = int(masked)
            result.append((loss_sum / max(masked, 1), masked,
                           None if out["grad_norm"] is None else norm,
                           seconds + (waited if i == len(values) - 1 else 0.0), int(real),
                           int(examples)))
        self._steps = []
        return result

    def read_into(self, state) -> list[tuple[float, int, float | None, float, int, int]]:
        """`read`, then add each step to ``state.window`` and ``state.total`` (a
        `checkpoint.TrainState`) and to its examples and tokens seen, and keep the newest
        gradient norm in ``grad_norm``; returns the steps read. A non-finite step (`finite_step`)
        is counted as skipped (``skip_nonfinite``: its update was) or kept in ``nonfinite`` (the
        first one; its number is ``out["step"]`` where `Stepper` gave one)."""
        numbers = [out.get("step") for out, _ in self._steps]
        rows = self.read()
        for number, (loss, masked, norm, seconds, real, examples) in zip(numbers, rows):
            finite = finite_step(loss, norm, check_norm=self.check_norm)
            if not finite and not self.skip_nonfinite and self.nonfinite is None:
                self.nonfinite = (number, loss, norm)
            for stats in (state.window, state.total):
                if finite:
                    stats.add_step(loss, masked, seconds)
                else:
                    stats.add_skipped(seconds)
            state.tokens_seen += real
            state.examples_seen += examples
            self.grad_norm = norm
        return rows


class Stepper:
    """The run's optimizer steps: `train_step` on each prepared step, its device time calibrated
    by a `BusyClock` (train/gpu_busy_fraction), its device results kept in `StepResults` and read
    into ``state`` (a `checkpoint.TrainState`) by `read`. A compiled run's warm-up -- its first
    step (compilation), and under CUDA graphs its second too (torch records the graphs at a
    function's second call) -- is read at once and its time kept (`compile_seconds`). A read
    that finds a non-finite step raises `NonFiniteError` (unless ``--skip_nonfinite_steps``)."""

    def __init__(self, accelerator, training: Training, scheduler, cfg, state):
        self.accelerator, self.training, self.scheduler = accelerator, training, scheduler
        self.cfg, self.state = cfg, state
        self.clock = BusyClock(accelerator.device)
        self.results = StepResults(self.clock, skip_nonfinite=cfg.skip_nonfinite_steps,
                                   check_norm=accelerator.mixed_precision != "fp16")
        self.compile_seconds: float | None = None
        graphed = cfg.torch_compile_mode in GRAPHED_COMPILE_MODES and \
            accelerator.device.type == "cuda"
        self.warm_steps = 0 if training.forward is None else 2 if graphed else 1
        self._warm_t0: float | None = None  # the warm-up's start
        self._warmed = 0  # its steps so far
        self._unreturned: list = []  # the warm-up's read steps, until `read` returns them

    def __call__(self, prepared, t0: float) -> str | None:
        """One optimizer step on ``prepared`` (a `steps.PreparedStep` fetched from ``t0``,
        a `time.perf_counter`); a line to log after a compiled run's warm-up, else None."""
        training = self.training
        self.clock.start(prepared.computed)
        out = train_step(self.accelerator, training.module, training.optimizer, self.scheduler,
                         prepared.micro_batches, mask_padding=self.cfg.mask_padding,
                         max_grad_norm=self.cfg.max_grad_norm, forward=training.forward,
                         skip_nonfinite=self.cfg.skip_nonfinite_steps)
        self.clock.stop()
        self.results.add({**out, "step": self.state.step + 1}, time.perf_counter() - t0)
        if self.warm_steps == 0 or self.compile_seconds is not None:
            return None
        self._warm_t0 = t0 if self._warm_t0 is None else self._warm_t0
        self._warmed += 1
        if self._warmed < self.warm_steps:
            return None
        self._unreturned = self.read()  # waits for the device once: the warm-up's whole time
        self.compile_seconds = time.perf_counter() - self._warm_t0
        what = ("the first 2 steps took", "compilation, CUDA-graph recording") \
            if self.warm_steps == 2 else ("the first step took", "compilation")
        return (f"compiled training step: {what[0]} {self.compile_seconds:.1f} s ({what[1]}); "
                "the first log window's throughput includes it")

    def read(self) -> list[tuple[float, int, float | None, float, int, int]]:
        """The steps' device results since the last read, into the train state (one transfer);
        returns them per step, ``(loss, masked_tokens, grad_norm, seconds, real_tokens,
        examples)`` (`StepResults.read`;
        the warm-up's steps, read at once, are returned by the next call). Raises
        `NonFiniteError` at a non-finite step, before the caller logs, evaluates or saves."""
        rows, self._unreturned = self._unreturned + self.results.read_into(self.state), []
        if self.results.nonfinite is not None:
            raise NonFiniteError.at(self.cfg, *self.results.nonfinite)
        return rows

    def window_metrics(self, *, epoch: float, num_processes: int,
                       peak_tflops: float | None) -> dict:
        """The train/ metrics of the steps since the last log line (`metrics.train_metrics`)."""
        window = self.state.take_window()
        metrics = train_metrics(window, lr=self.scheduler.get_last_lr()[0], epoch=epoch,
                                grad_norm=self.results.grad_norm, num_processes=num_processes,
                                peak_tflops=peak_tflops, gpu_busy=self.busy(window))
        if self.cfg.skip_nonfinite_steps:
            metrics[TRAIN_SKIPPED_STEPS] = window.skipped
        return metrics

    def busy(self, stats) -> float | None:
        """train/gpu_busy_fraction of a span of steps (`metrics.RunningStats`), or None."""
        return self.clock.fraction(stats)

    def summary(self) -> dict:
        """What summary.json says of the steps beyond the train state: the compile time, the
        whole run's busy fraction and its skipped steps (``--skip_nonfinite_steps``), each where
        there is one."""
        found = {TRAIN_COMPILE_SECONDS: self.compile_seconds,
                 TRAIN_GPU_BUSY_FRACTION: self.busy(self.state.total),
                 TRAIN_SKIPPED_STEPS: self.state.total.skipped if self.cfg.skip_nonfinite_steps
                 else None}
        return {key: value for key, value in found.items() if value is not None}
