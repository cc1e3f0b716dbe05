"""The streaming data path (mlmkit.data.streaming) on real multi-shard parquet corpora, no model:
coverage per pass across processes, the held-out eval, exact positions, mixtures, errors."""

from __future__ import annotations

import collections
import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mlmkit.batch.collator import MaskedLMCollator
from mlmkit.config.errors import ConfigError, DataError
from mlmkit.config.parse import parse_config
from mlmkit.data.corpus import IndexedExamples, load_and_tokenize
from mlmkit.data.plans import plan_schedule
from mlmkit.data.position import DataPosition
from mlmkit.data.streaming import PASS_SHIFT, StreamExamples, held_out_eval
from mlmkit.train.steps import StepPreparer, StreamSteps

LINES = [f"line {i} of the corpus says {' '.join(['word'] * (i % 13 + 1))} {i * 7919 % 1000}."
         for i in range(700)]


def write_shards(folder, lines, shards: int, name: str = "part", fmt: str = "parquet") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        path = folder / f"{name}-{s}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.table({"text": lines[s::shards]}), path, row_group_size=37)
        else:
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[s::shards]))
    return str(folder / f"{name}-*.{fmt}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("stream"), LINES, shards=6)


def config(*args: str):
    return parse_config(["--streaming", "true", "--max_train_steps", "10",
                         "--max_seq_length", "32", *args])


def steps_for(cfg, tokenizer, rank: int, world: int, exclude=frozenset(), position=None,
              packed: bool = True) -> StreamSteps:
    """The run's stream steps, built as `steps.RunSteps.source` builds them."""
    padding = "packed" if packed else "longest"
    collator = MaskedLMCollator.from_config(tokenizer, cfg, position_offset=0,
                                            attn_implementation="sdpa", padding=padding)
    schedule = plan_schedule(cfg, None, padding=padding, num_processes=world,
                             process_index=rank)
    preparer = StepPreparer(collator, max_length=cfg.max_seq_length,
                            num_sources=len(cfg.mixture_files), ramps=schedule.ramps)
    plan = schedule.plan
    examples = StreamExamples(cfg, tokenizer, process_index=rank, num_processes=world,
                              exclude=exclude)
    return StreamSteps(examples, preparer, plan=plan, position=position or DataPosition())


@pytest.mark.parametrize("packed", [True, False])
def test_each_example_trained_once_per_pass_across_processes(corpus, tokenizer, packed):
    """Two processes, six shards: the examples of pass 0 emitted in steps by both processes are
    the corpus minus the held-out texts, each exactly once (carries included)."""
    cfg = config("--train_file", corpus, "--streaming_eval_examples", "50",
                 "--per_device_train_batch_size", "3")
    raw_eval, exclude = held_out_eval(cfg)
    assert list(raw_eval["text"]) == [r for s in range(6) for r in LINES[s::6]][:50]  # file order
    trained = collections.Counter()
    for rank in range(2):
        for _, steps in itertools.islice(steps_for(cfg, tokenizer, rank, 2, exclude,
                                                   packed=packed).windows(), 60):
            for unit in itertools.chain.from_iterable(steps):  # a row, or one example
                for example in (unit if packed else [unit]):
                    if example["idx"] >> PASS_SHIFT == 0:
                        assert example["idx"] % 2 == rank  # ids are unique across processes
                        trained[tuple(example["input_ids"])] += 1
    held_out = set(raw_eval["text"])
    want = collections.Counter(tuple(tokenizer(t)["input_ids"][:32]) for t in LINES
                               if t not in held_out)
    assert trained == want


def without_reader(state: dict) -> dict:
    """A stream position without the Arrow reader's read-ahead state (see below)."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()
                    if not (k == "examples_iterable" and "previous_state" in node)}
        return node
    return strip(state)


def test_a_window_rebuilt_from_its_position_is_the_same(corpus, tokenizer):
    """The resume contract: from any step's position (saved as JSON), the following steps are
    the same, masked at the same rates of a mask-rate schedule (a function of the run's step)."""
    cfg = config("--train_file", corpus, "--streaming_eval_examples", "20",
                 "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                 "--mlm_probability_final", "0.05")
    _, exclude = held_out_eval(cfg)
    run = list(itertools.islice(iter(steps_for(cfg, tokenizer, 1, 2, exclude)), 120))
    assert len({s.epoch for s in run}) >= 2  # crosses pass boundaries
    rates = [s.scheduled["train/mlm_probability"] for s in run]
    assert rates[0] == 0.15 and rates[9:] == [0.05] * 111 and sorted(rates) == rates[::-1]
    for k in (0, 5, 37, 90):
        position = DataPosition.from_dict(json.loads(json.dumps(run[k].position.to_dict())))
        again = itertools.islice(iter(steps_for(cfg, tokenizer, 1, 2, exclude, position)), 6)
        for want, got in zip(run[k + 1:], again):
            # The stream's state_dict also records how far its Arrow reader has read ahead,
            # which may differ after a resume and is not used to resume (datasets replays from
            # the batch position); everything else is the same.
            assert without_reader(got.position.to_dict()) == \
                without_reader(want.position.to_dict())
            assert got.scheduled == want.scheduled
            for a, b in zip(want.micro_batches, got.micro_batches):
                assert a.keys() == b.keys()
                assert all((a[key] == b[key]).all() for key in a)


def test_text_column_missing_and_empty_sources_are_clear_errors(tmp_path, corpus, tokenizer):
    with pytest.raises(DataError, match="text_column='body'.*Fix: pass --text_column"):
        held_out_eval(config("--train_file", corpus, "--text_column", "body"))
    blank = write_shards(tmp_path / "blank", ["  ", ""] * 10, shards=2)
    with pytest.raises(DataError, match="holds no text"):
        held_out_eval(config("--train_file", blank))
    # more processes than rows: a process without a single example says so
    tiny = write_shards(tmp_path / "tiny", ["only one line here"], shards=1)
    reader = StreamExamples(config("--train_file", tiny), tokenizer, process_index=1,
                            num_processes=2)
    with pytest.raises(DataError, match="process 1 of 2 found no training text"):
        reader.read()
    # a shard that is not parquet, found only when the stream reaches it
    broken = tmp_path / "broken"
    write_shards(broken, LINES[:50], shards=1)
    (broken / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    reader = StreamExamples(config("--train_file", str(broken / "part-*.parquet")), tokenizer,
                            process_index=0, num_processes=1)
    with pytest.raises(DataError, match="reading the stream failed.*Fix: repair or remove"):
        for _ in range(5):
            reader.read()
    with pytest.raises(ConfigError, match="needs a step budget.*--max_train_steps"):
        parse_config(["--streaming", "true", "--train_file", corpus])
    with pytest.raises(ConfigError, match="matches no file"):
        parse_config(["--train_file", str(tmp_path / "nothing-*.parquet")])


def mixture_sources(tmp_path) -> list[str]:
    """Two sources with the same length distribution, told apart by their first word (JSON
    lines: datasets waits 5 s whenever an interleaved stream of parquet files is closed)."""
    return [write_shards(tmp_path / name, [t.replace("line", name) for t in LINES], shards=3,
                         name=name, fmt="jsonl") for name in ("alpha", "beta")]


def test_streaming_mixture_shares_follow_the_weights(tmp_path, tokenizer):
    """0.7 / 0.3 over 200 steps: each source's share of the trained tokens within 2 points,
    and the source tag of every example is right."""
    a, b = mixture_sources(tmp_path)
    cfg = config("--mixture_files", a, b, "--mixture_weights", "0.7", "0.3",
                 "--per_device_train_batch_size", "4", "--streaming_eval_examples", "10")
    _, exclude = held_out_eval(cfg)
    steps = list(itertools.islice(iter(steps_for(cfg, tokenizer, 0, 1, exclude)), 200))
    tokens = [sum(s.source_tokens[i] for s in steps) for i in range(2)]
    share = tokens[0] / sum(tokens)
    assert abs(share - 0.7) < 0.02, share
    alpha = tokenizer.convert_tokens_to_ids("alpha")
    for _, windows in itertools.islice(steps_for(cfg, tokenizer, 0, 1, exclude).windows(), 3):
        for unit in itertools.chain.from_iterable(windows):
            for example in unit:
                assert (example["input_ids"][1] == alpha) == (example["source"] == 0)


def test_map_style_mixture_shares_follow_the_weights(tmp_path, tokenizer):
    """The same weights, map-style: an epoch of the interleaved training split."""
    a, b = mixture_sources(tmp_path)
    cfg = parse_config(["--mixture_files", a, b, "--mixture_weights", "0.7", "0.3",
                        "--max_seq_length", "32"])
    train = IndexedExamples(load_and_tokenize(cfg, tokenizer)["train"])
    tokens = [int(train.lengths[train.sources == i].sum()) for i in range(2)]
    assert abs(tokens[0] / sum(tokens) - 0.7) < 0.02
    # every example of the smaller-weight source is in the epoch at least once
    assert (train.sources == 1).sum() >= len(LINES) * 0.9 * 0.9


def test_dataset_folder_streams_with_its_validation_split(tmp_path, tokenizer):
    """--dataset_name (here a local copy of a hub-style dataset folder): its train files are the
    stream; its validation split, when it has one, is the eval set (nothing held out)."""
    folder = tmp_path / "dataset"
    write_shards(folder / "data", LINES[:400], shards=2, name="train")
    cfg = config("--dataset_name", str(folder), "--streaming_eval_examples", "30")
    raw_eval, exclude = held_out_eval(cfg)
    assert len(raw_eval) == 30 and len(exclude) == 30  # no validation split: held out
    write_shards(folder / "data", LINES[400:450], shards=1, name="validation")
    raw_eval, exclude = held_out_eval(cfg)
    assert list(raw_eval["text"]) == LINES[400:430] and not exclude
    step = next(iter(steps_for(cfg, tokenizer, 0, 1, exclude)))
    assert step.real > 0 and step.position.step == 1  # one step of the first window done


@pytest.mark.parametrize("packed", [True, False])
def test_stream_warmups_shape_each_window_and_resume_exactly(corpus, tokenizer, packed):
    """Length and batch warm-ups on a stream: a window (4 steps' worth, at least one chunk read)
    takes the length of its first step (rows of at most that), each step its own units per
    micro-batch at that length; full steps after the warm-up; from any step's position the
    same steps follow, at the same shapes."""
    cfg = config("--train_file", corpus, "--streaming_eval_examples", "20",
                 "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
                 "--max_seq_length", "64", "--seq_len_warmup_steps", "12",
                 "--seq_len_warmup_start", "16", "--batch_warmup_steps", "8")
    _, exclude = held_out_eval(cfg)
    source = steps_for(cfg, tokenizer, 1, 2, exclude, packed=packed)
    ramps = source.preparer.ramps
    run = list(itertools.islice(iter(source), 40))
    begins, shapes = 0, set()
    for step in run:
        if step.position.step == 1:
            begins = step.position.done - 1  # the run's step that began the step's window
        length, t = ramps.seq_length(begins), step.position.done - 1
        assert step.scheduled["train/seq_length"] == length
        assert step.scheduled["train/batch_fraction"] == ramps.shape(t, 8, length=length).fraction
        shapes.add(tuple(step.scheduled.values()))
        for batch in step.micro_batches:
            assert batch["input_ids"].shape[1] <= length
            if not packed:
                assert int(batch["num_examples"]) == ramps.units(t, 8, length)
    assert len(shapes) >= 3  # two windows in the warm-up at least, then full steps
    assert run[0].scheduled["train/seq_length"] == 16 and run[-1].scheduled == {
        "train/seq_length": 64, "train/batch_fraction": 1.0}
    for k in (1, 9, 30):
        position = DataPosition.from_dict(json.loads(json.dumps(run[k].position.to_dict())))
        again = itertools.islice(iter(steps_for(cfg, tokenizer, 1, 2, exclude, position,
                                                packed=packed)), 6)
        for want, got in zip(run[k + 1:], again, strict=False):
            assert want.scheduled == got.scheduled and want.real == got.real
            for a, b in zip(want.micro_batches, got.micro_batches, strict=True):
                assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_worker_process_hands_out_the_same_steps(corpus, tokenizer):
    """On a GPU the stream is read by one DataLoader worker process: same steps, same states."""
    from mlmkit.train.steps import Prefetcher
    cfg = config("--train_file", corpus, "--streaming_eval_examples", "20",
                 "--per_device_train_batch_size", "2")
    _, exclude = held_out_eval(cfg)
    inline = list(itertools.islice(iter(steps_for(cfg, tokenizer, 0, 1, exclude)), 8))
    prefetcher = Prefetcher(steps_for(cfg, tokenizer, 0, 1, exclude), num_workers=1)
    try:
        ahead = [prefetcher.next()[0] for _ in range(8)]
    finally:
        prefetcher.close()
    for a, b in zip(inline, ahead):
        assert a.position == b.position and a.real == b.real
        assert all(torch.equal(x["input_ids"], y["input_ids"])
                   for x, y in zip(a.micro_batches, b.micro_batches))


def test_map_style_mixture_with_a_validation_file_uses_it_once(tmp_path, tokenizer):
    """With --validation_file the sources are trained on whole and the file is the eval set,
    once (not once per source)."""
    a, b = mixture_sources(tmp_path)
    valid = tmp_path / "valid.jsonl"  # the sources' type: one builder reads both splits
    valid.write_text("".join(json.dumps({"text": f"held out sentence number {i}."}) + "\n"
                             for i in range(40)))
    cfg = parse_config(["--mixture_files", a, b, "--mixture_weights", "0.5", "0.5",
                        "--validation_file", str(valid), "--max_seq_length", "32"])
    tokenized = load_and_tokenize(cfg, tokenizer)
    assert len(tokenized["validation"]) == 40
    train = IndexedExamples(tokenized["train"])
    assert {int(i) for i in set(train.sources)} == {0, 1}
    assert (train.sources == 1).sum() >= len(LINES)  # nothing held out of the sources


def test_a_compressed_stream_with_a_validation_file_of_another_format(tmp_path, tokenizer):
    """--streaming reads train.jsonl.gz as shipped; --validation_file is a plain .txt."""
    import gzip
    train = tmp_path / "train.jsonl.gz"
    train.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n"
                                            for t in LINES[:200]).encode()))
    valid = tmp_path / "valid.txt"
    valid.write_text("".join(t + "\n" for t in LINES[200:220]))
    cfg = config("--train_file", str(train), "--validation_file", str(valid))
    raw_eval, exclude = held_out_eval(cfg)
    assert [t.strip() for t in raw_eval["text"]] == LINES[200:220] and not exclude
    step = next(iter(steps_for(cfg, tokenizer, 0, 1, exclude)))
    assert step.real > 0 and step.position.step == 1
