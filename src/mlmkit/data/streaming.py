"""Streaming corpora (``--streaming true``): train from a stream that never sits in memory whole.

The raw text comes from a ``datasets`` IterableDataset (`open_stream`): local files (one path or
a glob of shards; text, json/jsonl, csv, parquet), a hub id or local dataset folder, a weighted
mixture of local sources (``datasets.interleave_datasets`` with probabilities), or the embedded
corpus. Every process reads its own part (``datasets.distributed.split_dataset_by_node``: whole
shards when their number divides by the processes, else every N-th example) and tokenizes it on
the fly (`StreamExamples`: `data.text_examples` per chunk, the map-style path's step). Memory
holds one packing window, never the corpus: it stays flat as the corpus grows.

**Passes.** A pass reads the whole stream once; then the next starts, each with the files of
each source in another order (a function of seed and pass). Every example is trained on exactly
once per pass, across processes. Passes are this process's own: processes that read different
amounts may be in different passes, which changes nothing else.

**Batches.** `StreamSteps` fills a *window* of about ``layout.WINDOW_STEPS`` steps' worth of
examples, cuts it into units (packed rows of ``max_seq_length`` tokens with the collator's
best-fit packer, or single examples when padded), emits whole steps of units in an order shuffled
by (seed, process, window) and carries the rest (the least-full rows) into the next window: the
planned steps' window loop (`layout.WindowPacker`, as `plans.StreamPlan` sets it up), on a
source that never ends. The masking of an example is keyed by a stable id,
``pass << 40 | ordinal * processes + process`` (its ordinal in this process's pass), so it does
not depend on batching.

**Exact resume.** The data position after a step (`checkpoint.DataPosition`, the shape of the
planned steps' too) is its window's starting point (`StreamPosition`: the pass, the ordinal, the
stream's ``state_dict()`` -- shard and offset --, the carried examples) plus the number of the
window's steps already trained. Refilling the window from there gives the same window, so a run
killed anywhere resumes to the result of an uninterrupted one. Each process saves its own
position in the checkpoint (``data_state_<rank>.json``, `checkpoint.RankState`).

**Eval.** ``--validation_file`` (or a hub dataset's validation split), else the first
``--streaming_eval_examples`` examples of the stream in file order, held out: their texts are
never trained on (the training stream skips every row whose text is one of them).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from dataclasses import dataclass, field

import numpy as np

from mlmkit.config.errors import DataError
from mlmkit.config.fields import MLMConfig
from mlmkit.data.corpus import Example, embedded_corpus, text_examples
from mlmkit.data.files import file_source, load_file_split

CHUNK_ROWS = 64         # raw rows read and tokenized at a time
PASS_SHIFT = 40         # example id = pass << PASS_SHIFT | ordinal * processes + process


def _pass_seed(seed: int, pass_: int) -> int:
    return int(np.random.SeedSequence([seed, pass_]).generate_state(1)[0])


def describe_source(cfg: MLMConfig) -> str:
    if cfg.mixture_files:
        return "mixture of " + ", ".join(f"{f} ({w:g})" for f, w in
                                          zip(cfg.mixture_files, cfg.mixture_weights))
    return cfg.train_file or cfg.dataset_name or "the embedded corpus"


def _file_stream(pattern: str, cfg: MLMConfig, order_seed: int | None):
    import datasets
    builder, files, kwargs = file_source(pattern)
    if order_seed is not None:  # each pass reads the shards in another order
        files = [files[i] for i in np.random.default_rng(order_seed).permutation(len(files))]
    if builder == "parquet":  # read one row group at a time: memory independent of shard size
        import pyarrow.dataset as pads
        kwargs["fragment_scan_options"] = pads.ParquetFragmentScanOptions(pre_buffer=False)
    return datasets.load_dataset(builder, data_files={"train": files}, split="train",
                                 streaming=True, **kwargs)


def open_stream(cfg: MLMConfig, pass_: int | None = None):
    """The raw stream (``text`` [+ ``source``] columns), the same on every process.

    ``pass_`` None: file order (the eval hold-out is read from it); else the order of that pass.
    """
    import datasets
    order = None if pass_ is None else _pass_seed(cfg.seed, pass_)
    col = cfg.text_column
    try:
        if cfg.mixture_files:
            streams = []
            for i, pattern in enumerate(cfg.mixture_files):
                one = _file_stream(pattern, cfg, None if order is None else order + i)
                one = one.select_columns([col]).map(lambda row, i=i: {"source": i})
                streams.append(one)
            total = sum(cfg.mixture_weights)
            return datasets.interleave_datasets(
                streams, probabilities=[w / total for w in cfg.mixture_weights],
                seed=_pass_seed(cfg.seed, 0 if pass_ is None else pass_ + 1),
                stopping_strategy="all_exhausted")
        if cfg.train_file:
            stream = _file_stream(cfg.train_file, cfg, order)
        elif cfg.dataset_name:
            stream = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name,
                                           split="train", streaming=True)
        else:
            stream = datasets.Dataset.from_dict({"text": embedded_corpus()}) \
                .to_iterable_dataset(num_shards=8)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for unreadable sources
        raise DataError(f"{describe_source(cfg)}: could not be opened as a stream "
                        f"({type(err).__name__}: {err}). Fix: check the path and the file "
                        "format.") from err
    if stream.column_names is not None and col not in stream.column_names:
        raise DataError(f"text_column={col!r} is not a column of {describe_source(cfg)} "
                        f"(columns: {stream.column_names}). Fix: pass --text_column <name>.")
    return stream.select_columns([col])


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.strip().encode("utf-8"), digest_size=12).digest()


def held_out_eval(cfg: MLMConfig):
    """``(raw validation Dataset, keys of texts never to train on)``: --validation_file, a hub
    dataset's validation split, or the stream's first --streaming_eval_examples examples."""
    import datasets
    col, n = cfg.text_column, cfg.streaming_eval_examples
    if cfg.validation_file:
        raw = load_file_split(cfg.validation_file, "validation")[0]
        return raw.select_columns([col]), frozenset()
    if cfg.dataset_name:
        try:
            stream = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name,
                                           split="validation", streaming=True)
            rows = [r[col] for r in itertools.islice(stream, n)]
            return datasets.Dataset.from_dict({col: rows}), frozenset()
        except (ValueError, KeyError):
            pass  # no validation split: hold out from the training stream
    rows = []
    for row in open_stream(cfg, None):
        text = row[cfg.text_column]
        if text and text.strip():
            rows.append(text)
            if len(rows) == n:
                break
    if not rows:
        raise DataError(f"{describe_source(cfg)} holds no text. Fix: point the run at "
                        "non-empty data.")
    return datasets.Dataset.from_dict({col: rows}), frozenset(_text_key(t) for t in rows)


@dataclass
class StreamPosition:
    """Where this process's stream stands at the start of a window (JSON-able): the
    ``stream`` of a `checkpoint.DataPosition`, whose ``step`` counts the window's steps done."""
    pass_: int = 0
    ordinal: int = 0                 # examples this process has read in the pass
    source: dict | None = None       # the stream's state_dict(); None = the pass's start
    carry: list = field(default_factory=list)  # carried examples (`data.Example`)
    window: int = 0                  # windows done (seeds the window's shuffle)

    def to_dict(self) -> dict:
        return {"pass": self.pass_, "ordinal": self.ordinal, "source": self.source,
                "carry": self.carry, "window": self.window}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamPosition":
        return cls(d["pass"], d["ordinal"], d["source"], d["carry"], d["window"])


