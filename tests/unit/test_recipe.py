"""recipes/mlm.py's main() in this process (helpers.run_recipe: one CPU process, as
`accelerate launch --config_file accelerate_configs/cpu.yaml` runs it, on the tiny BERT): a run
end to end, user mistakes refused before anything is written, the output-folder checks, local
files, encoders other than BERT, the global batch and the speed options. What only a launch can
show -- the launcher and its error line, several processes, signals, Slurm -- is in
tests/integration/."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from helpers import (
    RECIPE,
    load_script,
    run_cli,
    run_recipe,
    tiny_config_dir,
    train_losses,
)
from readme_commands import readme_lines

from mlmkit.config.errors import ConfigError
from mlmkit.config.shape import Ramps
from mlmkit.train import tracking as M
from mlmkit.train.tracking import read_metrics


# ------------------------------------------------------------------------------ a run
def test_recipe_trains_evaluates_and_exports(tmp_path, tiny_args, monkeypatch):
    """12 steps with the fill-mask check, the pad-sensitivity probe and docs/downstream.md's
    downstream measures on (its commands as written, then the tiny run's flags): what a run
    writes."""
    from mlmkit.data.probe_sets import main as probe_sets
    (write,) = readme_lines("python -m mlmkit.data.probe_sets docs probes")
    (line,) = readme_lines("accelerate launch recipes/mlm.py --probe_file")
    monkeypatch.chdir(tmp_path)  # the docs' relative probes/ folder
    probe_sets(write[3:])
    out = tmp_path / "run"
    run = run_recipe([*line[3:], *tiny_args, "--output_dir", out, "--max_train_steps", "12",
                      "--padding", "longest", "--learning_rate", "3e-3", "--eval_steps", "6",
                      "--max_train_samples", "400",
                      "--fill_mask_check", "true", "--eval_pad_sensitivity", "true"])
    assert "eval @ step 0" in run.stdout and "eval @ step 12" in run.stdout
    assert "labels from probes/docs.tsv" in run.stdout and "probe accuracy" in run.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(run.result))  # what main() returned
    assert summary[M.STEP] == 12
    assert summary[M.EVAL_LOSS] < summary["first/" + M.EVAL_LOSS] - 0.05  # it learned
    assert summary[M.TRAIN_RUNTIME] > 0
    # the fill-mask check: held-out sentences, top-5 of the initial model and of model/
    assert "fill-mask check" in run.stdout
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
    # device time over wall time is a GPU's: absent on CPU (neither 0 nor 1)
    assert M.TRAIN_GPU_BUSY_FRACTION not in summary
    assert not any(M.TRAIN_GPU_BUSY_FRACTION in line for line in train)
    assert all(line[M.TRAIN_TFLOPS] > 0 for line in train)
    for name in (M.EVAL_PERPLEXITY, M.EVAL_LOSS_UNMASKED, M.EVAL_PAD_SENSITIVITY):
        assert name in evals[-1], name
    # the downstream measures at every eval, the last and the first in the summary
    for name in (M.EVAL_PROBE_ACCURACY, M.EVAL_PROBE_ACCURACY_STD, M.EVAL_PSEUDO_PERPLEXITY):
        assert all(name in r for r in evals), name
        assert summary[name] == evals[-1][name]
    assert M.EVAL_PROBE_ACCURACY_UNMASKED not in summary  # --probe_mask_padding true
    assert 0 < summary[M.EVAL_PROBE_ACCURACY] <= 1
    assert summary[M.FIRST_EVAL_PROBE_ACCURACY] == evals[0][M.EVAL_PROBE_ACCURACY]
    assert summary[M.EVAL_PSEUDO_PERPLEXITY] < summary[M.FIRST_EVAL_PSEUDO_PERPLEXITY]  # learned
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


# User mistakes (bad flags, YAML keys, empty corpora, ...): tests/unit/test_user_errors.py.


# ------------------------------------------------------------------------------ the output folder
def test_finished_run_or_other_settings_are_refused_before_loading(tmp_path, tiny_args):
    """A finished run is not overwritten (unless --overwrite_output_dir true), and a folder of a
    run with other settings is not resumed; both fail before anything is loaded or touched."""
    out = tmp_path / "run"
    args = [*tiny_args, "--output_dir", out, "--max_train_steps", "2", "--learning_rate", "1e-3"]
    run_recipe(args)
    before = (out / "summary.json").read_text()
    with pytest.raises(ConfigError, match=r"finished run.*--overwrite_output_dir true"):
        run_recipe(args)
    assert (out / "summary.json").read_text() == before

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((out / "config.yaml").read_text())
    with pytest.raises(ConfigError, match=r"different settings \(learning_rate: 0.001 there, "
                                          r"0.002 now\).*to resume it"):
        run_recipe([*args, "--output_dir", unfinished, "--learning_rate", "2e-3"])
    assert sorted(p.name for p in unfinished.iterdir()) == ["config.yaml"]  # nothing touched

    rerun = run_recipe([*args, "--overwrite_output_dir", "true"])
    assert rerun.result[M.STEP] == 2
    assert json.loads((out / "summary.json").read_text())[M.STEP] == 2


# ------------------------------------------------------------------------------ local files
def test_local_files_replace_the_default(tmp_path, tiny_args, tokenizer):
    """--train_file/--validation_file (jsonl, custom text column) through datasets.load_dataset:
    the train set is the whole train file and the eval set is the validation file's, grouped
    into blocks of --max_seq_length (no validation split carved out of the train file)."""
    rows = [{"body": f"the quick brown fox number {i} jumps over the lazy dog"} for i in range(40)]
    parts = {"train": rows[:32], "valid": rows[32:]}
    for name, part in parts.items():
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in part) + "\n")
    blocks = {name: math.ceil(sum(len(tokenizer(r["body"])["input_ids"]) for r in part) / 32)
              for name, part in parts.items()}
    out = tmp_path / "run"
    run = run_recipe([*tiny_args, "--train_file", tmp_path / "train.jsonl",
                      "--validation_file", tmp_path / "valid.jsonl", "--text_column", "body",
                      "--line_by_line", "false", "--max_seq_length", "32", "--max_train_steps",
                      "2", "--per_device_train_batch_size", "4", "--output_dir", out])
    assert f"data: {blocks['train']} train / {blocks['valid']} validation examples" in run.stdout
    assert run.result["train/examples"] == blocks["train"]
    assert run.result[M.STEP] == 2


# ------------------------------------------------------------------------------ other encoders
FEW_STEPS = ["--report_to", "none", "--progress_bar", "false", "--max_train_samples", "64",
             "--max_eval_samples", "32", "--max_train_steps", "3", "--logging_steps", "1",
             "--eval_pad_sensitivity", "false", "--fill_mask_check", "false",
             "--learning_rate", "1e-3"]


def encoder_args(tmp_path, tokenizer, tokenizer_path, model_type: str, *extra) -> list:
    return ["--config_name", tiny_config_dir(tmp_path / f"tiny_{model_type}", model_type,
                                             tokenizer),
            "--tokenizer_name", tokenizer_path, "--output_dir", tmp_path / "run",
            *FEW_STEPS, *extra]


@pytest.mark.parametrize("model_type", ["mobilebert", "convbert"])  # they mix tokens
def test_packed_is_refused_where_the_probe_finds_no_isolation(tmp_path, tokenizer,
                                                               tokenizer_path, model_type):
    """The start-up probe's refusal is the entry point's one error line (exit status 2), before
    training and before anything is written."""
    done = run_cli(load_script(RECIPE).main, encoder_args(tmp_path, tokenizer, tokenizer_path,
                                                          model_type, "--padding", "packed"))
    assert done.code == 2, done.stderr[-2000:]
    (error,) = done.error_lines()
    assert "padding=packed: packed examples are not isolated" in error and "Fix:" in error
    assert "train:" not in done.stdout  # refused before training
    # nothing a later run would take for a result, or that would block another padding mode
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]


# Packed through a path of their own (modeling.use_packed_path; the README's architecture table).
OWN_PACKED_PATH = ["modernbert", "esm", "deberta", "deberta-v2", "longformer", "xlm", "flaubert",
                   "layoutlm", "xmod"]


@pytest.mark.parametrize("model_type", OWN_PACKED_PATH)
def test_default_padding_resolves_to_packed_and_trains(tmp_path, tokenizer, tokenizer_path,
                                                       model_type):
    """The default --padding auto on these architectures: the probe proves packed isolation on
    the path training takes, the run trains packed (the packed = padded eval loss, per
    architecture: tests/unit/model/test_modeling.py)."""
    run = run_recipe(encoder_args(tmp_path, tokenizer, tokenizer_path, model_type))
    assert "padding=auto -> packed" in run.stdout, run.stdout[-3000:]
    assert run.result["probe/packed_isolated"] is True and run.result[M.STEP] == 3
    assert "padding=packed" in run.stdout and math.isfinite(run.result[M.EVAL_LOSS])


@pytest.mark.parametrize("model_type", ["deberta-v2", "mpnet", "roformer"])
def test_default_flags_train_encoders_without_sdpa(tmp_path, tokenizer, tokenizer_path,
                                                   model_type):
    summary = run_recipe(encoder_args(tmp_path, tokenizer, tokenizer_path, model_type)).result
    assert summary[M.STEP] == 3 and summary["probe/padded_isolated"] is True
    assert summary["probe/attn_implementation"] == "eager"  # what transformers chose for them


@pytest.mark.parametrize("model_type", ["modernbert", "distilbert"])
def test_masked_only_head_trains_modernbert_and_distilbert(tmp_path, tokenizer, tokenizer_path,
                                                           model_type):
    """The recipe keeps the masked-only head for these layouts (the probe finds it equal to the
    full head). That it trains exactly like the full head -- same loss and gradients -- is
    tests/unit/model/test_modeling.py::test_masked_only_head_equals_the_full_head."""
    run = run_recipe(encoder_args(tmp_path, tokenizer, tokenizer_path, model_type,
                                  "--padding", "longest"))
    assert "sparse_prediction=True" in run.stdout and "using the full head" not in run.stdout
    assert run.result["probe/sparse_head"] is True and run.result[M.STEP] == 3
    assert math.isfinite(run.result[M.EVAL_LOSS])


# ------------------------------------------------------------------------------ the global batch
def test_gradient_accumulation_gives_the_losses_of_the_whole_batch(tmp_path, tiny_args):
    """1 process x 8 == 1 process x 4 x 2 accumulation steps (fp32, no dropout): the loss is the
    mean over the masked tokens of the whole global batch. (Across processes and engines:
    tests/integration/test_distributed.py.)"""
    common = [*tiny_args, "--max_train_steps", "4", "--logging_steps", "1", "--learning_rate",
              "3e-3", "--max_train_samples", "200"]
    run_recipe([*common, "--per_device_train_batch_size", "8", "--output_dir", tmp_path / "one"])
    run_recipe([*common, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps",
                "2", "--output_dir", tmp_path / "accum"])
    whole, accumulated = train_losses(tmp_path / "one"), train_losses(tmp_path / "accum")
    assert len(whole) == 4
    for a, b in zip(whole, accumulated, strict=True):
        assert abs(a - b) / abs(a) <= 1e-4, (whole, accumulated)
    assert abs(whole[-1] - whole[0]) > 1e-3  # training moved: the comparison has teeth


# ------------------------------------------------------------------------------ token budgets
def test_token_budget_packed_is_rows_of_max_seq_length(tmp_path, tiny_args):
    """--per_device_train_tokens 256 at max_seq_length 64, packed: 4 rows per device, the very
    steps of --per_device_train_batch_size 4."""
    common = [*tiny_args, "--padding", "packed", "--max_seq_length", "64", "--max_train_steps",
              "3", "--logging_steps", "1", "--max_train_samples", "200"]
    run_recipe([*common, "--per_device_train_batch_size", "4", "--output_dir", tmp_path / "rows"])
    run = run_recipe([*common, "--per_device_train_tokens", "256", "--output_dir",
                      tmp_path / "tokens"])
    assert "steps x 4 rows (4 per device x 1 accumulation x 1 processes)" in run.stdout
    rows, tokens = train_losses(tmp_path / "rows"), train_losses(tmp_path / "tokens")
    assert len(rows) == 3 and tokens == rows


def test_token_budget_padded_fills_micro_batches_and_resumes_exactly(tmp_path, tiny_args):
    """--per_device_train_tokens 512, padded to the longest: every step computes at most 512
    positions (rows x width) and fills most of them; a run resumed from its step-3 checkpoint
    trains the same steps (the plan is a function of seed, epoch and lengths), span masking
    included (spans keyed by seed, epoch and idx like every mask)."""
    out, budget = tmp_path / "run", 512
    args = [*tiny_args, "--padding", "longest", "--max_seq_length", "64", "--span_masking",
            "--per_device_train_tokens", str(budget), "--max_train_steps", "6",
            "--logging_steps", "1", "--checkpointing_steps", "3", "--max_train_samples", "300",
            "--output_dir", out]
    run = run_recipe(args)
    assert f"as many as fit in {budget} padded tokens, at least 8, per device" in run.stdout
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    computed = state["total"]["computed"]  # padded positions of the 6 steps
    assert 0.6 * 6 * budget < computed <= 6 * budget
    losses = train_losses(out)
    assert len(losses) == 6
    # killed after the step-6 checkpoint was written? resume from step 3 instead:
    for done in (out / "checkpoints" / "checkpoint-6", out / "model"):
        shutil.rmtree(done)
    (out / "summary.json").unlink()
    again = run_recipe(args)
    assert "resuming from" in again.stdout
    assert train_losses(out) == losses


# ------------------------------------------------------------------------------ schedules
def test_schedules_log_each_steps_values_and_resume_exactly_mid_warmup(tmp_path, tiny_args):
    """The mask-rate schedule and the length and batch warm-ups: every log line carries the
    newest step's train/mlm_probability, train/seq_length and train/batch_fraction (the pure
    functions of the step, `shape.Ramps`), and a run resumed from its step-3 checkpoint, in the
    middle of all three, trains the very same steps to the same losses. The rest of the
    2024-26 recipe rides along (StableAdamW, the WSD schedule's 1-sqrt decay, averaged
    checkpoints), so one tiny run has every option: model_avg/ scored in summary.json."""
    out = tmp_path / "run"
    args = [*tiny_args, "--padding", "longest", "--max_seq_length", "128",
            "--per_device_train_batch_size", "8", "--max_train_steps", "8", "--logging_steps",
            "1", "--checkpointing_steps", "3", "--max_train_samples", "300",
            "--mlm_probability", "0.3", "--mlm_probability_final", "0.15",
            "--seq_len_warmup_steps", "6", "--seq_len_warmup_start", "32",
            "--batch_warmup_steps", "5", "--optimizer", "stable_adamw",
            "--lr_scheduler_type", "warmup_stable_decay", "--lr_decay_type", "1-sqrt",
            "--average_checkpoints", "2", "--output_dir", out]
    run = run_recipe(args)
    assert "mask rate 0.3 -> 0.15, length 32 -> 128 over 6 steps, batch warm-up over 5" in \
        run.stdout
    records = [r for r in read_metrics(out) if M.TRAIN_LOSS in r]
    ramps = Ramps(128, 32, 6, 5, 0.3, 0.15, total_steps=8)
    assert [r[M.TRAIN_SEQ_LENGTH] for r in records] == [32, 32, 64, 64, 64, 64, 128, 128]
    fractions = [r[M.TRAIN_BATCH_FRACTION] for r in records]
    assert fractions == [ramps.shape(t, 8).fraction for t in range(8)]
    assert fractions[0] < 0.2 and sorted(fractions) == fractions and fractions[4:] == [1.0] * 4
    assert [r[M.TRAIN_MLM_PROBABILITY] for r in records] == [
        ramps.mlm_probability(t) for t in range(8)]
    assert records[0][M.TRAIN_MLM_PROBABILITY] == 0.3 and records[-1][
        M.TRAIN_MLM_PROBABILITY] == pytest.approx(0.15)
    losses = train_losses(out)
    for done in (out / "checkpoints" / "checkpoint-6", out / "model"):
        shutil.rmtree(done)
    (out / "summary.json").unlink()
    again = run_recipe(args)
    assert "resuming from" in again.stdout and "(step 3;" in again.stdout
    assert train_losses(out) == losses
    assert [r[M.TRAIN_MLM_PROBABILITY] for r in read_metrics(out) if M.TRAIN_LOSS in r] == [
        ramps.mlm_probability(t) for t in range(8)]
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "model_avg").is_dir() and summary[M.AVERAGED_CHECKPOINTS] == [6, 8]
    assert math.isfinite(summary[M.EVAL_AVG_LOSS])


# ------------------------------------------------------------------------------ speed options
@pytest.fixture(scope="module")
def eager(tmp_path_factory, tiny_args):
    out = tmp_path_factory.mktemp("eager")
    run = run_recipe([*tiny_args, "--output_dir", out, "--max_train_steps", "3",
                      "--logging_steps", "1"])
    return train_losses(out), run.result


def test_torch_compile_trains_with_the_eager_losses(tmp_path, tiny_args, eager):
    """The compiled step on static shapes (packed rows, `prefetch.StaticShapes`): compiled
    kernels may round differently, so every step's loss within 1e-4 of the eager run's; the
    first step (compilation) is timed and reported."""
    out = tmp_path / "compiled"
    run = run_recipe([*tiny_args, "--output_dir", out, "--max_train_steps", "3",
                      "--logging_steps", "1", "--torch_compile", "true"])
    summary, losses, (reference, _) = run.result, train_losses(out), eager
    assert summary[M.PADDING] == "packed"  # the static-shape path
    assert len(losses) == 3
    assert losses == pytest.approx(reference, abs=1e-4)
    assert summary[M.TRAIN_COMPILE_SECONDS] > 0
    assert "compiled training step: the first step took" in run.stdout
    assert summary[M.TRAIN_TFLOPS] > 0
    assert summary[M.TRAIN_MFU] is None  # CPU: no known peak, so no MFU


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_args, eager):
    out = tmp_path / "checkpointed"
    summary = run_recipe([*tiny_args, "--output_dir", out, "--max_train_steps", "3",
                          "--logging_steps", "1", "--gradient_checkpointing", "true"]).result
    reference, ref_summary = eager
    assert len(reference) == 3
    assert train_losses(out) == pytest.approx(reference, abs=1e-6)
    assert summary[M.EVAL_LOSS] == pytest.approx(ref_summary[M.EVAL_LOSS], abs=1e-6)
