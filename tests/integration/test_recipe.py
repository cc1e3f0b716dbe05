"""The recipe launched the way users launch it, one CPU process (`accelerate launch
--config_file accelerate_configs/cpu.yaml recipes/mlm.py ...`, tiny BERT): a run end to end, and
a user's mistake reaching them as one line through the launcher (and through python). The same
recipe's other single-process behaviours run in this process: tests/unit/test_recipe.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import RECIPE, ROOT, launch, launch_env, tiny_model
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


# A model folder with config.json and weights but no tokenizer files: transformers would build a
# tokenizer with an empty vocabulary; the recipe refuses it (modelcheck.py) before anything loads.
# Every other mistake's message is checked in process: tests/unit/test_user_errors.py.
OUR_FRAME = re.compile(r'File ".*(mlmkit|recipes/mlm\.py)')  # a traceback through our code


@pytest.fixture(scope="module")
def model_without_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("no_tokenizer")
    tiny_model("bert").save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    return path


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("mlmkit: error:")]
    assert len(lines) == 1 and "Fix:" in lines[0], stderr[-4000:]
    assert not OUR_FRAME.search(stderr), stderr[-4000:]
    return lines[0]


def test_a_mistake_is_one_error_line_through_accelerate_launch(tmp_path, model_without_tokenizer):
    """The recipe's one `mlmkit: error: ... Fix: ...` line and its exit status 2 (which `accelerate
    launch` reports in a traceback of its own, exiting 1), no traceback from mlmkit or the recipe,
    nothing written."""
    out = tmp_path / "run"
    proc = launch(["--model_name_or_path", str(model_without_tokenizer), "--report_to", "none",
                   "--output_dir", str(out)], check=False)
    line = one_error_line(proc.stderr)
    assert "has no tokenizer files" in line and "--tokenizer_name" in line
    assert proc.returncode == 1, proc.stderr[-3000:]  # accelerate launch's own status
    assert "returned non-zero exit status 2" in proc.stderr  # the recipe's
    assert not out.exists()  # nothing written, not even the folder


def test_a_mistake_through_python_exits_2_without_a_traceback(tmp_path, model_without_tokenizer):
    """Without a launcher the exit status is the recipe's own: 2, and no traceback at all."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(RECIPE), "--model_name_or_path",
                           str(model_without_tokenizer), "--report_to", "none",
                           "--output_dir", str(out)],
                          cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert "has no tokenizer files" in one_error_line(proc.stderr)
    assert not out.exists()
