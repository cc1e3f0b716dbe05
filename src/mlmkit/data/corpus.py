"""Corpus loading, tokenization and example building.

Four sources, one code path after loading:

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

Local files, compressed or not, and their repairs: `mlmkit.data.files`. What a run reads, whatever
the source: `mlmkit.data.run`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from itertools import chain
from typing import TypedDict

import datasets
import numpy as np
from datasets import Dataset, DatasetDict

from mlmkit.config.errors import ConfigError, DataError
from mlmkit.config.fields import MLMConfig
from mlmkit.data.files import DataRepairs, _check_files, load_file_split

# The validation split of a corpus without one is drawn with this seed, not the run's seed, so
# that every run (every ablation arm and seed) evaluates on the same held-out examples.
SPLIT_SEED = 1234


def embedded_topics() -> dict[str, list[str]]:
    """CPython's reference documentation (``pydoc_data.topics``) as paragraphs per topic, the
    topics in sorted order (the demo probe's labels: `probe_sets`)."""
    from pydoc_data.topics import topics

    return {key: [p.strip() for p in topics[key].split("\n\n") if p.strip()]
            for key in sorted(topics)}


def embedded_corpus() -> list[str]:
    """Paragraphs of CPython's reference documentation (``pydoc_data.topics``), in a fixed order."""
    return [p for paragraphs in embedded_topics().values() for p in paragraphs]


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

    tokenize = dict(column=col, tokenizer=tokenizer, max_length=cfg.max_seq_length,
                    line_by_line=line_by_line)
    tokenized = DatasetDict()
    for name in raw:
        split = raw[name] if line_by_line else \
            raw[name].filter(_nonempty, batched=True, fn_kwargs={"column": col},
                             desc=f"dropping empty {name} rows", **map_kwargs)
        tokenized[name] = split.map(
            _tokenize_batch, batched=True, fn_kwargs=tokenize,
            remove_columns=raw[name].column_names,
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


def _tokenize_batch(batch, *, column: str, tokenizer, max_length: int,
                    line_by_line: bool) -> dict[str, list]:
    """One map batch of a split -> its examples (`text_examples`)."""
    texts = [t for t in batch[column] if t and t.strip()] if line_by_line else batch[column]
    return text_examples(texts, tokenizer, max_length=max_length, line_by_line=line_by_line)


def _nonempty(batch, *, column: str) -> list[bool]:
    """Grouped examples: a map batch is 1000 documents, blank lines included; drop the empty."""
    return [bool(t) for t in batch[column]]


def limit_samples(tokenized: DatasetDict, cfg: MLMConfig) -> DatasetDict:
    """Apply ``--max_train_samples`` / ``--max_eval_samples`` (the first N examples)."""
    if cfg.max_train_samples and "train" in tokenized:
        tokenized["train"] = tokenized["train"].select(
            range(min(cfg.max_train_samples, len(tokenized["train"]))))
    if cfg.max_eval_samples:
        tokenized["validation"] = tokenized["validation"].select(
            range(min(cfg.max_eval_samples, len(tokenized["validation"]))))
    return tokenized


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

