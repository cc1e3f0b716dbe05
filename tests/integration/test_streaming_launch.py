"""`--streaming true` launched for real: one process on a multi-shard parquet corpus, and 2-process
DDP on a weighted mixture of two sharded sources, SIGKILLed mid-run and started again with the
same command, against uninterrupted runs.

The tiny BERT has dropout 0.1, so equal results need every RNG restored as well as each
process's own stream position (shard, offset, carried examples). One-process runs that are not
interrupted run in this process (helpers.run_recipe)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import (
    ROOT,
    assert_same_run,
    kill_tree,
    launch,
    run_recipe,
    start,
    wait_for_checkpoint,
)

from mlmkit.data.corpus import embedded_corpus
from mlmkit.train import tracking as M
from mlmkit.train.tracking import read_metrics

DDP = ["--config_file", str(ROOT / "accelerate_configs" / "ddp.yaml"), "--num_processes", "2",
       "--mixed_precision", "no"]


@pytest.fixture(scope="module")
def args(tmp_path_factory, tiny_bert_dropout_dir, tokenizer_path) -> list[str]:
    """4 parquet shards of 20 paragraphs; 16 of them held out for eval, so a process of two
    reads its part in a few steps and the runs cross pass boundaries."""
    folder = tmp_path_factory.mktemp("stream_corpus")
    paragraphs = embedded_corpus()[:80]
    for s in range(4):
        pq.write_table(pa.table({"text": paragraphs[s::4]}), folder / f"part-{s}.parquet",
                       row_group_size=8)
    return ["--config_name", tiny_bert_dropout_dir, "--tokenizer_name", tokenizer_path,
            "--report_to", "none", "--progress_bar", "false", "--fill_mask_check", "false",
            "--eval_pad_sensitivity", "false", "--streaming", "true",
            "--train_file", str(folder / "part-*.parquet"), "--streaming_eval_examples", "16",
            "--max_seq_length", "64", "--per_device_train_batch_size", "3",
            "--max_train_steps", "24", "--learning_rate", "1e-3", "--logging_steps", "2",
            "--eval_steps", "12", "--checkpointing_steps", "5"]


def killed_then_resumed(cmd: list[str], out, accelerate_args=None) -> str:
    """Launch, SIGKILL every process after checkpoint 10, run the same command again (one
    process: in this process); its stdout."""
    proc = start(cmd, accelerate_args)
    wait_for_checkpoint(proc, out, 10)
    kill_tree(proc)
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    if accelerate_args is None:
        return run_recipe(cmd, threads=1).stdout
    return launch(cmd, accelerate_args=accelerate_args).stdout


def test_streaming_one_process_sigkill_then_resume_is_bit_identical(tmp_path, args):
    ref = tmp_path / "reference"
    stdout = run_recipe([*args, "--output_dir", ref], threads=1).stdout
    assert "data: streaming" in stdout and "held out from the stream" in stdout
    summary = json.loads((ref / "summary.json").read_text())
    assert summary[M.EVAL_LOSS] < summary["first/" + M.EVAL_LOSS]  # it learned
    passes = [r[M.EPOCH] for r in read_metrics(ref) if M.TRAIN_LOSS in r]
    assert passes[0] == 0 and passes[-1] >= 1  # crossed into the second pass of the stream

    out = tmp_path / "run"
    stdout = killed_then_resumed([*args, "--output_dir", str(out)], out)
    assert "resuming from" in stdout and "pass" in stdout
    assert_same_run(out, ref)


def test_streaming_ddp_mixture_sigkill_then_resume_matches(tmp_path, args):
    """Two processes on a weighted mixture of two sources (0.7 / 0.3), each source two JSON-lines
    shards, so each process streams its own shard of each: the summary holds the mixture, the
    tokens trained per source (all processes) and shares near the weights (the 2-point bound
    over 200 steps is tests/unit/data/test_streaming.py's; this run is 40 steps); and the
    killed-and-resumed run ends where the uninterrupted one does (within 1e-5: gloo's
    all-reduce order)."""
    sources = []
    for name in ("alpha", "beta"):
        texts = [json.dumps({"text": f"{name} {t}"}) + "\n" for t in embedded_corpus()[:300]]
        for shard in range(2):
            (tmp_path / f"{name}-{shard}.jsonl").write_text("".join(texts[shard::2]))
        sources.append(str(tmp_path / f"{name}-*.jsonl"))
    i = args.index("--train_file")
    mixture = [*args[:i], *args[i + 2:], "--mixture_files", *sources,
               "--mixture_weights", "0.7", "0.3", "--max_train_steps", "40"]

    ref = tmp_path / "reference"
    launch([*mixture, "--output_dir", str(ref)], accelerate_args=DDP)
    states = sorted((ref / "checkpoints").glob("checkpoint-*/data_state_*.json"))
    assert {p.name for p in states} == {"data_state_0.json", "data_state_1.json"}
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary[M.EVAL_LOSS] < summary["first/" + M.EVAL_LOSS]
    assert summary["data/mixture"] == {sources[0]: 0.7, sources[1]: 0.3}
    tokens = summary["data/source_tokens"]
    assert all(tokens[s] > 0 for s in sources)
    assert abs(summary["data/source_share"][sources[0]] - 0.7) < 0.06

    out = tmp_path / "run"
    killed_then_resumed([*mixture, "--output_dir", str(out)], out, accelerate_args=DDP)
    assert_same_run(out, ref, tol=1e-5)
