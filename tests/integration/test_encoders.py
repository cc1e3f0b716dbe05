"""The recipe on encoders other than BERT, launched as users launch it: what the start-up probe
refuses is refused before anything is written, default flags train every attention
implementation, and the masked-only head trains ModernBERT and DistilBERT like the full head."""

from __future__ import annotations

import json
import re

import pytest

from helpers import launch, tiny_config_dir
from mlmkit import tracking as M

FEW_STEPS = ["--report_to", "none", "--progress_bar", "false", "--max_train_samples", "64",
             "--max_eval_samples", "32", "--max_train_steps", "3", "--logging_steps", "1",
             "--eval_pad_sensitivity", "false", "--learning_rate", "1e-3"]


def tiny_config(tmp_path, tokenizer, model_type: str, **overrides) -> str:
    return tiny_config_dir(tmp_path / f"tiny_{model_type}", model_type, tokenizer, **overrides)


def args_for(tmp_path, tokenizer, tokenizer_path, model_type: str, out: str, *extra) -> list[str]:
    return ["--config_name", tiny_config(tmp_path, tokenizer, model_type),
            "--tokenizer_name", tokenizer_path, "--output_dir", str(tmp_path / out),
            *FEW_STEPS, *extra]


@pytest.mark.parametrize("model_type", ["mobilebert", "deberta-v2"])
def test_packed_is_refused_where_the_probe_finds_no_isolation(tmp_path, tokenizer,
                                                               tokenizer_path, model_type):
    proc = launch(args_for(tmp_path, tokenizer, tokenizer_path, model_type, "run",
                           "--padding", "packed"), check=False)
    assert proc.returncode != 0, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mlmkit: error:")]
    assert len(errors) == 1 and "padding=packed: packed examples are not isolated" in errors[0]
    # the recipe exits with its one line (accelerate's launcher adds its own CalledProcessError)
    assert not re.search(r'File ".*(mlmkit|recipes/mlm\.py)', proc.stderr)
    assert "train:" not in proc.stdout  # refused before training
    # nothing a later run would take for a result, or that would block another padding mode
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]


@pytest.mark.parametrize("model_type", ["deberta-v2", "mpnet", "roformer"])
def test_default_flags_train_encoders_without_sdpa(tmp_path, tokenizer, tokenizer_path,
                                                   model_type):
    out = tmp_path / "run"
    launch(args_for(tmp_path, tokenizer, tokenizer_path, model_type, "run"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary[M.STEP] == 3 and summary["probe/padded_isolated"] is True
    assert summary["probe/attn_implementation"] == "eager"  # what transformers chose for them


@pytest.mark.parametrize("model_type", ["modernbert", "distilbert"])
def test_masked_only_head_trains_like_the_full_head(tmp_path, tokenizer, tokenizer_path,
                                                    model_type):
    losses = {}
    for sparse in ("true", "false"):
        out = tmp_path / f"sparse_{sparse}"
        proc = launch(args_for(tmp_path, tokenizer, tokenizer_path, model_type, out.name,
                               "--padding", "longest", "--sparse_prediction", sparse))
        assert f"sparse_prediction={sparse.capitalize()}" in proc.stdout
        assert "using the full head" not in proc.stdout
        losses[sparse] = json.loads((out / "summary.json").read_text())[M.EVAL_LOSS]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-4)
