"""Small file helpers that every writer of the run folder shares.

* `atomic_write_text` / `write_json_atomic`: write to a temporary name, fsync, rename -- a reader
  (or a run killed mid-write) sees the old file or the new one, never half of one.
* `read_jsonl`: the one reader of JSON-lines files (metrics.jsonl); a line cut off by a kill is
  skipped, the rest is kept.
* `fsync_tree` / `fsync_dir`: flush a folder before it is marked complete or renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through ``<path>.tmp``, fsynced, then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_jsonl(path: str | os.PathLike) -> list:
    """Every parseable line of a JSON-lines file (blank and cut-off lines are skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut off by a killed run: the rest is still good
    return records


def fsync_tree(root: str | os.PathLike) -> None:
    for dirpath, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)
