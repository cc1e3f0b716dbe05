"""The training step never synchronises host and device outside the reads at log steps.

Counted on CPU (`sync.SyncCounter`) through the tensor calls that would synchronise with a GPU:
``.item()``, ``.tolist()``, ``bool()/float()/int()`` of a tensor, ``.cpu()``, ``.numpy()``,
``nonzero`` and boolean-mask indexing (data-dependent shapes). The count covers what the training
loop's thread does per step: take a prepared step from the prefetcher, run `train_step`, keep its results.
On a CUDA machine the recipe's `Stepper` also runs under ``torch.cuda.set_sync_debug_mode
("error")`` (`sync.steps_without_sync`), which raises at any operation that synchronises with the
GPU (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch

from mlmkit.config.parse import parse_config
from mlmkit.data.corpus import Example
from mlmkit.model.checks import load_tokenizer
from mlmkit.model.loading import load_model
from mlmkit.train.checkpoint import TrainState
from mlmkit.train.loop import Stepper, StepResults, train_step
from mlmkit.train.metrics import BusyClock, RunningStats
from mlmkit.train.optim import prepare_training
from mlmkit.train.steps import PlannedSteps, Prefetcher, RunSteps
from mlmkit.train.sync import SyncCounter, steps_without_sync


class Examples:
    """A few synthetic tokenized examples (the IndexedExamples interface)."""

    def __init__(self, tokenizer, n=100):
        gen = torch.Generator().manual_seed(0)
        self.rows = []
        for i in range(n):
            body = torch.randint(2000, 9000, (int(torch.randint(5, 40, (1,), generator=gen)),),
                                 generator=gen).tolist()
            self.rows.append([tokenizer.cls_token_id, *body, tokenizer.sep_token_id])
        self.special = [[1] + [0] * (len(r) - 2) + [1] for r in self.rows]
        self.lengths = [len(r) for r in self.rows]

    def __len__(self):
        return len(self.rows)

    def fetch(self, indices):
        return [Example(input_ids=self.rows[i], special_tokens_mask=self.special[i], idx=int(i),
                        source=0) for i in indices]


def setup(tiny_bert_dir, tokenizer_path, padding, device="cpu", flags=("--attn_implementation",
                                                                         "sdpa")):
    """The recipe's training step and step source, built by the recipe's own builders;
    ``flags``: more recipe flags (default: SDPA named, the dense block mask on every device); 4
    examples or rows per device unless they give --per_device_train_tokens."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)  # each test its own device and precision
    cfg = parse_config(["--config_name", tiny_bert_dir, "--tokenizer_name", tokenizer_path,
                        "--padding", padding, "--max_seq_length", "64",
                        "--gradient_accumulation_steps", "2", "--max_train_steps", "12",
                        *(() if "--per_device_train_tokens" in flags else
                          ("--per_device_train_batch_size", "4")), *flags])
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if device == "cuda"
                              else "no", gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    training = prepare_training(cfg, accelerator, load_model(cfg, tokenizer,
                                                             device=accelerator.device))
    run_steps = RunSteps.build(cfg, accelerator, training, tokenizer, Examples(tokenizer),
                               padding=padding)
    return accelerator, training, run_steps.scheduler, run_steps.source(), run_steps


class FakeGpu:
    """A GPU timeline for `BusyClock`: the host launches (its clock advances), the device runs
    what was queued in order, never before it was launched; events stamp the device's time.
    ``elapsed_time``/``synchronize`` raise unless ``synced()`` says the host has synchronised."""

    def __init__(self, synced=lambda: True, hz=2e9):
        self.host_ms = self.device_ms = 0.0
        self.synced, self.hz, self.spins = synced, hz, []

    def launch(self, device_ms, host_ms):  # one kernel
        self.host_ms += host_ms
        self.device_ms = max(self.device_ms, self.host_ms) + device_ms

    def sleep(self, cycles):
        self.spins.append(cycles)
        self.launch(cycles / self.hz * 1e3, 0.0)

    def timer(self):
        return self.host_ms / 1e3

    def event(self):
        gpu = self

        class Event:
            def record(self):
                gpu.launch(0.0, 0.0)
                self.at = gpu.device_ms

            def query(self):  # cudaEventQuery: has the device reached it by now? (no sync)
                return gpu.host_ms >= self.at

            def synchronize(self):
                assert gpu.synced(), "synchronize() before the read's synchronisation"

            def elapsed_time(self, end):
                assert gpu.synced(), "elapsed_time() before the read's synchronisation"
                return end.at - self.at
        return Event()

    def clock(self, warmup=2):
        return BusyClock(None, warmup=warmup, event=self.event, sleep=self.sleep,
                         timer=self.timer)

    def step(self, clock, positions=100, kernels=10, device_ms=1.0, host_ms=3.0):
        clock.start(positions)
        for _ in range(kernels):
            self.launch(device_ms, host_ms)
        clock.stop()


