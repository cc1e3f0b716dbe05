"""What a run reads (`load_run_data`): its examples from ``--tokenized_dir`` (nothing to
tokenize), ``--streaming`` (only the eval set tokenized up front) or any other source
(`corpus.load_and_tokenize`), as `RunData`. Above the three ways to read data: it dispatches to
them, none of them imports it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasets import DatasetDict

from mlmkit.config.fields import MLMConfig
from mlmkit.config.keys import DATA_REPAIRED_LINES, TRAIN_EXAMPLES
from mlmkit.data.corpus import IndexedExamples, load_and_tokenize, tokenize_datasets
from mlmkit.data.files import DataRepairs
from mlmkit.data.pretokenize import load_pretokenized
from mlmkit.data.streaming import describe_source, held_out_eval


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
        return {TRAIN_EXAMPLES: len(self.train) if self.train is not None else None,
                DATA_REPAIRED_LINES: self.repairs.total}

    def log_lines(self, cfg: MLMConfig) -> list[str]:
        lines = [f"warning: {self.repairs.warning()}"] if self.repairs.total else []
        if self.train is None:
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
        tokenized = load_pretokenized(cfg.tokenized_dir, tokenizer, cfg)
    elif cfg.streaming:
        with first():
            raw_eval, exclude = held_out_eval(cfg)
            tokenized = tokenize_datasets(DatasetDict({"validation": raw_eval}), tokenizer, cfg)
    else:
        with first():
            tokenized = load_and_tokenize(cfg, tokenizer, repairs)
    train = None if cfg.streaming else IndexedExamples(tokenized["train"])
    return RunData(train, IndexedExamples(tokenized["validation"]), exclude, repairs)
