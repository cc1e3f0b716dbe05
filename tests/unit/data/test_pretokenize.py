"""pretokenize.py -- tokenize once, train many times: `recipes/pretokenize.py` writes a folder,
`recipes/mlm.py --tokenized_dir` trains from it exactly as from the raw corpus, and a folder that
does not fit the run (or is not one) is refused with one line naming the fix. The scripts' main()
run in this process (helpers.run_cli, helpers.run_recipe); the README's pretokenize and
--tokenized_dir commands are launched as written in
tests/integration/test_readme_data_commands.py."""

from __future__ import annotations

import json
import re
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import RECIPE, ROOT, load_script, run_cli, run_recipe
from transformers import AutoTokenizer

from mlmkit.config.errors import ConfigError, DataError
from mlmkit.config.fields import MLMConfig
from mlmkit.data.corpus import embedded_corpus
from mlmkit.data.pretokenize import (
    METADATA,
    load_pretokenized,
    pretokenize,
    tokenizer_fingerprint,
)
from mlmkit.train import tracking as M
from mlmkit.train.tracking import read_metrics

PRETOKENIZE = ROOT / "recipes" / "pretokenize.py"
ROWS = 300
QUICK = ["--max_train_steps", "2", "--logging_steps", "1", "--padding", "longest",
         "--fill_mask_check", "false", "--eval_pad_sensitivity", "false"]


