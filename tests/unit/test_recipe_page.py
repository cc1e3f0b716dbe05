"""docs/recipe.md's launch lines, read from the page and run in this process as
`accelerate launch --config_file accelerate_configs/cpu.yaml` runs them (helpers.run_recipe):
the second phase of a context extension, and the starting config
(recipes/configs/modernbert_style.yaml) with only what the page tells a CPU user to add.
(The page's averaging command: tests/unit/train/test_average.py.)"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from helpers import ROOT, run_recipe, tiny_model
from readme_commands import readme_lines

from mlmkit.config.errors import ConfigError
from mlmkit.train import tracking as M
from mlmkit.train.tracking import read_metrics

PAGE = ROOT / "docs" / "recipe.md"
PHASE2 = "accelerate launch recipes/mlm.py --model_name_or_path outputs/phase1/model"
STARTING = "accelerate launch recipes/mlm.py --config recipes/configs/modernbert_style.yaml"
QUICK = ["--report_to", "none", "--progress_bar", "false", "--max_train_steps", "2",
         "--max_train_samples", "200", "--max_eval_samples", "32", "--fill_mask_check", "false",
         "--eval_pad_sensitivity", "false"]  # a tiny run's flags, after the page's (later wins)


def section(title: str) -> str:
    text = PAGE.read_text()
    start = text.index(f"## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


def test_a_second_phase_stretches_a_rotary_model_as_the_page_shows(tmp_path, tokenizer_path,
                                                                   monkeypatch):
    """A phase-1 ModernBERT trained at 1024 (the page's outputs/phase1/model, tiny here)
    continues at 8192 with the page's overrides; without them the length is refused, naming the
    override."""
    from transformers import AutoTokenizer
    (line,) = readme_lines(PHASE2)
    monkeypatch.chdir(tmp_path)
    phase1 = tmp_path / "outputs" / "phase1" / "model"
    model = tiny_model("modernbert", max_position_embeddings=1024)
    model.config.rope_parameters["full_attention"]["rope_theta"] = 10000.0  # ModernBERT's phase 1
    model.save_pretrained(phase1)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(phase1)
    args = line[3:]
    i = args.index("--config_overrides")
    with pytest.raises(ConfigError, match="takes at most 1024 tokens") as err:
        run_recipe([*args[:i], *args[i + 2:], *QUICK])
    assert "--config_overrides max_position_embeddings=8192 (rotary" in str(err.value)
    assert not (tmp_path / "outputs" / "phase2").exists()

    run = run_recipe([*args, *QUICK])
    assert "ModernBertForMaskedLM" in run.stdout and "padding=auto -> packed" in run.stdout
    config = json.loads((tmp_path / "outputs" / "phase2" / "model" / "config.json").read_text())
    assert config["max_position_embeddings"] == 8192
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 160000.0
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0


def test_the_starting_config_runs_as_the_page_tells_a_cpu_user(tmp_path, monkeypatch):
    """recipes/configs/modernbert_style.yaml on the embedded default, with the page's CPU
    flags and nothing else: the mask rate falls from 0.3 to 0.15, StableAdamW with the WSD 1-sqrt
    schedule, the batch warm-up, packed rows, and model_avg/ with its eval beside model/'s."""
    (line,) = readme_lines(STARTING)
    (cpu,) = re.findall(r"For a quick look on a CPU add `([^`]+)`",
                        section("A starting config").replace("\n", " "))
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # run "from the checkout" ...
    monkeypatch.chdir(tmp_path)  # ... with the config's relative output_dir in tmp_path
    run = run_recipe([*line[3:], *cpu.split()])
    out = tmp_path / "outputs" / "modernbert_style"
    assert "mask rate 0.3 -> 0.15" in run.stdout and "batch warm-up over 10 steps" in run.stdout
    assert "W&B: no API key found; logging offline" in run.stdout  # as written: W&B, offline
    assert "padding=packed" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary[M.STEP] == 8
    assert summary[M.AVERAGED_CHECKPOINTS] == [2, 4, 6, 8]
    assert summary[M.EVAL_LOSS] < summary[M.FIRST_EVAL_LOSS]
    assert summary[M.EVAL_AVG_LOSS] < summary[M.FIRST_EVAL_LOSS]
    assert (out / "model_avg" / "model.safetensors").is_file()
    assert (out / "model_avg" / "tokenizer.json").is_file()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["optimizer"] == "stable_adamw" and resolved["lr_decay_type"] == "1-sqrt"
    lrs = [r[M.TRAIN_LR] for r in read_metrics(out) if M.TRAIN_LR in r]
    assert lrs[-1] < max(lrs)  # decayed by the end
