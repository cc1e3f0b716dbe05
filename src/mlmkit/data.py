"""Corpus loading, tokenization and example building.

Three sources, one code path after loading:

* the embedded default: the Python reference documentation that ships inside CPython
  (``pydoc_data.topics``), split into paragraphs, 90/10 train/validation with a fixed seed;
* ``--dataset_name [--dataset_config_name]``: anything ``datasets.load_dataset`` can open (a hub
  id, or a local folder/script);
* ``--train_file [--validation_file]``: local .txt, .json/.jsonl, .csv or .parquet files, each
  one path or a glob of shards of one type (each split its own; .gz, .bz2, .xz or .zst
  compressed as shipped, `file_source`);
* ``--mixture_files`` with ``--mixture_weights``: several such sources sampled with weights
  (`load_and_tokenize`).

``--streaming`` reads the same sources as a stream instead (`streaming.py`); ``--tokenized_dir``
reads what `pretokenize.py` wrote.

Examples are either ``line_by_line`` (one per non-blank line, truncated at ``max_seq_length``) or
grouped (all text concatenated and cut into ``max_seq_length`` blocks; the remainder of each map
batch is kept as a shorter block rather than dropped, so a corpus shorter than one block still
yields one example). `text_examples` is that step for both data paths (here per map batch, in
`streaming.py` per chunk of the stream), and `Example` the one example type both hand to the
collator. Tokenization is cached by ``datasets`` for file and hub sources, and computes the
special-tokens mask once, here, so the collator never has to.

Dirty files: bytes of a .txt or .csv file that are not UTF-8 are replaced by U+FFFD and the run
goes on; the lines that held them are counted per file (:class:`DataRepairs`) and reported in one
warning line. A compressed file is not repaired (datasets decodes it strictly): its bad lines are
a :class:`DataError` naming the first. A file that is empty, or holds only blank lines, is a :class:`DataError` saying so.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TypedDict

import datasets
import numpy as np
from datasets import Dataset, DatasetDict

from .config import ConfigError, MLMConfig

# The validation split of a corpus without one is drawn with this seed, not the run's seed, so
# that every run (every ablation arm and seed) evaluates on the same held-out examples.
SPLIT_SEED = 1234

FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
                 ".csv": "csv", ".parquet": "parquet"}


# Builders that can replace undecodable bytes (``encoding_errors``, as in ``open()``); JSON is
# parsed by pyarrow from raw bytes, which has no such option.
REPAIRABLE_BUILDERS = ("text", "csv")


class DataError(ValueError):
    """Unusable data (empty corpus, missing column, unsupported file); names the fix."""


@dataclass
class DataRepairs:
    """Lines of the data files whose bytes were not UTF-8 (replaced by U+FFFD, not dropped)."""

    lines: dict[str, int] = field(default_factory=dict)  # file -> lines repaired
    first: dict[str, int] = field(default_factory=dict)  # file -> first such line (1-based)

    @property
    def total(self) -> int:
        return sum(self.lines.values())

    def warning(self) -> str | None:
        """One line for the log, or None when nothing was repaired."""
        if not self.total:
            return None
        parts = [f"{n} line{'s' if n > 1 else ''} of {path} (first: line {self.first[path]})"
                 for path, n in self.lines.items()]
        return (f"{' and '.join(parts)} held bytes that are not UTF-8: replaced them with U+FFFD "
                "and went on (convert the file to UTF-8 to keep those characters)")


def embedded_corpus() -> list[str]:
    """Paragraphs of CPython's reference documentation (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs: list[str] = []
    for key in sorted(topics):
        paragraphs += [p.strip() for p in topics[key].split("\n\n") if p.strip()]
    return paragraphs


def expand_files(pattern: str) -> list[str]:
    """The files of one source: ``pattern`` itself, or the sorted matches of a glob (shards)."""
    from .config import has_glob
    return sorted(glob.glob(pattern)) if has_glob(pattern) else [pattern]


# Compressed files are read as they are shipped (datasets decompresses them on the fly): the format
# is the suffix before the compression's (train.jsonl.zst is JSON lines). Parquet compresses
# inside the file.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}


