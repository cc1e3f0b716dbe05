"""Shared fixtures: a tiny BERT built from a config, the embedded tokenizer, and a launcher that
runs the recipe exactly as users do (`accelerate launch recipes/mlm.py ...` in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mlm.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")

TINY_BERT = {
    "model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 512,
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "pad_token_id": 0,
}


def pytest_collection_modifyitems(items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    """The embedded model's tokenizer; MLMKIT_TEST_TOKENIZER names another folder (a GPU machine
    without the embedded model package: .gpu/tok)."""
    if os.environ.get("MLMKIT_TEST_TOKENIZER"):
        return os.environ["MLMKIT_TEST_TOKENIZER"]
    from mlmkit.modeling import embedded_model_path
    return str(embedded_model_path())


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_bert")
    (path / "config.json").write_text(json.dumps(TINY_BERT))
    return str(path)


@pytest.fixture(scope="session")
def tiny_args(tiny_bert_dir, tokenizer_path) -> list[str]:
    """Recipe flags for a fast run on the tiny BERT and a slice of the embedded corpus."""
    return ["--config_name", tiny_bert_dir, "--tokenizer_name", tokenizer_path,
            "--report_to", "none", "--progress_bar", "false", "--max_eval_samples", "64",
            "--per_device_eval_batch_size", "32", "--logging_steps", "2"]


def launch(args: list[str], *, accelerate_args: list[str] | None = None, cwd=None,
           timeout: int = 300, env: dict | None = None, check: bool = True):
    """Run `accelerate launch [accelerate_args] recipes/mlm.py [args]`; return the process."""
    accelerate_args = accelerate_args or ["--config_file", str(ROOT / "accelerate_configs/cpu.yaml")]
    cmd = [str(ACCELERATE), "launch", *accelerate_args, str(RECIPE), *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc
