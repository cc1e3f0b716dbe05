"""A downstream probe's labelled texts (``--probe_file``): read, checked at start, written.

A probe file is a .csv, .tsv or .jsonl file with a text column (``--probe_text_column``, default
``text``) and a label column (``--probe_label_column``, default ``label``); other columns are
ignored. Labels are classes: each distinct value is one (read as text, so ``1`` in a JSON line
and ``"1"`` in a CSV are the same class). What makes a file unusable for a stratified k-fold
probe -- a missing column, an empty text or label, one class only, a class with fewer examples
than folds -- is a `DataError` naming the fix, raised by `load_probe_sets` before any model
loads. A run may have several probes (``--probe_file A B``), each named by its file's stem
(`probe_name`). Only the standard library is used here: the recipe reads the files before the
heavy libraries load.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mlmkit.config.errors import DataError

PROBE_COLUMNS = ("text", "label")  # what `write_probe_file` writes


@dataclass(frozen=True)
class ProbeSet:
    """The probe's texts and their labels (strings), in the file's order."""
    path: str
    texts: list[str]
    labels: list[str]

    def counts(self) -> Counter:
        """Examples per label."""
        return Counter(self.labels)

    def describe(self) -> str:
        counts = self.counts()
        return (f"probe: {len(self.texts)} texts of {len(counts)} labels from {self.path} "
                f"(smallest label: {min(counts.values())} examples; the most frequent label "
                f"alone scores {self.majority_accuracy():.3f})")

    def majority_accuracy(self) -> float:
        """The accuracy of always answering the most frequent label: what a probe must beat."""
        return max(self.counts().values()) / len(self.labels)


def _rows(path: Path):
    """(row number, dict) of every record of ``path``: CSV/TSV rows (the header is row 1) or
    JSON lines (blank lines skipped)."""
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        if suffix == ".jsonl":
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"probe_file={str(path)!r}: line {number} is not JSON "
                                    f"({err.msg}). Fix: one JSON object per line.") from None
                if not isinstance(record, dict):
                    raise DataError(f"probe_file={str(path)!r}: line {number} is not a JSON "
                                    "object. Fix: one object per line, e.g. {\"text\": ..., "
                                    "\"label\": ...}.")
                yield number, record
        else:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for record in reader:
                yield reader.line_num, record


def read_probe_file(path: str | Path, text_column: str = "text", label_column: str = "label",
                    folds: int = 5) -> ProbeSet:
    """The labelled texts of ``path``, checked for a ``folds``-fold stratified probe; a
    `DataError` naming the fix otherwise."""
    path = Path(path)
    where = f"probe_file={str(path)!r}"
    texts: list[str] = []
    labels: list[str] = []
    for number, record in _rows(path):
        for key, flag in ((text_column, "probe_text_column"), (label_column, "probe_label_column")):
            if key not in record:
                columns = ", ".join(map(str, record)) or "none"
                raise DataError(f"{where}: no column {key!r} (row {number} has: {columns}). "
                                f"Fix: pass --{flag} <name>.")
        text, label = record[text_column], record[label_column]
        text = "" if text is None else str(text).strip()
        label = "" if label is None else str(label).strip()
        if not text or not label:
            what = "text" if not text else "label"
            raise DataError(f"{where}: row {number} has an empty {what}. Fix: fill it in or "
                            "drop the row.")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise DataError(f"{where}: no examples. Fix: write one labelled text per row under a "
                        f"header with {text_column!r} and {label_column!r}.")
    counts = Counter(labels)
    if len(counts) < 2:
        raise DataError(f"{where}: every example has the label {labels[0]!r}; a probe needs at "
                        "least 2 labels. Fix: add examples of another label, or check "
                        "--probe_label_column.")
    label, fewest = min(counts.items(), key=lambda item: (item[1], item[0]))
    if fewest < folds:
        raise DataError(f"{where}: the label {label!r} has {fewest} example(s), fewer than the "
                        f"{folds} cross-validation folds (each fold needs one of every label). "
                        f"Fix: pass --probe_folds {max(fewest, 2)}, add examples of that label, "
                        "or drop it.")
    return ProbeSet(str(path), texts, labels)


def probe_name(path: str | Path) -> str:
    """A probe's name in its metrics' names (``eval/probe_accuracy/<name>`` when a run has
    several): its file's stem."""
    return Path(path).stem


def load_probe_sets(cfg) -> list[ProbeSet]:
    """The run's probe sets (`read_probe_file` of each ``cfg.probe_file``, in order; the same
    columns and folds for all), empty without one."""
    return [read_probe_file(path, cfg.probe_text_column, cfg.probe_label_column, cfg.probe_folds)
            for path in cfg.probe_file]


def write_probe_file(path: str | Path, rows) -> int:
    """Write ``rows`` ((text, label) pairs) as a probe file (.tsv, .csv or .jsonl by the suffix,
    columns `PROBE_COLUMNS`), whitespace inside a text collapsed to single spaces (a line per
    example); written to a temporary file and renamed. Returns the number of rows."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".jsonl":
            for text, label in rows:
                f.write(json.dumps(dict(zip(PROBE_COLUMNS, (" ".join(text.split()), label)))) + "\n")
                count += 1
        else:
            writer = csv.writer(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                                lineterminator="\n")
            writer.writerow(PROBE_COLUMNS)
            for text, label in rows:
                writer.writerow((" ".join(text.split()), label))
                count += 1
    tmp.replace(path)
    return count
