"""`validate_config`: every check of a config's values, by topic, before anything heavy loads;
the first error is a `ConfigError` naming the key and the fix."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import NoReturn

from mlmkit.config.choices import (
    ATTN_IMPLEMENTATIONS,
    COMPILE_MODES,
    LR_DECAY_TYPES,
    OPTIMIZERS,
    PADDING_CHOICES,
    PROBE_FILE_TYPES,
    PROBE_MASK_PADDING,
    REPORT_TO,
    SCHEDULERS,
)
from mlmkit.config.errors import ConfigError
from mlmkit.config.fields import MLMConfig


def has_glob(path: str) -> bool:
    """True when ``path`` is a glob pattern (several shards) rather than one file."""
    return any(c in path for c in "*?[")


def _bad(cfg: MLMConfig, key: str, why: str, fix: str) -> NoReturn:
    """Raise the ConfigError for ``key``: its value, why it is impossible, and the fix."""
    raise ConfigError(f"{key}={getattr(cfg, key)!r}: {why}. Fix: {fix}.")


def _check_choices(cfg: MLMConfig) -> None:
    """Options with a fixed list of values (choices.py)."""
    choices = {"padding": PADDING_CHOICES, "attn_implementation": ATTN_IMPLEMENTATIONS,
               "report_to": REPORT_TO, "lr_scheduler_type": SCHEDULERS,
               "torch_compile_mode": COMPILE_MODES, "probe_mask_padding": PROBE_MASK_PADDING,
               "optimizer": OPTIMIZERS, "lr_decay_type": LR_DECAY_TYPES}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed and not (
                key in ("attn_implementation", "lr_decay_type") and getattr(cfg, key) is None):
            _bad(cfg, key, "not a known value", f"use one of {', '.join(allowed)}")


def _check_rates(cfg: MLMConfig) -> None:
    """Masking probabilities, schedule fractions, learning rate and epsilon."""
    for key in ("mlm_probability", "eval_mlm_probability"):
        if not 0.0 < getattr(cfg, key) < 1.0:
            _bad(cfg, key, "must lie strictly between 0 and 1", f"pass e.g. --{key} 0.15")
    for key in ("mask_replace_prob", "random_replace_prob", "warmup_ratio"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            _bad(cfg, key, "must lie in [0, 1]", f"pass a probability, e.g. --{key} 0.1")
    if cfg.mask_replace_prob + cfg.random_replace_prob > 1.0:
        _bad(cfg, "random_replace_prob", "mask_replace_prob + random_replace_prob exceeds 1",
             "make the two sum to at most 1 (default 0.8 + 0.1)")
    if not 0.0 < cfg.decay_ratio <= 1.0:
        _bad(cfg, "decay_ratio", "must lie in (0, 1]", "pass a fraction of the steps, e.g. "
             "--decay_ratio 0.1")
    if cfg.lr_scheduler_type == "warmup_stable_decay" and not cfg.num_warmup_steps and \
            cfg.warmup_ratio + cfg.decay_ratio > 1.0:
        _bad(cfg, "decay_ratio", f"warmup_ratio ({cfg.warmup_ratio}) + decay_ratio exceeds 1, "
             "so warmup and decay overlap", "make the two sum to at most 1")
    for key in ("learning_rate", "adam_epsilon"):
        if getattr(cfg, key) <= 0:
            _bad(cfg, key, "must be positive", f"pass e.g. --{key} 5e-5")


def _check_optimizer(cfg: MLMConfig) -> None:
    """The optimizer's options and the LR decay's shape (what the launch decides: optim.py)."""
    if cfg.lr_decay_type is not None and cfg.lr_scheduler_type != "warmup_stable_decay":
        _bad(cfg, "lr_decay_type", f"shapes the decay of warmup_stable_decay only, not of "
             f"lr_scheduler_type={cfg.lr_scheduler_type!r}", "add --lr_scheduler_type "
             "warmup_stable_decay, or drop --lr_decay_type")
    if cfg.skip_nonfinite_steps and cfg.optimizer != "adamw":
        _bad(cfg, "skip_nonfinite_steps", f"a step is skipped on the device by fused "
             f"AdamW, which optimizer={cfg.optimizer!r} cannot do",
             "use --optimizer adamw, or drop --skip_nonfinite_steps (a non-finite step then "
             "stops the run)")


def _check_sizes(cfg: MLMConfig) -> None:
    """Batch sizes, lengths, step and example counts."""
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "max_seq_length", "logging_steps"):
        if getattr(cfg, key) < 1:
            _bad(cfg, key, "must be at least 1", f"pass a positive integer, e.g. --{key} 8")
    for key in ("max_train_steps", "eval_steps", "checkpointing_steps", "save_total_limit",
                "max_train_samples", "max_eval_samples", "pad_to_multiple_of"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            _bad(cfg, key, "must be at least 1 when set",
                 f"pass a positive integer or drop --{key}")
    if cfg.num_train_epochs <= 0 and cfg.max_train_steps is None:
        _bad(cfg, "num_train_epochs", "must be positive",
             "pass --num_train_epochs 1 or set --max_train_steps")
    if not 0 < cfg.validation_split_percentage < 100:
        _bad(cfg, "validation_split_percentage", "must lie in 1..99", "pass e.g. 10")
    if cfg.max_seq_length > 8192:
        _bad(cfg, "max_seq_length", "is larger than any supported encoder", "use at most the "
             "model's max_position_embeddings (512 for BERT)")
    if cfg.streaming_eval_examples < 1:
        _bad(cfg, "streaming_eval_examples", "must be at least 1", "pass e.g. 1000")
    tokens = cfg.per_device_train_tokens
    if tokens is not None and tokens < cfg.max_seq_length:  # <= 0 included
        _bad(cfg, "per_device_train_tokens", f"holds less than one example of max_seq_length="
             f"{cfg.max_seq_length} tokens", f"pass at least --per_device_train_tokens "
             f"{cfg.max_seq_length}, e.g. {cfg.max_seq_length * 64} ({cfg.max_seq_length} x 64), "
             "or lower --max_seq_length")


def _check_runtime(cfg: MLMConfig) -> None:
    """The speed and distributed settings: how a run runs, not what it computes."""
    if cfg.dataloader_num_workers is not None and cfg.dataloader_num_workers < 0:
        _bad(cfg, "dataloader_num_workers", "must be at least 0",
             "pass e.g. --dataloader_num_workers 2 (0: collate inline)")
    if cfg.peak_tflops is not None and cfg.peak_tflops <= 0:
        _bad(cfg, "peak_tflops", "must be positive when set", "pass the device's dense TFLOP/s, "
             "e.g. --peak_tflops 989 for an H100 SXM in bf16")
    if cfg.ddp_timeout < 1:
        _bad(cfg, "ddp_timeout", "must be at least 1 second", "pass e.g. --ddp_timeout 7200")


def _check_sources(cfg: MLMConfig) -> None:
    """One source of training data; a mixture's sources and weights agree."""
    if cfg.dataset_name and (cfg.train_file or cfg.validation_file):
        _bad(cfg, "dataset_name", "given together with train_file/validation_file",
             "pass either --dataset_name or --train_file, not both")
    if cfg.validation_file and not (cfg.train_file or cfg.mixture_files):
        _bad(cfg, "validation_file", "given without train_file", "add --train_file")
    sources = [k for k in ("dataset_name", "train_file", "mixture_files", "tokenized_dir")
               if getattr(cfg, k)]
    if len(sources) > 1:
        _bad(cfg, sources[1], f"given together with {sources[0]}", "pass one source of training "
             "data: --dataset_name, --train_file, --mixture_files or --tokenized_dir")
    if len(cfg.mixture_files) != len(cfg.mixture_weights):
        _bad(cfg, "mixture_weights", f"{len(cfg.mixture_weights)} weights for "
             f"{len(cfg.mixture_files)} --mixture_files sources", "give one weight per source, "
             "e.g. --mixture_files a.parquet b.parquet --mixture_weights 0.7 0.3")
    if cfg.mixture_files and (len(cfg.mixture_files) < 2 or
                              not all(w > 0 for w in cfg.mixture_weights)):
        _bad(cfg, "mixture_weights", "a mixture needs at least 2 sources with positive weights",
             "use --train_file for one source, or give every source a weight > 0")


