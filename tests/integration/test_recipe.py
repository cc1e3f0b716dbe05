"""The recipe end to end, launched the way users launch it (one CPU process, tiny BERT)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from helpers import launch
from mlmkit import tracking as M
from mlmkit.tracking import read_metrics


def test_recipe_trains_evaluates_and_exports(tmp_path, tiny_args):
    out = tmp_path / "run"
    proc = launch([*tiny_args, "--output_dir", str(out), "--max_train_steps", "12",
                   "--padding", "longest", "--learning_rate", "3e-3", "--eval_steps", "6", "--max_train_samples", "400"])
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


def test_finished_run_is_not_overwritten(tmp_path, tiny_args):
    out = tmp_path / "run"
    args = [*tiny_args, "--output_dir", str(out), "--max_train_steps", "2",
            "--eval_pad_sensitivity", "false"]
    launch(args)
    before = (out / "summary.json").read_text()
    proc = launch(args, check=False)
    assert proc.returncode != 0
    assert "--overwrite_output_dir" in proc.stderr
    assert (out / "summary.json").read_text() == before
    launch([*args, "--overwrite_output_dir", "true"])


@pytest.mark.parametrize("extra, message", [
    (["--lerning_rate", "1e-4"], "did you mean --learning_rate"),
    (["--mlm_probability", "1.5"], "mlm_probability"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
    (["--train_file", "does/not/exist.txt"], "train_file"),
    (["--padding", "sideways"], "padding"),
])
def test_bad_config_fails_fast_and_writes_nothing(tmp_path, tiny_args, extra, message):
    out = tmp_path / "run"
    proc = launch([*tiny_args, "--output_dir", str(out), *extra], check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Fix" in proc.stderr or "did you mean" in proc.stderr
    assert not out.exists()  # failed before anything was written


def test_bad_yaml_key_and_empty_corpus(tmp_path, tiny_args):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("learning_rate: 1e-4\nzero_stage: 3\n")
    proc = launch(["--config", str(bad_yaml), *tiny_args, "--output_dir", str(tmp_path / "a")],
                  check=False)
    assert proc.returncode != 0
    assert "unknown key 'zero_stage'" in proc.stderr and "accelerate_configs" in proc.stderr

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    out = tmp_path / "b"
    proc = launch([*tiny_args, "--train_file", str(empty), "--output_dir", str(out)], check=False)
    assert proc.returncode != 0
    assert "Fix" in proc.stderr and str(empty) in proc.stderr
    assert not (out / "summary.json").exists() and not (out / "model").exists()


def test_local_files_replace_the_default(tmp_path, tiny_args):
    """--train_file/--validation_file (jsonl, custom text column) through datasets.load_dataset."""
    rows = [{"body": f"the quick brown fox number {i} jumps over the lazy dog"} for i in range(40)]
    for name, part in (("train.jsonl", rows[:32]), ("valid.jsonl", rows[32:])):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in part) + "\n")
    out = tmp_path / "run"
    proc = launch([*tiny_args, "--train_file", str(tmp_path / "train.jsonl"),
                   "--validation_file", str(tmp_path / "valid.jsonl"), "--text_column", "body",
                   "--line_by_line", "false", "--max_seq_length", "32", "--max_train_steps", "2",
                   "--per_device_train_batch_size", "4", "--output_dir", str(out)])
    assert "data: " in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train/examples"] >= 1
