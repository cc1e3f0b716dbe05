"""--torch_compile and --gradient_checkpointing, launched as users run them: same losses as eager
training without checkpointing (compiled kernels may round differently: within 1e-4)."""

from __future__ import annotations

import json

import pytest

from helpers import launch, train_losses


@pytest.fixture(scope="module")
def eager(tmp_path_factory, tiny_args):
    out = tmp_path_factory.mktemp("eager")
    launch([*tiny_args, "--output_dir", str(out), "--max_train_steps", "3", "--logging_steps", "1",
            "--fill_mask_check", "false"])
    return train_losses(out), json.loads((out / "summary.json").read_text())


def test_torch_compile_trains_with_the_eager_first_step_loss(tmp_path, tiny_args, eager):
    out = tmp_path / "compiled"
    launch([*tiny_args, "--output_dir", str(out), "--max_train_steps", "3", "--logging_steps", "1",
            "--fill_mask_check", "false", "--torch_compile", "true"], timeout=600)
    losses, (reference, _) = train_losses(out), eager
    assert len(losses) == 3
    assert abs(losses[0] - reference[0]) < 1e-4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train/tflops"] > 0 and "train/mfu" in summary  # None on CPU: no known peak


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_args, eager):
    out = tmp_path / "checkpointed"
    launch([*tiny_args, "--output_dir", str(out), "--max_train_steps", "3", "--logging_steps", "1",
            "--fill_mask_check", "false", "--gradient_checkpointing", "true"])
    reference, ref_summary = eager
    assert train_losses(out) == pytest.approx(reference, abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/loss"] == pytest.approx(ref_summary["eval/loss"], abs=1e-6)