def _check_grouping(cfg: MLMConfig) -> None:
    """--group_by_length needs examples to sort: not packed rows, not a stream."""
    if cfg.group_by_length and cfg.padding == "packed":
        _bad(cfg, "group_by_length", "has no effect with --padding packed (packed rows carry no "
             "padding to save)", "drop --group_by_length or use --padding longest")
    if cfg.streaming and cfg.group_by_length:
        _bad(cfg, "group_by_length", "is not available with --streaming", "drop "
             "--group_by_length, or use --padding packed")


def _check_streaming(cfg: MLMConfig) -> None:
    """--streaming: a step budget, raw text, no first-N selection."""
    if cfg.streaming and cfg.max_train_steps is None:
        _bad(cfg, "streaming", "a stream has no known length, so the run needs a step budget",
             "add --max_train_steps N")
    if cfg.streaming and cfg.tokenized_dir:
        _bad(cfg, "streaming", "given together with tokenized_dir (already tokenized: read it "
             "map-style)", "drop --streaming")
    if cfg.streaming and cfg.max_train_samples:
        _bad(cfg, "max_train_samples", "has no effect with --streaming (the stream has no first "
             "N to select)", "drop it; --max_train_steps bounds the run")


def _looks_local(name: str) -> bool:
    """True when ``name`` can only mean a local path, never a Hub id (``org/name``): it exists,
    starts like a path (``/``, ``./``, ``../``, ``~``) or has more than one ``/``."""
    return (Path(name).exists() or name.startswith(("/", "./", "../", "~")) or name in (".", "..")
            or name.count("/") > 1)


