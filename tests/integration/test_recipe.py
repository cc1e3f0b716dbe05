"""The recipe launched the way users launch it (`accelerate launch --config_file
accelerate_configs/cpu.yaml recipes/mlm.py ...`) and through python: a user's mistake reaches them
as one line. The recipe's single-process behaviours (a run end to end, other encoders, speed
options...) run in this process: tests/unit/test_recipe.py; every mistake's message:
tests/unit/test_user_errors.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import RECIPE, ROOT, launch, launch_env, tiny_model

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