def run_script(script, *args):
    """``python <script> args`` as its ``__main__`` runs it, in this process: a helpers.Exit."""
    return run_cli(load_script(script).main, list(args))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A glob of 3 parquet shards holding ROWS paragraphs of the embedded corpus."""
    folder = tmp_path_factory.mktemp("corpus")
    rows = embedded_corpus()[:ROWS]
    for i in range(3):
        pq.write_table(pa.table({"text": rows[i::3]}), folder / f"shard-{i}.parquet")
    return str(folder / "shard-*.parquet")


@pytest.fixture(scope="module")
def pretokenized(tmp_path_factory, corpus, tiny_bert_dir, tokenizer_path):
    """(folder, the command's process): the corpus tokenized by 2 workers into 2 shards."""
    out = tmp_path_factory.mktemp("tokenized") / "corpus-128"
    proc = run_script(PRETOKENIZE, "--output_dir", str(out), "--train_file", corpus,
                      "--tokenizer_name", tokenizer_path, "--config_name", tiny_bert_dir,
                      "--preprocessing_num_workers", "2", "--num_shards", "2")
    assert proc.code == 0, proc.stderr[-4000:]
    return out, proc


def test_pretokenize_writes_a_complete_folder(pretokenized, corpus, tokenizer):
    out, proc = pretokenized
    metadata = json.loads((out / METADATA).read_text())
    assert metadata["max_seq_length"] == 128 and metadata["line_by_line"] is True
    assert metadata["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert metadata["tokenizer"]["vocab_size"] == len(tokenizer)
    assert metadata["data"]["train_file"] == corpus
    assert metadata["data"]["preprocessing_num_workers"] == 2
    splits = metadata["splits"]
    assert splits["train"]["examples"] + splits["validation"]["examples"] == ROWS  # 1 per row
    assert all(splits[s]["examples"] > 0 and splits[s]["tokens"] > 0 for s in splits)
    assert splits["train"]["shards"] == 2
    assert metadata["seconds"] > 0 and metadata["tokens_per_second"] > 0
    assert not list(out.parent.glob("*.tmp-*"))  # renamed into place, nothing left over

    # progress with throughput (datasets' bars), then one summary line and the training hint
    assert "tokenizing train" in proc.stderr and "examples/s" in proc.stderr
    tokens = splits["train"]["tokens"] + splits["validation"]["tokens"]
    line = re.search(r"pretokenized: ([\d,]+) train \+ ([\d,]+) validation examples, ([\d,]+) "
                     r"tokens in [\d.]+ s \(([\d,]+) tokens/s\) -> (\S+)", proc.stdout)
    assert line, proc.stdout
    assert int(line[1].replace(",", "")) == splits["train"]["examples"]
    assert int(line[3].replace(",", "")) == tokens
    assert int(line[4].replace(",", "")) > 0 and line[5] == str(out)
    assert f"accelerate launch recipes/mlm.py --tokenized_dir {out}" in proc.stdout

    # a plain datasets folder too
    opened = datasets.load_from_disk(str(out))
    assert set(opened) == {"train", "validation"}
    assert set(opened["train"].column_names) == {"input_ids", "special_tokens_mask", "length"}


def test_training_from_the_folder_equals_tokenizing_inline(pretokenized, corpus, tiny_args,
                                                           tmp_path):
    out, _ = pretokenized
    runs = {"folder": ["--tokenized_dir", str(out)], "inline": ["--train_file", corpus]}
    stdouts = {name: run_recipe([*tiny_args, *flags, *QUICK, "--output_dir", tmp_path / name])
               .stdout for name, flags in runs.items()}
    data_lines = {name: re.search(r"data: .*", stdout)[0] for name, stdout in stdouts.items()}
    assert data_lines["folder"] == data_lines["inline"]  # same examples and token counts
    records = {name: read_metrics(tmp_path / name) for name in runs}
    first_train = {n: next(r for r in recs if M.TRAIN_LOSS in r) for n, recs in records.items()}
    first_eval = {n: next(r for r in recs if M.EVAL_LOSS in r) for n, recs in records.items()}
    assert first_train["folder"][M.STEP] == first_train["inline"][M.STEP] == 1
    assert first_train["folder"][M.TRAIN_LOSS] == pytest.approx(
        first_train["inline"][M.TRAIN_LOSS], abs=1e-6)
    assert first_eval["folder"][M.STEP] == first_eval["inline"][M.STEP] == 0
    assert first_eval["folder"][M.EVAL_LOSS] == pytest.approx(
        first_eval["inline"][M.EVAL_LOSS], abs=1e-6)


def test_other_max_seq_length_is_refused_with_the_fix(pretokenized, tiny_args, tmp_path):
    out, _ = pretokenized
    # the recipe itself, as `accelerate launch` runs it for one process
    proc = run_script(RECIPE, *tiny_args, "--tokenized_dir", str(out),
                      "--max_seq_length", "64", *QUICK, "--output_dir", str(tmp_path / "run"))
    assert proc.code == 2, proc.stderr[-3000:]
    (line,) = proc.error_lines()
    assert "max_seq_length 128" in line and "Fix:" in line
    assert "recipes/pretokenize.py with --max_seq_length 64" in line
    assert "--max_seq_length 128" in line.split("Fix:")[1]
    assert "Traceback" not in proc.stderr


def test_folder_that_does_not_fit_is_a_data_error(pretokenized, tokenizer, tokenizer_path,
                                                  tmp_path):
    out, _ = pretokenized
    tokenized = load_pretokenized(str(out), tokenizer, MLMConfig(max_train_samples=5))
    assert len(tokenized["train"]) == 5  # --max_train_samples applies as inline
    with pytest.raises(DataError, match=r"line_by_line true.*--line_by_line false"):
        load_pretokenized(str(out), tokenizer, MLMConfig(line_by_line=False))
    # same vocabulary, but cased: other ids, so another fingerprint
    cased = AutoTokenizer.from_pretrained(tokenizer_path, do_lower_case=False)
    with pytest.raises(DataError, match=r"tokenizer .* differs .*Fix: re-run"):
        load_pretokenized(str(out), cased, MLMConfig())

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / METADATA).write_text("{not json")
    with pytest.raises(DataError, match=r"unreadable.*Fix: re-run recipes/pretokenize.py"):
        load_pretokenized(str(copy), tokenizer, MLMConfig())
    (copy / METADATA).unlink()  # e.g. a folder written by save_to_disk, not by pretokenize
    with pytest.raises(DataError, match=r"has no mlmkit_tokenized.json.*Fix: run python "
                                        r"recipes/pretokenize.py"):
        load_pretokenized(str(copy), tokenizer, MLMConfig())


def test_existing_folder_is_refused_and_failures_leave_nothing(tmp_path, tokenizer_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    proc = run_script(PRETOKENIZE, "--output_dir", str(taken), "--tokenizer_name",
                      tokenizer_path)
    assert proc.code == 2
    (line,) = proc.error_lines()
    assert "already exists and is not empty" in line and "Fix:" in line
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    unreadable = tmp_path / "corpus.parquet"
    unreadable.write_bytes(b"these bytes are not parquet\n" * 50)
    cfg = MLMConfig(train_file=str(unreadable), tokenizer_name=tokenizer_path)
    with pytest.raises(DataError, match="could not be read as parquet"):
        pretokenize(cfg, str(tmp_path / "new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.parquet", "taken"]
    with pytest.raises(ConfigError, match="tokenized_dir"):  # a folder is not raw data
        pretokenize(MLMConfig(tokenized_dir=str(taken)), str(tmp_path / "new"))


def test_pretokenize_reads_compressed_corpora_as_shipped(tmp_path, tiny_bert_dir, tokenizer_path):
    """A .jsonl.xz train file beside a .txt.gz validation file: pretokenized as they are."""
    import gzip
    import lzma
    rows = embedded_corpus()[:60]
    (tmp_path / "train.jsonl.xz").write_bytes(lzma.compress(
        "".join(json.dumps({"text": r}) + "\n" for r in rows[:50]).encode()))
    (tmp_path / "valid.txt.gz").write_bytes(gzip.compress(
        "".join(r.replace("\n", " ") + "\n" for r in rows[50:]).encode()))
    out = tmp_path / "tokenized"
    proc = run_script(PRETOKENIZE, "--output_dir", str(out),
                      "--train_file", str(tmp_path / "train.jsonl.xz"),
                      "--validation_file", str(tmp_path / "valid.txt.gz"),
                      "--tokenizer_name", tokenizer_path, "--config_name", tiny_bert_dir)
    assert proc.code == 0, proc.stderr[-4000:]
    folder = datasets.load_from_disk(str(out))
    assert len(folder["train"]) == 50 and len(folder["validation"]) == 10