def _missing_fix(name: str, here: str) -> str:
    if name.startswith("~"):
        return ("write the path in full or leave ~ unquoted (the shell expands ~ only outside "
                "quotes)")
    return f"check the path ({here})"


def _check_files(cfg: MLMConfig) -> None:
    """The data's folders, files and glob patterns exist, and each is of the kind its flag takes
    (a file for --train_file, a folder for --tokenized_dir, ...)."""
    here = f"relative paths start from the current directory {os.getcwd()}"
    if cfg.tokenized_dir is not None and not Path(cfg.tokenized_dir).is_dir():
        if Path(cfg.tokenized_dir).exists():
            _bad(cfg, "tokenized_dir", "is a file, not a folder", "pass the folder that "
                 "recipes/pretokenize.py wrote (its --output_dir); raw text goes to --train_file")
        _bad(cfg, "tokenized_dir", "no such folder", "run recipes/pretokenize.py first, or "
             "check the path")
    for key in ("train_file", "validation_file"):
        path = getattr(cfg, key)
        if path is not None and has_glob(path):
            if not glob.glob(path):
                _bad(cfg, key, "the pattern matches no file", f"check the pattern ({here})")
            if not any(Path(p).is_file() for p in glob.glob(path)):
                _bad(cfg, key, "the pattern matches only folders", "make it match the files, "
                     f"e.g. --{key} '{path.rstrip('/')}/*.parquet'")
        elif path is not None and Path(path).is_dir():
            _bad(cfg, key, "is a folder, not a file", f"pass one file, or a quoted glob of the "
                 f"folder's shards, e.g. --{key} '{path.rstrip('/')}/*.parquet'"
                 + (" (a folder written by recipes/pretokenize.py goes to --tokenized_dir)"
                    if key == "train_file" else ""))
        elif path is not None and not Path(path).is_file():
            _bad(cfg, key, "no such file", _missing_fix(path, here))
    for pattern in cfg.mixture_files:
        if not (glob.glob(pattern) if has_glob(pattern) else Path(pattern).is_file()):
            if Path(pattern).is_dir():
                raise ConfigError(f"mixture_files: {pattern!r} is a folder, not a file. Fix: pass "
                                  f"a quoted glob of its files, e.g. '{pattern.rstrip('/')}/*."
                                  "parquet'.")
            raise ConfigError(f"mixture_files: {pattern!r} matches no file. Fix: check the path "
                              f"({here}).")
    if cfg.dataset_name and _looks_local(cfg.dataset_name) and not Path(cfg.dataset_name).exists():
        _bad(cfg, "dataset_name", "no such folder (and not a Hub dataset name)",
             _missing_fix(cfg.dataset_name, here))


