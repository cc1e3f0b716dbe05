"""loop.py's non-finite steps: a run whose loss turns NaN stops at its next read with one line
naming the step and the newest good checkpoint, before anything is evaluated, saved or exported;
with --skip_nonfinite_steps the update of such a step is skipped on the device (weights, moments
and step count untouched, no host-device synchronisation) and counted. (The step's other
contracts: test_step_sync.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import RECIPE, isolated_globals, load_script, run_cli, run_recipe, tiny_model

from mlmkit.config.parse import parse_config
from mlmkit.model.loading import MaskedLMModule
from mlmkit.train import tracking as M
from mlmkit.train.checkpoint import TrainState
from mlmkit.train.loop import StepResults, finite_step, train_step
from mlmkit.train.optim import build_optimizer
from mlmkit.train.steps import add_masked_positions
from mlmkit.train.sync import SyncCounter

VOCAB = 200


def batch(seed: int) -> dict:
    """A micro-batch of 2 rows x 12 tokens, 2 masked positions per row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (2, 12), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, [3, 7]] = ids[:, [3, 7]]
    ids[:, [3, 7]] = 4  # the "mask" token
    return add_masked_positions({
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
        "num_masked_tokens": torch.tensor(4), "num_real_tokens": torch.tensor(24),
        "num_examples": torch.tensor(2)})


def snapshot(module, optimizer) -> list[torch.Tensor]:
    """Every weight and every tensor of the optimizer's state, copied."""
    inner = optimizer.optimizer
    return [p.detach().clone() for p in module.parameters()] + [
        t.clone() for p in module.parameters() for t in inner.state[p].values()]


def test_skip_nonfinite_leaves_the_step_untouched_without_a_sync():
    """Step 2's gradient is NaN (a hook poisons it, with clipping off): its update is skipped on
    the device -- weights, Adam's moments and its step count exactly as after step 1 -- the next
    step trains again, and the read counts one skipped step; the steps make no host-device
    synchronisation (the decision stays on the device until the read)."""
    from accelerate import Accelerator
    with isolated_globals(threads=1):
        cfg = parse_config(["--skip_nonfinite_steps", "true", "--max_grad_norm", "0",
                            "--learning_rate", "1e-2"])
        accelerator = Accelerator(cpu=True)
        module = MaskedLMModule(tiny_model("bert", VOCAB))
        module, optimizer = accelerator.prepare(module, build_optimizer(module, cfg))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        poison = [False]
        next(module.parameters()).register_hook(
            lambda g: torch.full_like(g, math.nan) if poison[0] else g)
        results, states = StepResults(skip_nonfinite=True), []
        batches = {step: batch(step) for step in (1, 2, 3)}  # prepared on the host, ahead
        module.train()
        with SyncCounter() as counter:
            for step in (1, 2, 3):
                poison[0] = step == 2
                out = train_step(accelerator, module, optimizer, scheduler, [batches[step]],
                                 mask_padding=True, max_grad_norm=0.0, skip_nonfinite=True)
                results.add({**out, "step": step}, 0.0)
                states.append(snapshot(module, optimizer))
        ours = [c for c in counter.calls if "transformers" not in c[1]]
        assert ours == [], f"the step synchronises: {ours}"
        after_1, after_2, after_3 = states
        assert all(torch.equal(a, b) for a, b in zip(after_1, after_2))  # skipped, exactly
        assert not all(torch.equal(a, b) for a, b in zip(after_2, after_3))  # trains again
        assert optimizer.optimizer.state[next(module.parameters())]["step"].item() == 2

        state = TrainState()
        rows = results.read_into(state)
        assert [finite_step(loss, norm) for loss, _, norm, *_ in rows] == [True, False, True]
        assert math.isnan(rows[1][2])  # the norm, computed without clipping
        assert state.total.skipped == 1 and state.total.masked == 8  # steps 1 and 3 only
        assert math.isfinite(state.total.mean_loss()) and results.nonfinite is None


def test_without_skipping_the_first_nonfinite_step_is_kept_for_the_error():
    """StepResults keeps the first non-finite step (its number, loss and norm); fp16's norm is
    the loss scaler's business (not checked), its loss still is. Skipping, a window of skipped
    steps has no loss (NaN, not 0)."""
    def out(loss_sum, norm, step):
        return {"loss_sum": torch.tensor(loss_sum), "masked_tokens": torch.tensor(4.0),
                "grad_norm": torch.tensor(norm), "seen": torch.tensor([24, 2]), "step": step}
    results = StepResults()
    for step, (loss_sum, norm) in enumerate([(8.0, 1.0), (8.0, math.inf), (math.nan, 1.0)], 1):
        results.add(out(loss_sum, norm, step), 0.0)
    results.read_into(TrainState())
    assert results.nonfinite == (2, 2.0, math.inf)
    fp16 = StepResults(check_norm=False)
    for step, (loss_sum, norm) in enumerate([(8.0, math.inf), (math.nan, 1.0)], 1):
        fp16.add(out(loss_sum, norm, step), 0.0)
    fp16.read_into(TrainState())
    assert fp16.nonfinite[0] == 2
    skipping, state = StepResults(skip_nonfinite=True), TrainState()
    skipping.add(out(math.nan, math.nan, 1), 0.5)
    skipping.read_into(state)
    assert state.window.skipped == 1 and state.window.seconds >= 0.5
    assert math.isnan(state.window.mean_loss())  # a window of skipped steps has no loss


@pytest.fixture
def diverging(tmp_path, tiny_args) -> list:
    """A tiny run that diverges: learning rate 1e9, no clipping; its loss is NaN from step 2.
    A checkpoint after every step, a log line every 4."""
    return [*tiny_args, "--max_train_samples", "64", "--per_device_train_batch_size", "8",
            "--max_train_steps", "4", "--logging_steps", "4", "--checkpointing_steps", "1",
            "--learning_rate", "1e9", "--max_grad_norm", "0", "--output_dir", tmp_path / "run"]


def test_a_nan_loss_stops_the_run_then_skipping_finishes_it(tmp_path, diverging):
    """The NaN of step 2 stops the run at its next read (the checkpoint of step 2 would have
    been one), in one line naming the step and the newest good checkpoint, with nothing
    evaluated, saved or exported after it. The same command with --skip_nonfinite_steps true
    then resumes from that checkpoint and skips the non-finite steps, counted in the log and in
    summary.json."""
    out = tmp_path / "run"
    stopped = run_cli(load_script(RECIPE).main, diverging)
    assert stopped.code == 2
    [line] = stopped.error_lines()
    good = out / "checkpoints" / "checkpoint-1"
    assert "training diverged: step 2 had loss nan" in line and "Fix: lower --learning_rate" in line
    assert f"it resumes from {good} (the newest good checkpoint)" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert not (out / "summary.json").exists() and not (out / "model").exists()
    assert [r[M.STEP] for r in M.read_metrics(out)] == [0]  # the step-0 eval only

    run = run_recipe([*diverging, "--skip_nonfinite_steps", "true"])
    assert "resuming from" in run.stdout and "checkpoint-1 (step 1" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary[M.STEP] == 4 and summary[M.TRAIN_SKIPPED_STEPS] == 3  # steps 2, 3, 4
    [logged] = [r for r in M.read_metrics(out) if M.TRAIN_LOSS in r]
    assert logged[M.STEP] == 4 and logged[M.TRAIN_SKIPPED_STEPS] == 3
    assert math.isfinite(logged[M.TRAIN_LOSS])  # step 1's (the window, from the checkpoint)