def test_busy_clock_measures_device_time_behind_a_spin():
    """A host-bound step (10 kernels of 1 ms, launched 3 ms apart: 30 ms of wall time, 10 ms of
    device time): events around the step alone would say busy (30 of 30 ms); the calibration
    behind the spin measures 10 ms, so the busy fraction is 1/3. Nothing is read before the
    read's synchronisation, and the spin's clock is re-measured (2 GHz, guessed 1.5)."""
    synced = [False]
    gpu = FakeGpu(synced=lambda: synced[0])
    clock = gpu.clock(warmup=2)
    assert clock.fraction(RunningStats(computed=100, seconds=1.0)) is None  # not yet measured
    for _ in range(4):
        gpu.step(clock)
    assert len(gpu.spins) == 1  # one calibration, on the third step
    synced[0] = True
    clock.read()
    assert clock.per_position == pytest.approx(10e-3 / 100)
    assert clock.cycles_per_s == pytest.approx(2e9)
    window = RunningStats(computed=10 * 100, seconds=10 * 0.030)
    assert clock.fraction(window) == pytest.approx(1 / 3)
    assert clock.fraction(RunningStats(computed=10 * 100, seconds=0.001)) == 1.0  # capped
    gpu.step(clock)
    assert len(gpu.spins) == 1  # once per run ...
    clock.recalibrate()
    gpu.step(clock, device_ms=2.0)
    clock.read()
    assert len(gpu.spins) == 2 and clock.per_position == pytest.approx(20e-3 / 100)  # ... or asked


def test_busy_clock_drops_a_spin_the_host_outlasted_and_retries_longer():
    gpu = FakeGpu()
    clock = gpu.clock(warmup=1)
    gpu.step(clock)                       # 30 ms of launching: the spin will last 61 ms
    gpu.step(clock, host_ms=9.0)          # this step takes the host 90 ms: the GPU caught up
    clock.read()
    assert clock.per_position is None     # dropped, not a wrong number
    gpu.step(clock, host_ms=9.0)          # twice as long (121 ms, at the measured 2 GHz)
    clock.read()
    assert len(gpu.spins) == 2 and clock.per_position == pytest.approx(10e-3 / 100)


def test_busy_clock_is_off_on_cpu():
    clock = BusyClock(torch.device("cpu"))
    for _ in range(BusyClock.WARMUP + 3):
        clock.start(100)
        clock.stop()
    clock.read()
    assert clock.fraction(RunningStats(computed=100, seconds=1.0)) is None


SDPA = ("--attn_implementation", "sdpa")
ESM2 = {"position_embedding_type": "rotary", "token_dropout": True, "emb_layer_norm_before": False}


