"""The recipe launched the way users launch it, one CPU process (`accelerate launch
--config_file accelerate_configs/cpu.yaml recipes/mlm.py ...`): a user's mistake reaches them as
one line through the launcher. The recipe's single-process behaviours (a run end to end, the
refusals, other encoders, speed options...) run in this process: tests/unit/test_recipe.py;
one-process training launches: test_resume.py, test_runlock_launch.py, test_ablation.py and the
README's data commands (test_readme_data_commands.py)."""

from __future__ import annotations

import re

from helpers import launch


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