class StreamExamples:
    """This process's tokenized examples, from a position on, pass after pass (see module doc).

    `read` returns the next chunk; `position` the state after the last chunk read; `at` a
    reader of the same examples from another position."""

    def __init__(self, cfg: MLMConfig, tokenizer, *, process_index: int, num_processes: int,
                 exclude: frozenset = frozenset()):
        self.cfg, self.tokenizer, self.exclude = cfg, tokenizer, exclude
        self.rank, self.world = process_index, num_processes
        self._seek(StreamPosition())

    def at(self, start: StreamPosition) -> "StreamExamples":
        """A new reader of these examples from ``start`` (its pass, ordinal, stream state) on."""
        reader = copy.copy(self)
        reader._seek(start)
        return reader

    def _seek(self, start: StreamPosition) -> None:
        self.pass_, self.ordinal, self._source_state = start.pass_, start.ordinal, start.source
        self._stream = self._rows = None
        self._read_in_pass = start.ordinal > 0 or start.source is not None

    def _open(self):
        from datasets.distributed import split_dataset_by_node
        stream = split_dataset_by_node(open_stream(self.cfg, self.pass_), rank=self.rank,
                                       world_size=self.world)
        if self._source_state is not None:
            stream.load_state_dict(self._source_state)
        self._stream, self._rows = stream, iter(stream)

    def read(self) -> list[Example]:
        """The next chunk of examples (`data.Example`); the stream never ends (the
        next pass starts where one ends). A pass without a single example is a DataError."""
        while True:
            if self._rows is None:
                self._open()
            try:
                rows = list(itertools.islice(self._rows, CHUNK_ROWS))
            except Exception as err:  # a corrupt shard surfaces only when it is read
                raise DataError(f"{describe_source(self.cfg)}: reading the stream failed in "
                                f"pass {self.pass_} ({type(err).__name__}: {err}). Fix: repair "
                                "or remove the unreadable file.") from err
            if rows:
                self._source_state = copy.deepcopy(self._stream.state_dict())
                examples = self._tokenize(rows)
                if examples:
                    self._read_in_pass = True
                    return examples
                continue
            if not self._read_in_pass:
                raise DataError(
                    f"process {self.rank} of {self.world} found no training text in "
                    f"{describe_source(self.cfg)} (pass {self.pass_}). Fix: give the stream "
                    "more rows (or shards) than processes, and text beyond the held-out "
                    "--streaming_eval_examples.")
            self.pass_, self.ordinal, self._source_state = self.pass_ + 1, 0, None
            self._rows, self._read_in_pass = None, False

    @staticmethod
    def exhausted() -> bool:
        """Never: the next pass starts where one ends (the `layout.WindowPacker` source)."""
        return False

    def position(self) -> tuple[int, int, dict | None]:
        return self.pass_, self.ordinal, self._source_state

    def _tokenize(self, rows: list[dict]) -> list[Example]:
        """The examples of a chunk of raw rows (`data.text_examples` per run of rows of one
        source: grouped blocks never mix sources), each given the next ordinal's id."""
        col, texts, sources = self.cfg.text_column, [], []
        for row in rows:
            text = row[col]
            if not isinstance(text, str) or not text.strip():
                continue
            if self.exclude and _text_key(text) in self.exclude:
                continue
            texts.append(text)
            sources.append(int(row.get("source", 0)))
        out = []
        for source, group in itertools.groupby(zip(texts, sources), key=lambda x: x[1]):
            columns = text_examples([t for t, _ in group], self.tokenizer,
                                    max_length=self.cfg.max_seq_length,
                                    line_by_line=self.cfg.line_by_line)
            for ids, special in zip(columns["input_ids"], columns["special_tokens_mask"]):
                idx = (self.pass_ << PASS_SHIFT) | (self.ordinal * self.world + self.rank)
                self.ordinal += 1
                out.append(Example(input_ids=ids, special_tokens_mask=special, idx=idx,
                                   source=source))
        return out