@pytest.mark.parametrize("model, padding, flags", [
    ("bert", "packed", SDPA), ("bert", "longest", SDPA),
    ("bert", "longest", (*SDPA, "--per_device_train_tokens", "256")),
    ("esm2", "packed", ()),  # mlmkit_packed with ESM-2's per-example token-dropout scaling
])
def test_train_step_makes_no_host_device_sync(tiny_bert_dir, tokenizer, tokenizer_path, tmp_path,
                                              model, padding, flags):
    from helpers import tiny_config_dir
    folder = tiny_bert_dir if model == "bert" else tiny_config_dir(
        tmp_path / "esm2", "esm", tokenizer, mask_token_id=tokenizer.mask_token_id, **ESM2)
    accelerator, training, scheduler, steps, _ = setup(folder, tokenizer_path, padding,
                                                       flags=flags)
    assert training.attn_implementation == ("sdpa" if flags else "mlmkit_packed")
    module, optimizer = training.module, training.optimizer
    prefetcher = Prefetcher(steps, num_workers=2)
    reads = [None]  # the BusyClock's fake events: readable only after the read's .cpu()
    gpu = FakeGpu(synced=lambda: reads[0] is not None and "cpu" in [c[0] for c in reads[0].calls])
    clock = gpu.clock(warmup=1)
    pending, outs, preps = StepResults(clock), [], []
    n_steps, micro = 4, 0
    with SyncCounter() as counter:
        for _ in range(n_steps):
            prepared, _ = prefetcher.next()
            preps.append(prepared)
            micro += len(prepared.micro_batches)
            clock.start(prepared.computed)
            out = train_step(accelerator, module, optimizer, scheduler, prepared.micro_batches,
                             mask_padding=True, max_grad_norm=1.0)
            clock.stop()
            pending.add(out, 0.0)
            outs.append(out)
    prefetcher.close()
    assert len(gpu.spins) == 1  # a calibration ran inside the counted steps
    ours = [c for c in counter.calls if "transformers" not in c[1]]
    assert ours == [], f"the step synchronises: {ours}"
    if padding == "packed":  # the block-diagonal 4-D mask reaches SDPA as it is
        assert counter.calls == []
    else:  # transformers' sdpa_mask checks `padding_mask.all()`: once per forward, not ours
        assert len(counter.calls) == micro
        assert all("masking_utils" in where for _, where in counter.calls)

    with SyncCounter() as counter:
        reads[0] = counter
        results = pending.read()
    assert [c[0] for c in counter.calls] == ["cpu", "tolist"]  # one transfer for all steps
    assert clock.per_position is not None  # the calibration was read there
    assert len(results) == n_steps and len(pending) == 0
    for (loss, masked, grad_norm, _, real, examples), out, prepared in zip(results, outs, preps):
        assert masked == int(out["masked_tokens"]) > 0
        assert real == prepared.real > 0  # the device's count is the host's (one process)
        assert examples == sum(int(b["num_examples"]) for b in prepared.micro_batches) > 0
        assert loss == pytest.approx(float(out["loss_sum"]) / masked, rel=1e-6)
        assert grad_norm == pytest.approx(float(out["grad_norm"]), rel=1e-6)


def test_compiled_forward_with_accumulation_keeps_one_gradient_buffer(tiny_bert_dir,
                                                                       tokenizer_path):
    """Under CUDA graphs a backward into a None ``.grad`` adopts the graph's output memory, which
    the next micro-batch's replay overwrites (the accumulated gradient would be the last
    micro-batch's). With a compiled forward and accumulation over 2 micro-batches, every gradient
    stays in one buffer of the parameter's own for the whole run, and the steps are the eager
    steps. Here any forward but the module stands for the compiled one; the CUDA test below runs
    the graphed step itself with the same accumulation."""
    runs = {}
    for compiled in (False, True):
        accelerator, training, scheduler, steps, _ = setup(tiny_bert_dir, tokenizer_path,
                                                           "packed")
        module = training.module
        forward = (lambda **kwargs: module(**kwargs)) if compiled else None
        prefetcher, pending, buffers = Prefetcher(steps, num_workers=0), StepResults(), []
        for _ in range(3):
            prepared, _ = prefetcher.next()
            assert len(prepared.micro_batches) == 2
            pending.add(train_step(accelerator, module, training.optimizer, scheduler,
                                   prepared.micro_batches, mask_padding=True, max_grad_norm=1.0,
                                   forward=forward), 0.0)
            buffers.append([p.grad.data_ptr() if p.grad is not None else None
                            for p in module.parameters()])
        prefetcher.close()
        runs[compiled] = ([loss for loss, *_ in pending.read()],
                          [p.detach().clone() for p in module.parameters()])
        if compiled:  # zeroed after each step, never freed: one buffer per parameter
            assert None not in buffers[0] and buffers[0] == buffers[1] == buffers[2]
        else:  # eager: freed after each step (set to None), as before
            assert set(buffers[0]) == {None}
    (eager_losses, eager_weights), (losses, weights) = runs[False], runs[True]
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(weights, eager_weights))


