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
"""

from __future__ import annotations

import time

import torch
from accelerate.utils import send_to_device

from mlmkit.batch.collator import model_inputs
from mlmkit.config.choices import GRAPHED_COMPILE_MODES
from mlmkit.config.keys import TRAIN_COMPILE_SECONDS, TRAIN_GPU_BUSY_FRACTION
from mlmkit.train.metrics import BusyClock, train_metrics
from mlmkit.train.optim import Training


def train_step(accelerator, module, optimizer, scheduler, micro_batches, *, mask_padding: bool,
               max_grad_norm: float, forward=None) -> dict:
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
    return {"loss_sum": loss_sum, "masked_tokens": global_masked, "grad_norm": grad_norm,
            "seen": counts[1:]}


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

    def __init__(self, clock: BusyClock | None = None):
        self._steps: list[tuple[dict, float]] = []
        self.grad_norm: float | None = None  # the newest step's, once read
        self.clock = clock  # its events are read here, after the one synchronisation

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
        gradient norm in ``grad_norm``; returns the steps read."""
        rows = self.read()
        for loss, masked, norm, seconds, real, examples in rows:
            for stats in (state.window, state.total):
                stats.add_step(loss, masked, seconds)
            state.tokens_seen += real
            state.examples_seen += examples
            self.grad_norm = norm
        return rows


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
        self._unreturned: list = []  # the warm-up's read steps, until `read` returns them

    def __call__(self, prepared, t0: float) -> str | None:
        """One optimizer step on ``prepared`` (a `steps.PreparedStep` fetched from ``t0``,
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
        the warm-up's steps, read at once, are returned by the next call)."""
        rows, self._unreturned = self._unreturned + self.results.read_into(self.state), []
        return rows

    def window_metrics(self, *, epoch: float, num_processes: int,
                       peak_tflops: float | None) -> dict:
        """The train/ metrics of the steps since the last log line (`metrics.train_metrics`)."""
        window = self.state.take_window()
        return train_metrics(window, lr=self.scheduler.get_last_lr()[0], epoch=epoch,
                             grad_norm=self.results.grad_norm, num_processes=num_processes,
                             peak_tflops=peak_tflops, gpu_busy=self.busy(window))

    def busy(self, stats) -> float | None:
        """train/gpu_busy_fraction of a span of steps (`metrics.RunningStats`), or None."""
        return self.clock.fraction(stats)

    def summary(self) -> dict:
        """What summary.json says of the steps beyond the train state: the compile time and the
        whole run's busy fraction, each where there is one."""
        found = {TRAIN_COMPILE_SECONDS: self.compile_seconds,
                 TRAIN_GPU_BUSY_FRACTION: self.busy(self.state.total)}
        return {key: value for key, value in found.items() if value is not None}