def _check_model(cfg: MLMConfig) -> None:
    """Pretrained weights or a config to train from scratch, not both; the model, config and
    tokenizer names that are local paths exist and are of the kind each flag takes. (What is
    inside the folders is checked by `checks.check_model_source`, before the data loads.)"""
    if cfg.config_name and cfg.model_name_or_path:
        _bad(cfg, "config_name", "given together with model_name_or_path",
             "pass --config_name to train from scratch or --model_name_or_path to fine-tune")
    here = f"relative paths start from the current directory {os.getcwd()}"
    for key in ("model_name_or_path", "config_name", "tokenizer_name"):
        name = getattr(cfg, key)
        if not name:
            continue
        path = Path(name)
        if path.is_file() and key != "config_name":
            _bad(cfg, key, "is a file, not a folder", f"pass the folder that holds it "
                 f"(--{key} {str(path.parent)!r})")
        if not path.exists() and _looks_local(name):
            what = "no such file or folder" if key == "config_name" else "no such folder"
            _bad(cfg, key, f"{what} (and not a Hub id)", _missing_fix(name, here))


def _check_average(cfg: MLMConfig) -> None:
    """--average_checkpoints K: the final weights and K-1 checkpoints saved before the last step,
    all kept by the retention (a checkpoint of the last step may take one of its places)."""
    k = cfg.average_checkpoints
    if k is None:
        return
    if k < 2:
        _bad(cfg, "average_checkpoints", "an average needs at least 2 weights (the final ones "
             "and a checkpoint)", "pass --average_checkpoints 2 or more, or drop it")
    if not cfg.checkpointing_steps:
        _bad(cfg, "average_checkpoints", "averages saved checkpoints, but the run saves none",
             f"add --checkpointing_steps N (a checkpoint every N steps; the last {k - 1} before "
             "the end are averaged with the final weights)")
    if cfg.save_total_limit is not None and cfg.save_total_limit < k:
        _bad(cfg, "save_total_limit", f"keeps fewer checkpoints than --average_checkpoints {k} "
             f"needs ({k - 1} before the last step, and the last step's own)",
             f"pass --save_total_limit {k} or more, or drop it")
    steps, every = cfg.max_train_steps, cfg.checkpointing_steps
    if steps is not None and (steps - 1) // every < k - 1:
        _bad(cfg, "average_checkpoints", f"{steps} steps with a checkpoint every {every} save "
             f"{(steps - 1) // every} before the last step, and {k - 1} are needed",
             f"pass --checkpointing_steps {max(1, (steps - 1) // (k - 1))} or less")


def _check_downstream(cfg: MLMConfig) -> None:
    """The downstream probe's file (its type and that it exists; its columns and labels are read
    by `probe_file.load_probe_sets` at start) and its folds; the pseudo-perplexity's examples."""
    if cfg.probe_folds < 2:
        _bad(cfg, "probe_folds", "cross-validation needs at least 2 folds", "pass e.g. "
             "--probe_folds 5")
    if cfg.pseudo_perplexity_examples < 0:
        _bad(cfg, "pseudo_perplexity_examples", "must be at least 0", "pass e.g. "
             "--pseudo_perplexity_examples 32 (0: off)")
    stems = [Path(name).stem for name in cfg.probe_file]
    for stem in stems:
        if stems.count(stem) > 1:
            _bad(cfg, "probe_file", f"two files named {stem!r} (a probe's metrics are named by "
                 "its file's stem)", "rename one of them, e.g. movies.tsv and tweets.tsv")
    for name in cfg.probe_file:
        _check_probe_file(cfg, name)