def iter_all(prefetcher):
    while True:
        try:
            yield prefetcher.next()
        except StopIteration:
            return


def test_worker_processes_hand_out_the_plan_in_order(tiny_bert_dir, tokenizer_path):
    _, _, _, steps, _ = setup(tiny_bert_dir, tokenizer_path, "packed")
    inline = list(iter_all(Prefetcher(steps, num_workers=0)))
    workers = list(iter_all(Prefetcher(steps, num_workers=3)))
    assert len(inline) == len(workers) > 6
    for (a, _), (b, _) in zip(inline, workers):
        assert (a.position, a.real, a.flops) == (b.position, b.real, b.flops)
        for x, y in zip(a.micro_batches, b.micro_batches):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("padding, flags", [
    ("packed", ()), ("longest", ("--per_device_train_tokens", "256")),
    ("packed", ("--torch_compile", "true"))])
def test_planned_steps_resume_from_a_steps_position(tiny_bert_dir, tokenizer_path, padding,
                                                    flags):
    """The steps after any step's position (what the checkpoint saves) are the same steps;
    token budgets' steps and compiled runs' steps (`prefetch.StaticShapes`: empty rows, padded
    positions) too."""
    _, _, _, steps, _ = setup(tiny_bert_dir, tokenizer_path, padding, flags=flags)
    if "--torch_compile" in flags:
        assert steps.preparer.static is not None
    run = list(steps)
    assert len({s.position.epoch for s in run}) >= 2  # crosses an epoch boundary
    for k in (0, 4, len(run) - 2):
        again = PlannedSteps(steps.examples, steps.preparer, plan=steps.plan,
                             position=run[k].position, num_epochs=steps.num_epochs)
        for want, got in zip(run[k + 1:], again, strict=True):
            assert (want.position, want.real) == (got.position, got.real)
            for x, y in zip(want.micro_batches, got.micro_batches, strict=True):
                assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_an_error_in_a_worker_reaches_the_training_loop():
    class Broken(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield 1
            raise ValueError("bad example 7")
    prefetcher = Prefetcher(Broken(), num_workers=1)
    assert prefetcher.next()[0] == 1
    with pytest.raises(ValueError, match="bad example 7"):
        prefetcher.next()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("path, flags", [
    ("block_mask", ("--attn_implementation", "sdpa")),  # the dense block mask
    ("varlen", ()),                                      # BERT on CUDA: mlmkit_packed, varlen
    ("graphed", ("--torch_compile", "true", "--torch_compile_mode", "reduce-overhead")),
])
def test_train_step_makes_no_cuda_sync(tiny_bert_dir, tokenizer_path, path, flags):
    """The recipe's own `Stepper` on CUDA: no synchronisation in its steps, the busy clock's
    calibration included (`sync.steps_without_sync`, which benchmarks/gpu_checks.py runs too)."""
    accelerator, training, *_, run_steps = setup(tiny_bert_dir, tokenizer_path, "packed",
                                                 device="cuda", flags=flags)
    assert training.attn_implementation == ("sdpa" if path == "block_mask" else "mlmkit_packed")
    stepper = Stepper(accelerator, training, run_steps.scheduler, run_steps.cfg, TrainState())
    prefetcher = Prefetcher(run_steps.source(), num_workers=2, pin_memory=True)
    warmup = 3 if path == "graphed" else 1  # compilation and CUDA-graph recording sync
    try:
        results = steps_without_sync(stepper, prefetcher, warmup=warmup)
    finally:
        prefetcher.close()
    assert len(results) == 4 and all(masked > 0 for _, masked, _, _ in results)
    # the calibration behind the spin was valid and read: the step's device time per position
    clock = stepper.clock
    assert clock.per_position is not None and clock.per_position > 0
    print(f"BusyClock: {clock.per_position * 1e9:.3f} ns of device time per position, "
          f"spin clock {clock.cycles_per_s / 1e9:.2f} GHz")
