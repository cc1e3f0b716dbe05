"""Tokenize once, train many times: a corpus tokenized into a folder that runs read directly.

Writing (:func:`pretokenize`, the body of ``recipes/pretokenize.py``):

* the examples are exactly the recipe's: :func:`mlmkit.data.load_and_tokenize` with the run's
  data flags (embedded corpus, ``--train_file`` incl. globs of shards, ``--dataset_name``,
  ``--mixture_files``, ``--max_train_samples``, ...), ``--preprocessing_num_workers`` as
  ``datasets.map``'s ``num_proc``;
* the folder holds ``train/`` and ``validation/`` (``Dataset.save_to_disk``, Arrow shards),
  ``dataset_dict.json`` (so ``datasets.load_from_disk(folder)`` opens it too) and
  ``mlmkit_tokenized.json``: what a run must agree with (tokenizer fingerprint,
  ``max_seq_length``, ``line_by_line``), where the examples came from, counts and throughput;
* it is built in ``<folder>.tmp-<pid>`` and renamed into place when complete, metadata last: a
  crash or an error never leaves a folder under the destination name. An existing non-empty
  destination is refused.

Reading (:func:`load_pretokenized`, ``--tokenized_dir``): the splits as
:func:`~mlmkit.data.load_and_tokenize` returns them (``input_ids``, ``special_tokens_mask``,
``length``, and ``source`` for a mixture), after checking the metadata against the run. A missing
or unreadable metadata file, another tokenizer, another ``max_seq_length`` or ``line_by_line`` is a
:class:`~mlmkit.data.DataError` naming what differs and the fix. ``--max_train_samples`` /
``--max_eval_samples`` then take the first N examples, as they do inline.

The tokenizer fingerprint hashes the vocabulary (sorted token/id pairs), the special tokens and
their ids, and the ids of a fixed probe text (normalisation, lower-casing, the special-token
template): the same tokenizer read from two folders has one fingerprint, two tokenizers that
would give different examples have two.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import datasets
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict

from mlmkit.config.errors import ConfigError, DataError
from mlmkit.config.fields import MLMConfig
from mlmkit.config.fileio import fsync_dir, fsync_tree, write_json_atomic
from mlmkit.data.corpus import limit_samples, load_and_tokenize
from mlmkit.data.files import DataRepairs
from mlmkit.model.checks import load_tokenizer

METADATA = "mlmkit_tokenized.json"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
COLUMNS = ("input_ids", "special_tokens_mask", "length")
# Splits larger than this are written by --preprocessing_num_workers processes; smaller ones by
# this process (starting the workers costs more than it saves).
PARALLEL_SAVE_BYTES = 256 * 2**20
PROBE_TEXT = ("Hello WORLD! Ünïcödé café naïve résumé, 12,345.67 tokens\tand\nwhitespace; "
              "日本語 émoji 🙂 don't stop-believing https://example.org/a_b?c=d")
FIX_RERUN = "re-run recipes/pretokenize.py"


# ============================================================================ writing
def pretokenize(cfg: MLMConfig, out_dir: str, num_shards: int | None = None) -> dict:
    """Tokenize the run's corpus (as the recipe would) into ``out_dir``; return the metadata.

    ``num_shards``: Arrow files per split (default: ``datasets``' choice, ~500 MB each, at least
    one per worker for large splits). Raises ConfigError for a bad destination or settings and
    DataError for unusable data; either way nothing is left under ``out_dir``.
    """

    out = Path(out_dir)
    check_destination(cfg, out, num_shards)
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    repairs = DataRepairs()
    tokenized = load_and_tokenize(cfg, tokenizer, repairs)
    tokenize_seconds = time.perf_counter() - start

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had this pid
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        splits = {name: save_split(tokenized[name], tmp / name, num_shards,
                                   cfg.preprocessing_num_workers) for name in SPLITS}
        (tmp / "dataset_dict.json").write_text(json.dumps({"splits": list(SPLITS)}) + "\n")
        seconds = time.perf_counter() - start
        tokens = sum(split["tokens"] for split in splits.values())
        metadata = {
            "format": "mlmkit-tokenized", "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tokenizer": tokenizer_info(tokenizer),
            "max_seq_length": cfg.max_seq_length, "line_by_line": cfg.line_by_line,
            "data": data_settings(cfg),
            "splits": splits,
            "repaired_lines": repairs.total, "repair_warning": repairs.warning(),
            "tokenize_seconds": round(tokenize_seconds, 3), "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1),
        }
        write_json_atomic(tmp / METADATA, metadata)  # last: the folder is complete
        fsync_tree(tmp)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metadata


def check_destination(cfg: MLMConfig, out: Path, num_shards: int | None) -> None:
    """Refuse, before any work, a destination or settings that cannot give a usable folder."""
    if cfg.tokenized_dir:
        raise ConfigError(f"tokenized_dir={cfg.tokenized_dir!r}: pretokenize reads raw data, not "
                          "a tokenized folder. Fix: drop --tokenized_dir and pass the data flags "
                          "(--train_file, --dataset_name, --mixture_files, or none for the "
                          "embedded corpus).")
    if cfg.streaming:
        raise ConfigError("streaming=True: pretokenize writes the whole corpus to a folder, not "
                          "a stream. Fix: drop --streaming.")
    if num_shards is not None and num_shards < 1:
        raise ConfigError(f"num_shards={num_shards}: must be at least 1. Fix: pass a positive "
                          "integer, e.g. --num_shards 8, or drop it.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output_dir={str(out)!r} already exists and is not empty. Fix: pass a "
                          f"new --output_dir, or delete {out} first.")


def save_split(split: Dataset, path: Path, num_shards: int | None,
               workers: int | None) -> dict:
    """Write one split (Arrow shards, in the split's order); its example and token counts."""
    if num_shards is not None:
        num_shards = max(1, min(num_shards, len(split)))
    big = split.data.nbytes > PARALLEL_SAVE_BYTES  # else workers start slower than one writes
    procs = min(workers, num_shards or workers) if workers and workers > 1 and big else None
    split.save_to_disk(str(path), num_shards=num_shards, num_proc=procs)
    saved = datasets.load_from_disk(str(path))  # counted from what is on disk (no index map)
    lengths = saved.data.column("length")
    info = {"examples": len(saved), "tokens": int(pc.sum(lengths).as_py() or 0),
            "shards": len(saved.cache_files)}
    if "source" in saved.column_names:  # --mixture_files: examples per source
        counts = pc.value_counts(saved.data.column("source")).to_pylist()
        info["examples_per_source"] = {str(c["values"]): c["counts"]
                                       for c in sorted(counts, key=lambda c: c["values"])}
    return info


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out`` (an empty ``out`` is replaced)."""
    try:
        os.rename(tmp, out)
    except OSError as err:  # created meanwhile by someone else, and not empty
        raise ConfigError(f"output_dir={str(out)!r} could not be written ({err.strerror}); it "
                          f"was probably filled while tokenizing. Fix: pass a new --output_dir, "
                          f"or delete {out} first.") from err
    fsync_dir(out.parent)


def data_settings(cfg: MLMConfig) -> dict:
    """The settings, besides tokenizer/max_seq_length/line_by_line, that shaped the examples."""
    settings = {"source": source_name(cfg), "text_column": cfg.text_column,
                "train_file": cfg.train_file, "validation_file": cfg.validation_file,
                "dataset_name": cfg.dataset_name, "dataset_config_name": cfg.dataset_config_name,
                "validation_split_percentage": cfg.validation_split_percentage,
                "max_train_samples": cfg.max_train_samples,
                "max_eval_samples": cfg.max_eval_samples,
                "preprocessing_num_workers": cfg.preprocessing_num_workers}
    if cfg.mixture_files:  # the interleaving order is drawn from the seed
        settings.update(mixture_files=list(cfg.mixture_files),
                        mixture_weights=list(cfg.mixture_weights), seed=cfg.seed)
    return settings


def source_name(cfg: MLMConfig) -> str:
    if cfg.mixture_files:
        return f"mixture of {len(cfg.mixture_files)} sources"
    return cfg.train_file or cfg.dataset_name or "embedded corpus"


# ============================================================================ tokenizer identity
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: vocabulary, special tokens, ids of a probe text."""
    digest = hashlib.sha256()
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    specials = sorted(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
    digest.update(json.dumps(specials, ensure_ascii=False).encode())
    probe = tokenizer(PROBE_TEXT, return_attention_mask=False, return_token_type_ids=False)
    digest.update(json.dumps(probe["input_ids"]).encode())
    return digest.hexdigest()


def tokenizer_info(tokenizer) -> dict:
    return {"name_or_path": tokenizer.name_or_path, "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)}


# ============================================================================ reading
def load_pretokenized(path: str, tokenizer, cfg: MLMConfig) -> DatasetDict:
    """The ``train`` and ``validation`` splits of a folder written by :func:`pretokenize`, after
    checking that they fit this run (see the module doc); ``--max_*_samples`` applied."""
    folder = Path(path)
    metadata = read_metadata(folder)
    check_metadata(metadata, folder, tokenizer, cfg)
    splits = {}
    for name in SPLITS:
        try:
            splits[name] = datasets.load_from_disk(str(folder / name))
        except (OSError, ValueError) as err:  # FileNotFoundError, a damaged shard, ...
            raise DataError(f"tokenized_dir={path!r}: the {name} split could not be read "
                            f"({type(err).__name__}: {err}). Fix: {FIX_RERUN} into a new "
                            "folder.") from err
        missing = [c for c in COLUMNS if c not in splits[name].column_names]
        if missing:
            raise DataError(f"tokenized_dir={path!r}: the {name} split lacks columns {missing}. "
                            f"Fix: {FIX_RERUN} into a new folder.")
    return limit_samples(DatasetDict(splits), cfg)


def read_metadata(folder: Path) -> dict:
    """``mlmkit_tokenized.json`` of ``folder``; DataError when it is missing or unreadable."""
    file = folder / METADATA
    if not file.is_file():
        raise DataError(f"tokenized_dir={str(folder)!r} has no {METADATA}: it was not written "
                        "(or not finished) by recipes/pretokenize.py. Fix: run python "
                        "recipes/pretokenize.py --output_dir <new folder> with the data flags "
                        "of this run, and pass that folder.")
    try:
        metadata = json.loads(file.read_text())
        version = metadata["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"tokenized_dir={str(folder)!r}: {METADATA} is unreadable "
                        f"({type(err).__name__}: {err}). Fix: {FIX_RERUN} into a new "
                        "folder.") from err
    if version != FORMAT_VERSION:
        raise DataError(f"tokenized_dir={str(folder)!r} is in format version {version}, this "
                        f"mlmkit reads version {FORMAT_VERSION}. Fix: {FIX_RERUN} with this "
                        "mlmkit, or train with the mlmkit that wrote it.")
    return metadata


def check_metadata(metadata: dict, folder: Path, tokenizer, cfg: MLMConfig) -> None:
    """DataError naming the first setting of the folder that differs from the run's."""
    where = f"tokenized_dir={str(folder)!r}"
    for key in ("max_seq_length", "line_by_line"):
        saved, run = metadata.get(key), getattr(cfg, key)
        if saved != run:
            saved, run = flag_value(saved), flag_value(run)
            raise DataError(f"{where} was tokenized with {key} {saved}, this run asks for {run}. "
                            f"Fix: {FIX_RERUN} with --{key} {run}, or pass --{key} {saved}.")
    saved = metadata.get("tokenizer") or {}
    mine = tokenizer_info(tokenizer)
    if saved.get("fingerprint") != mine["fingerprint"]:
        raise DataError(f"{where} was tokenized with tokenizer {saved.get('name_or_path')!r} "
                        f"({saved.get('vocab_size')} ids), which differs from this run's "
                        f"{mine['name_or_path']!r} ({mine['vocab_size']} ids). Fix: {FIX_RERUN} "
                        f"with --tokenizer_name {mine['name_or_path']}, or pass --tokenizer_name "
                        f"{saved.get('name_or_path')}.")


def flag_value(value) -> str:
    """``value`` as written on the command line (``true``/``false`` for booleans)."""
    return str(value).lower() if isinstance(value, bool) else str(value)
