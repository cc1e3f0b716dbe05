"""The recipe launched the way users launch it, one CPU process (`accelerate launch
--config_file accelerate_configs/cpu.yaml recipes/mlm.py ...`, tiny BERT): a run end to end, and
a user's mistake reaching them as one line through the launcher. The same recipe's other
single-process behaviours run in this process: tests/unit/test_recipe.py."""

from __future__ import annotations

import json
import re

import torch
import yaml

from helpers import launch
from mlmkit import tracking as M
from mlmkit.tracking import read_metrics


def test_recipe_trains_evaluates_and_exports(tmp_path, tiny_args):
    out = tmp_path / "run"
    proc = launch([*tiny_args, "--output_dir", str(out), "--max_train_steps", "12",
                   "--padding", "longest", "--learning_rate", "3e-3", "--eval_steps", "6",
                   "--max_train_samples", "400",
                   "--fill_mask_check", "true", "--eval_pad_sensitivity", "true"])
    assert "eval @ step 0" in proc.stdout and "eval @ step 12" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary[M.STEP] == 12
    assert summary[M.EVAL_LOSS] < summary["first/" + M.EVAL_LOSS] - 0.05  # it learned
    assert summary[M.TRAIN_RUNTIME] > 0
    # the fill-mask check: held-out sentences, top-5 of the initial model and of model/
    assert "fill-mask check" in proc.stdout
    assert len(summary["fill_mask"]) == 3
    for entry in summary["fill_mask"]:
        assert entry["text"].count("[MASK]") == 1 and entry["answer"].isalpha()
        assert len(entry["before"]) == len(entry["after"]) == 5
        assert entry["before"] != entry["after"]  # model/ holds the trained weights
        assert all(isinstance(entry[k], int) and entry[k] >= 1
                   for k in ("rank_before", "rank_after"))
    assert not (out / "model.initial").exists()  # the initial model's export is cleaned up

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["learning_rate"] == 3e-3 and resolved["max_train_steps"] == 12

    records = read_metrics(out)
    train = [r for r in records if M.TRAIN_LOSS in r]
    evals = [r for r in records if M.EVAL_LOSS in r]
    assert [r[M.STEP] for r in evals] == [0, 6, 12]
    assert [r[M.STEP] for r in train] == [2, 4, 6, 8, 10, 12]
    for name in (M.TRAIN_LR, M.TRAIN_GRAD_NORM, M.TRAIN_TOKENS_PER_S, M.TRAIN_REAL_TOKENS_PER_S,
                 M.TRAIN_PAD_FRACTION, M.TRAIN_MASKED_TOKENS, M.SYS_PEAK_MEM_GB, M.EPOCH,
                 M.TRAIN_TFLOPS, M.TRAIN_DATA_WAIT_FRACTION):
        assert all(name in line for line in train), name
    assert all(line[M.TRAIN_TFLOPS] > 0 for line in train)
    for name in (M.EVAL_PERPLEXITY, M.EVAL_LOSS_UNMASKED, M.EVAL_PAD_SENSITIVITY):
        assert name in evals[-1], name
    # dynamic padding of a line-by-line corpus: real padding, and the mask hides it
    assert 0.2 < train[-1][M.TRAIN_PAD_FRACTION] < 0.9
    assert train[-1][M.TRAIN_REAL_TOKENS_PER_S] < train[-1][M.TRAIN_TOKENS_PER_S]

    # the exported model is a real HF checkpoint with the trained weights and the tokenizer
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    model = AutoModelForMaskedLM.from_pretrained(out / "model")
    AutoTokenizer.from_pretrained(out / "model")
    assert (out / "model" / "model.safetensors").is_file()
    fresh = AutoModelForMaskedLM.from_config(model.config)
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.weight,
                           fresh.bert.encoder.layer[0].attention.self.query.weight)


def test_a_mistake_is_one_error_line_through_accelerate_launch(tmp_path, tiny_args):
    """A ConfigError reaches the user as the recipe's one `mlmkit: error: ... Fix: ...` line and
    its exit status 2 (which `accelerate launch` reports, exiting 1 itself), with no traceback
    from mlmkit or the recipe, before anything is written. (Each mistake's message: in process,
    tests/unit/test_config.py and tests/unit/test_recipe.py.)"""
    out = tmp_path / "run"
    proc = launch([*tiny_args, "--output_dir", str(out), "--mlm_probability", "1.5"],
                  check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # accelerate launch's own status
    assert "returned non-zero exit status 2" in proc.stderr  # the recipe's
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mlmkit: error:")]
    assert errors == ["mlmkit: error: mlm_probability=1.5: must lie strictly between 0 and 1. "
                      "Fix: pass e.g. --mlm_probability 0.15."]
    assert not re.search(r'File ".*(mlmkit|recipes/mlm\.py)', proc.stderr)
    assert not out.exists()  # failed before anything was written
