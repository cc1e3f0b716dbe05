"""Local data files as they are shipped: `file_source` (one split's files: a path or a glob of
shards, one format, optionally compressed: .gz, .bz2, .xz, .zst; each split may have its own),
`load_file_split`, and the repairs of dirty files.

Dirty files: bytes of a .txt or .csv file that are not UTF-8 are replaced by U+FFFD and the run
goes on; the lines that held them are counted per file (:class:`DataRepairs`) and reported in one
warning line. A compressed file is not repaired (datasets decodes it strictly): its bad lines are
a `DataError` naming the first. A file that is empty, or holds only blank lines, is a
`DataError` saying so.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from mlmkit.config.errors import DataError
from mlmkit.config.validation import has_glob

FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
                 ".csv": "csv", ".parquet": "parquet"}


# Builders that can replace undecodable bytes (``encoding_errors``, as in ``open()``); JSON is
# parsed by pyarrow from raw bytes, which has no such option.
REPAIRABLE_BUILDERS = ("text", "csv")


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


def expand_files(pattern: str) -> list[str]:
    """The files of one source: ``pattern`` itself, or the sorted matches of a glob (shards)."""
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