def file_format(path: str) -> tuple[str, str | None]:
    """``(format suffix, compression suffix or None)`` of a data file: ``("x.txt.gz")`` ->
    ``(".txt", ".gz")``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    return (suffixes[-1] if suffixes else ""), compression


def file_source(pattern: str, split: str = "train") -> tuple[str, list[str], dict]:
    """``(builder, files, load_dataset kwargs)`` of one split's local files (a path or a glob of
    shards), after checking that they share one format (each split may have its own:
    a .jsonl train file beside a .txt validation file), that none is empty, and that a
    compression is one datasets reads."""
    files = expand_files(pattern)
    if not files:
        raise DataError(f"{split}_file={pattern!r} matches no file. Fix: check the path or "
                        "pattern.")
    formats = {file_format(f) for f in files}
    kinds = sorted({fmt for fmt, _ in formats})
    if len(kinds) != 1 or kinds[0] not in FILE_BUILDERS:
        shown = sorted(fmt + (comp or "") for fmt, comp in formats)
        raise DataError(f"{split}_file={pattern!r}: unsupported or mixed file types {shown}. "
                        f"Fix: use one of {sorted(FILE_BUILDERS)} for every file of the split, "
                        f"optionally compressed ({', '.join(COMPRESSIONS)}).")
    builder = FILE_BUILDERS[kinds[0]]
    if builder == "parquet" and any(comp for _, comp in formats):
        raise DataError(f"{split}_file={pattern!r}: a compressed .parquet file. Fix: pass the "
                        ".parquet file itself (Parquet compresses inside the file).")
    if any(comp == ".zst" for _, comp in formats):
        import importlib.util
        if importlib.util.find_spec("zstandard") is None:
            raise DataError(f"{split}_file={pattern!r}: reading .zst files needs the zstandard "
                            "package. Fix: `pip install zstandard`.")
    for path in files:
        if os.path.getsize(path) == 0:
            raise DataError(f"{split}_file={path!r} is empty (0 bytes). Fix: point "
                            f"--{split}_file at a file with text in it.")
    kwargs = {"keep_linebreaks": True} if builder == "text" else {}
    if builder in REPAIRABLE_BUILDERS:
        kwargs["encoding_errors"] = "replace"
    return builder, files, kwargs


def load_file_split(pattern: str, split: str) -> tuple[Dataset, str, list[str]]:
    """One split of local files, loaded with its own builder: ``(dataset, builder, files)``."""
    builder, files, kwargs = file_source(pattern, split)
    try:
        raw = datasets.load_dataset(builder, data_files={split: files}, split=split, **kwargs)
    except Exception as err:  # datasets raises many types for unreadable files
        cause = err
        while cause is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__ or cause.__context__
        compressed = [f for f in files if file_format(f)[1]]
        if cause is not None and compressed:  # datasets repairs bytes in plain files only
            for path in compressed:
                bad, first = _undecodable_lines(path)
                if bad:
                    raise DataError(
                        f"{split}_file={path!r}: {bad} line{'s' if bad > 1 else ''} (first: line "
                        f"{first}) hold bytes that are not UTF-8, which are repaired in plain "
                        "files only. Fix: convert it to UTF-8 (e.g. `zcat f.gz | iconv -f "
                        "latin1 -t utf-8 | gzip`), or pass it decompressed.") from err
        raise DataError(f"{split}_file={pattern!r}: could not be read as {builder} "
                        f"({type(err).__name__}: {err}). Fix: check the file's format.") from err
    return raw, builder, files


def load_and_tokenize(cfg: MLMConfig, tokenizer, repairs: DataRepairs | None = None
                      ) -> DatasetDict:
    """The run's tokenized ``train`` and ``validation`` splits, whatever the source (see the
    module doc); with ``--mixture_files``, each source tokenized on its own (blocks never mix
    sources), its validation part held out per source (or ``--validation_file``, used whole
    for every source), and the training parts interleaved
    with ``--mixture_weights`` as sampling probabilities (``datasets.interleave_datasets``,
    seeded by ``--seed``, until every source is exhausted: an epoch sees every example of every
    source at least once). Every example then carries its ``source`` (index into the list).

    Call under ``accelerator.main_process_first()`` so that one process fills the cache.
    """
    if not cfg.mixture_files:
        return tokenize_datasets(load_raw_datasets(cfg, repairs), tokenizer, cfg)
    trains, validations = [], []
    for i, source in enumerate(cfg.mixture_files):
        one = dataclasses.replace(cfg, mixture_files=[], mixture_weights=[], train_file=source,
                                  max_train_samples=None, max_eval_samples=None)
        parts = tokenize_datasets(load_raw_datasets(one, repairs), tokenizer, one)
        trains.append(parts["train"].add_column("source", [i] * len(parts["train"])))
        if i == 0 or not cfg.validation_file:  # --validation_file: the one eval set, once
            validations.append(parts["validation"].add_column("source",
                                                              [i] * len(parts["validation"])))
    total = sum(cfg.mixture_weights)
    train = datasets.interleave_datasets(
        trains, probabilities=[w / total for w in cfg.mixture_weights], seed=cfg.seed,
        stopping_strategy="all_exhausted")
    out = DatasetDict({"train": train, "validation": datasets.concatenate_datasets(validations)})
    return limit_samples(out, cfg)


def load_raw_datasets(cfg: MLMConfig, repairs: DataRepairs | None = None) -> DatasetDict:
    """Return a DatasetDict with ``train`` and ``validation`` splits holding ``cfg.text_column``.

    Undecodable bytes in .txt/.csv files are replaced and counted into ``repairs``; the caller
    reports ``repairs.warning()``. Without ``repairs``, the warning is printed here (to stderr,
    by the launch's main process only).
    """
    pct = cfg.validation_split_percentage
    if cfg.dataset_name:
        raw = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name)
        if not isinstance(raw, DatasetDict) or "train" not in raw:
            raise DataError(f"dataset_name={cfg.dataset_name!r} has no 'train' split. Fix: pass a "
                            "dataset with a train split, or use --train_file.")
    elif cfg.train_file:
        splits, sources = {}, {}
        for split, pattern in (("train", cfg.train_file), ("validation", cfg.validation_file)):
            if pattern is not None:  # each split in its own format
                splits[split], builder, files = load_file_split(pattern, split)
                sources[split] = (builder, files)
        raw = DatasetDict(splits)
        found = _check_files(raw, sources, cfg.text_column)
        if repairs is None:
            if found.total and os.environ.get("RANK", "0") == "0":
                print(f"mlmkit: warning: {found.warning()}", file=sys.stderr)
        else:
            repairs.lines.update(found.lines)
            repairs.first.update(found.first)
    else:
        raw = DatasetDict({"train": Dataset.from_dict({"text": embedded_corpus()})})
        if cfg.text_column != "text":
            raise ConfigError(f"text_column={cfg.text_column!r}: the embedded corpus has only a "
                              "'text' column. Fix: drop --text_column or pass your own data.")

    if "validation" not in raw:
        if len(raw["train"]) < 2:
            raise DataError("the training data has fewer than 2 rows, too few to hold out a "
                            "validation split. Fix: add data or pass --validation_file.")
        split = raw["train"].train_test_split(test_size=pct / 100, seed=SPLIT_SEED)
        raw = DatasetDict({"train": split["train"], "validation": split["test"]})

    for name in ("train", "validation"):
        if cfg.text_column not in raw[name].column_names:
            raise DataError(f"text_column={cfg.text_column!r} is not a column of the {name} split "
                            f"(columns: {raw[name].column_names}). Fix: pass --text_column <name>.")
    return DatasetDict({"train": raw["train"], "validation": raw["validation"]})


class Example(TypedDict):
    """The one example type of both data paths (`IndexedExamples.fetch`,
    `streaming.StreamExamples`): a plain dict, as the collator reads it and as a stream position
    saves carried examples (JSON)."""
    input_ids: list[int]
    special_tokens_mask: list[int]
    idx: int            # keys the example's masks (`masking.example_seed`)
    source: int         # --mixture_files: the index of its source (0 without a mixture)


def text_examples(texts: list[str], tokenizer, *, max_length: int,
                  line_by_line: bool) -> dict[str, list]:
    """The examples of ``texts`` (the caller has dropped the blank ones), as columns
    ``input_ids``, ``special_tokens_mask``, ``length``: one per text, stripped and truncated at
    ``max_length`` (``line_by_line``), or all of them concatenated and cut into ``max_length``
    blocks, the remainder kept as a shorter block (blocks never cross ``texts``: the map batch,
    or the stream's chunk of one source). The one text-to-examples step of both data paths."""
    if not texts:  # fast tokenizers fail on an empty list
        return {"input_ids": [], "special_tokens_mask": [], "length": []}
    encode = dict(return_special_tokens_mask=True, return_attention_mask=False,
                  return_token_type_ids=False)
    if line_by_line:
        out = tokenizer([t.strip() for t in texts], truncation=True, max_length=max_length,
                        **encode)
        ids, special = out["input_ids"], out["special_tokens_mask"]
    else:  # no truncation: special tokens wrap each document, blocks are cut here
        out = tokenizer(list(texts), **encode)
        flat_ids = list(chain.from_iterable(out["input_ids"]))
        flat_special = list(chain.from_iterable(out["special_tokens_mask"]))
        starts = range(0, len(flat_ids), max_length)
        ids = [flat_ids[i:i + max_length] for i in starts]
        special = [flat_special[i:i + max_length] for i in starts]
    return {"input_ids": ids, "special_tokens_mask": special, "length": [len(x) for x in ids]}


def tokenize_fingerprint(split: Dataset, tokenizer, cfg: MLMConfig) -> str | None:
    """The cache key of tokenizing ``split`` (datasets' ``new_fingerprint``), from everything the
    examples depend on: the split's own fingerprint (its data), the tokenizer's complete
    serialised form (vocabulary, normaliser, pre-tokeniser, post-processor) and special ids,
    `text_examples`' code and the settings it takes. datasets would otherwise hash the map
    function with its tokenizer pickled (about a second per split for a BERT vocabulary, on
    every process of every run). None for a tokenizer without a serialised form: datasets then
    hashes it itself."""
    import inspect

    from datasets.fingerprint import Hasher
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return Hasher.hash([split._fingerprint, type(tokenizer).__name__, backend.to_str(),
                        sorted(tokenizer.all_special_ids), inspect.getsource(text_examples),
                        cfg.text_column, cfg.line_by_line, cfg.max_seq_length])


def tokenize_datasets(raw: DatasetDict, tokenizer, cfg: MLMConfig) -> DatasetDict:
    """Tokenize into examples with ``input_ids``, ``special_tokens_mask`` and ``length``
    (`text_examples`, per map batch).

    Call under ``accelerator.main_process_first()`` so that one process fills the cache.
    """
    col, line_by_line = cfg.text_column, cfg.line_by_line
    map_kwargs = dict(num_proc=cfg.preprocessing_num_workers,
                      load_from_cache_file=not cfg.overwrite_cache)

    def tokenize(batch):
        texts = [t for t in batch[col] if t and t.strip()] if line_by_line else batch[col]
        return text_examples(texts, tokenizer, max_length=cfg.max_seq_length,
                             line_by_line=line_by_line)

    def nonempty(batch):  # grouped: a map batch is then 1000 documents, blank lines included
        return [bool(t) for t in batch[col]]

    tokenized = DatasetDict()
    for name in raw:
        split = raw[name] if line_by_line else \
            raw[name].filter(nonempty, batched=True, desc=f"dropping empty {name} rows",
                             **map_kwargs)
        tokenized[name] = split.map(
            tokenize, batched=True, remove_columns=raw[name].column_names,
            desc=f"tokenizing {name}" + (" (line by line)" if line_by_line else
                                         f" into {cfg.max_seq_length}-token blocks"),
            new_fingerprint=tokenize_fingerprint(split, tokenizer, cfg), **map_kwargs)

    tokenized = limit_samples(tokenized, cfg)
    for name in tokenized:
        if len(tokenized[name]) == 0:
            source = cfg.train_file or cfg.dataset_name or "the embedded corpus"
            raise DataError(f"the {name} split of {source} holds no text after dropping blank "
                            "lines. Fix: point --train_file/--validation_file at non-empty data.")
    return tokenized


def limit_samples(tokenized: DatasetDict, cfg: MLMConfig) -> DatasetDict:
    """Apply ``--max_train_samples`` / ``--max_eval_samples`` (the first N examples)."""
    if cfg.max_train_samples and "train" in tokenized:
        tokenized["train"] = tokenized["train"].select(
            range(min(cfg.max_train_samples, len(tokenized["train"]))))
    if cfg.max_eval_samples:
        tokenized["validation"] = tokenized["validation"].select(
            range(min(cfg.max_eval_samples, len(tokenized["validation"]))))
    return tokenized


def _check_files(raw: DatasetDict, sources: dict[str, tuple[str, list[str]]],
                 column: str) -> DataRepairs:
    """Refuse blank files; count the lines whose bytes were not UTF-8 (replaced on loading).
    ``sources``: split -> (builder, files)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found = DataRepairs()
    for split, (builder, paths) in sources.items():
        if split not in raw or column not in raw[split].column_names:
            continue  # a missing column is reported by the caller
        path = paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
        text = raw[split].data.column(column)
        if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
            continue  # not text: tokenization reports it
        if text.null_count == len(text) or not pc.any(pc.invert(pc.equal(
                pc.utf8_trim_whitespace(text.fill_null("")), ""))).as_py():
            raise DataError(f"{split}_file={path!r} is empty: it holds only blank lines. Fix: "
                            f"point --{split}_file at a file with text in it.")
        # Replacement leaves U+FFFD; only then are the raw bytes read, to tell a replaced byte
        # from a U+FFFD that the file really contains.
        if builder in REPAIRABLE_BUILDERS and pc.any(pc.match_substring(text, "\ufffd")).as_py():
            for one in paths:
                bad, first = _undecodable_lines(one)
                if bad:
                    found.lines[one], found.first[one] = bad, first
    return found


def _undecodable_lines(path: str) -> tuple[int, int]:
    """(lines holding bytes that are not UTF-8, the first of them, 1-based) of a file."""
    import fsspec
    bad = first = 0
    with fsspec.open(path, "rb", compression="infer") as f:  # .gz, .bz2, .xz, .zst as shipped
        for number, line in enumerate(_byte_lines(f), 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                bad += 1
                first = first or number
    return bad, first


def _byte_lines(f, chunk: int = 1 << 20):
    """The lines of a binary file object read in chunks (some decompressors have no readline)."""
    rest = b""
    while block := f.read(chunk):
        *lines, rest = (rest + block).split(b"\n")
        yield from lines
    if rest:
        yield rest


class IndexedExamples:
    """A tokenized split as a map-style dataset whose items carry their own index ``idx``.

    The collator derives each example's masked positions from (seed, epoch, idx), so masking does
    not depend on batch composition, padding, packing or the number of processes.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset.with_format(None, columns=["input_ids", "special_tokens_mask"])
        # numpy, not Python lists: 4 bytes per example rather than ~36
        numeric = dataset.with_format("numpy")
        self.lengths = np.asarray(numeric["length"], dtype=np.int32)
        self.sources = np.asarray(numeric["source"], dtype=np.int16) \
            if "source" in dataset.column_names else None  # --mixture_files

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, idx: int) -> dict:
        return self.fetch([idx])[0]

    def fetch(self, indices) -> list[Example]:
        """Fetch many examples with one Arrow read (much faster than one read per example)."""
        indices = [int(i) for i in indices]
        rows = self.dataset[indices]
        sources = self.sources[indices].tolist() if self.sources is not None else [0] * len(indices)
        return [Example(input_ids=ids, special_tokens_mask=special, idx=i, source=source)
                for ids, special, i, source in zip(rows["input_ids"], rows["special_tokens_mask"],
                                                   indices, sources)]


@dataclass
class RunData:
    """The examples of one run: ``train`` (None under ``--streaming``: the stream is read in the
    loop), ``validation``, the texts held out of the stream for eval (never trained on), and the
    repaired lines of dirty files."""
    train: IndexedExamples | None
    validation: IndexedExamples
    stream_exclude: frozenset
    repairs: DataRepairs

    def summary(self) -> dict:
        """The summary's entries about the data."""
        from .tracking import DATA_REPAIRED_LINES, TRAIN_EXAMPLES
        return {TRAIN_EXAMPLES: len(self.train) if self.train is not None else None,
                DATA_REPAIRED_LINES: self.repairs.total}

    def log_lines(self, cfg: MLMConfig) -> list[str]:
        lines = [f"warning: {self.repairs.warning()}"] if self.repairs.total else []
        if self.train is None:
            from .streaming import describe_source
            held = "held out from the stream" if self.stream_exclude else \
                "from the validation split"
            return lines + [f"data: streaming {describe_source(cfg)}; {len(self.validation)} "
                            f"validation examples ({held})"]
        lengths = self.train.lengths
        return lines + [f"data: {len(self.train)} train / {len(self.validation)} validation "
                        f"examples, {int(lengths.sum(dtype='int64'))} train tokens, median "
                        f"length {int(np.median(lengths))}"]


def load_run_data(cfg: MLMConfig, tokenizer, accelerator) -> RunData:
    """The run's data from ``--tokenized_dir`` (nothing to tokenize), ``--streaming`` (only the
    eval set is tokenized up front) or any other source (`load_and_tokenize`). One process
    tokenizes into the datasets cache (one per node with ``--data_cache_per_node``), the others
    wait (up to ``--ddp_timeout``) and read it."""
    first = accelerator.local_main_process_first if cfg.data_cache_per_node \
        else accelerator.main_process_first
    repairs, exclude = DataRepairs(), frozenset()
    if cfg.tokenized_dir:
        from .pretokenize import load_pretokenized
        tokenized = load_pretokenized(cfg.tokenized_dir, tokenizer, cfg)
    elif cfg.streaming:
        from .streaming import held_out_eval
        with first():
            raw_eval, exclude = held_out_eval(cfg)
            tokenized = tokenize_datasets(DatasetDict({"validation": raw_eval}), tokenizer, cfg)
    else:
        with first():
            tokenized = load_and_tokenize(cfg, tokenizer, repairs)
    train = None if cfg.streaming else IndexedExamples(tokenized["train"])
    return RunData(train, IndexedExamples(tokenized["validation"]), exclude, repairs)