def _check_probe_file(cfg: MLMConfig, name: str) -> None:
    """One --probe_file: a .csv, .tsv or .jsonl file that exists."""
    path = Path(name)
    if path.is_dir():
        _bad(cfg, "probe_file", "is a folder, not a file", "pass one labelled-text file, e.g. "
             f"--probe_file {str(path / 'docs.tsv')!r}")
    if path.suffix.lower() not in PROBE_FILE_TYPES:
        _bad(cfg, "probe_file", f"not a {', '.join(PROBE_FILE_TYPES)} file", "write the "
             "labelled texts as .csv, .tsv or .jsonl with a text and a label column")
    if not path.is_file():
        here = f"relative paths start from the current directory {os.getcwd()}"
        _bad(cfg, "probe_file", "no such file", f"{_missing_fix(name, here)}; "
             "`python -m mlmkit.data.probe_sets docs probes` writes a demo probe, probes/docs.tsv")


def _check_resume(cfg: MLMConfig) -> None:
    """--resume_from_checkpoint: auto, none, or a checkpoint folder that exists."""
    if cfg.resume_from_checkpoint not in ("auto", "none") and Path(
            cfg.resume_from_checkpoint).is_file():
        _bad(cfg, "resume_from_checkpoint", "is a file, not a checkpoint folder",
             "pass the checkpoint-<step> folder that holds it, auto, or none")
    if cfg.resume_from_checkpoint not in ("auto", "none") and not Path(
            cfg.resume_from_checkpoint).is_dir():
        _bad(cfg, "resume_from_checkpoint", "no such checkpoint folder",
             "pass auto, none, or an existing checkpoint folder")


def _check_schedules(cfg: MLMConfig) -> None:
    """The mask-rate schedule and the length and batch warm-ups."""
    final = cfg.mlm_probability_final
    if final is not None and not 0.0 < final < 1.0:
        _bad(cfg, "mlm_probability_final", "must lie strictly between 0 and 1",
             "pass e.g. --mlm_probability_final 0.15, or drop it for a fixed rate")
    for key in ("seq_len_warmup_steps", "batch_warmup_steps"):
        if getattr(cfg, key) < 0:
            _bad(cfg, key, "must be at least 0", f"pass a step count, or 0 (off): --{key} 0")
    start, steps = cfg.seq_len_warmup_start, cfg.seq_len_warmup_steps
    if start is not None and not steps:
        _bad(cfg, "seq_len_warmup_start", "has no effect without --seq_len_warmup_steps",
             "add --seq_len_warmup_steps N, or drop --seq_len_warmup_start")
    if steps and (start is None or not 1 <= start < cfg.max_seq_length):
        _bad(cfg, "seq_len_warmup_start", f"must lie in 1..{cfg.max_seq_length - 1} (below "
             f"--max_seq_length) for --seq_len_warmup_steps", "pass the first length, e.g. "
             f"--seq_len_warmup_start {max(1, cfg.max_seq_length // 4)}")
    if steps and cfg.padding == "max_length":
        _bad(cfg, "seq_len_warmup_steps", "cannot shorten rows that --padding max_length pads "
             "to max_seq_length", "use --padding longest or packed, or drop the warm-up")


_CHECKS = (_check_choices, _check_rates, _check_optimizer, _check_sizes, _check_runtime, _check_sources,
           _check_grouping, _check_streaming, _check_schedules, _check_files, _check_model,
           _check_average, _check_downstream, _check_resume)


def validate_config(cfg: MLMConfig) -> MLMConfig:
    """Raise ConfigError for impossible values of ``cfg``; called before anything heavy loads.

    The checks run by topic, in the order of ``_CHECKS`` (values on their own first, then how
    they combine, then what they name on disk), so the first error is the one reported."""
    for check in _CHECKS:
        check(cfg)
    return cfg
