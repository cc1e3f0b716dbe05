"""A user's mistake reaches the user as one line through the real entry points: `accelerate
launch recipes/mlm.py` and `python recipes/mlm.py` (the in-process suite of mistakes is
tests/unit/test_user_errors.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RECIPE, ROOT, TINY_BERT, launch

# A frame of a traceback through the project's code (src/mlmkit or the recipe).
OUR_FRAME = re.compile(r'File ".*(mlmkit|recipes/mlm\.py)')


@pytest.fixture(scope="module")
def model_without_tokenizer(tmp_path_factory) -> Path:
    """A model folder with config.json and weights but no tokenizer files (the issue's first
    input: transformers would build a tokenizer with an empty vocabulary)."""
    from transformers import AutoConfig, AutoModelForMaskedLM
    path = tmp_path_factory.mktemp("no_tokenizer")
    AutoModelForMaskedLM.from_config(AutoConfig.for_model(**TINY_BERT)).save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    return path


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("mlmkit: error:")]
    assert len(lines) == 1, stderr[-4000:]
    assert "Fix:" in lines[0]
    assert not OUR_FRAME.search(stderr), stderr[-4000:]
    return lines[0]


def test_model_folder_mistake_through_accelerate_launch(tmp_path, model_without_tokenizer):
    out = tmp_path / "run"
    proc = launch(["--model_name_or_path", str(model_without_tokenizer), "--report_to", "none",
                   "--output_dir", str(out)], check=False)
    line = _one_error_line(proc.stderr)
    assert "has no tokenizer files" in line and "--tokenizer_name" in line
    # The recipe exits with status 2; accelerate's launcher reports it ("returned non-zero exit
    # status 2", in a traceback through accelerate's own code) and exits non-zero itself.
    assert proc.returncode != 0
    assert "exit status 2" in proc.stderr
    assert not out.exists()  # nothing written, not even the folder


def test_model_folder_mistake_through_python(tmp_path, model_without_tokenizer):
    """Without a launcher the exit status is the recipe's own: 2, and no traceback at all."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(RECIPE), "--model_name_or_path",
                           str(model_without_tokenizer), "--report_to", "none",
                           "--output_dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert "has no tokenizer files" in _one_error_line(proc.stderr)
    assert not out.exists()
