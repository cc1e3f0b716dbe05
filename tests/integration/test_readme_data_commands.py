"""The README's "Corpora bigger than the machine" commands, read from README.md and run as
written: only their placeholder paths (/data/..., /shared/...) point at a small parquet corpus
and a temporary folder, and the run flags of a tiny, few-step run are appended (later flags win)."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, launch, launch_env
from readme_commands import readme_lines

from mlmkit.data.corpus import embedded_corpus


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("readme_corpus")
    for s in range(3):
        pq.write_table(pa.table({"text": embedded_corpus()[s:300:3]}),
                       folder / f"part-{s}.parquet")
    corpus = str(folder / "part-*.parquet")
    return {"/data/crawl/*.parquet": corpus, "/shared/corpus/*.parquet": corpus,
            "/shared/tok/corpus-128": str(folder / "tok")}


def as_here(words: list[str], paths: dict) -> list[str]:
    placeholders = [w for w in words if w.startswith(("/data/", "/shared/"))]
    assert all(w in paths for w in placeholders), placeholders
    return [paths.get(w, w) for w in words]


def quick(tiny_args: list[str], out) -> list[str]:
    return [*tiny_args, "--output_dir", str(out), "--max_train_steps", "3",
            "--checkpointing_steps", "3", "--streaming_eval_examples", "16",
            "--fill_mask_check", "false"]


def test_readme_pretokenize_then_train_from_the_folder(tmp_path, paths, tiny_args):
    (write,) = readme_lines("python recipes/pretokenize.py")
    proc = subprocess.run([sys.executable, *as_here(write, paths)[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens/s" in proc.stdout
    (train,) = readme_lines("accelerate launch recipes/mlm.py --tokenized_dir")
    args = as_here(train, paths)[3:]
    out = launch([*args, *quick(tiny_args, tmp_path / "run")])
    assert "data: 2" in out.stdout  # 270 train examples read from the folder, not tokenized
    assert (tmp_path / "run" / "summary.json").exists()


def test_readme_streaming_launch(tmp_path, paths, tiny_args):
    (line,) = readme_lines("accelerate launch recipes/mlm.py --streaming")
    args = as_here(line, paths)[3:]
    proc = launch([*args, *quick(tiny_args, tmp_path / "run")])
    assert "data: streaming" in proc.stdout and "padding=packed" in proc.stdout
    assert (tmp_path / "run" / "summary.json").exists()
