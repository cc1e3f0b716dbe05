"""Typed run configuration: one dataclass, YAML + ``--key value`` overrides, validation.

Flag names follow ``run_mlm_no_trainer.py`` (and the HF Trainer for ``--logging_steps`` /
``--eval_steps``) so users of that script feel at home. Parsing is done by transformers'
``HfArgumentParser``; a YAML file given with ``--config`` supplies defaults that the command line
overrides. YAML values go through the same typed parser as CLI flags, so a wrong type in a file is
caught the same way, and the error names the file and the key.

Every field carries its ``--help`` text and two flags (`_meta`): ``bookkeeping`` (may change on
resume, not a difference between runs) and ``per_run`` (names one run of a set). `validate_config`
checks by topic, before anything heavy loads. `run_shape` derives, once, the settings that follow
from the config, the launch and the resolved padding (workers, collator widths, global batch).

Launch settings (processes, machines, mixed precision, ZeRO stage) are *not* here: they belong to
``accelerate launch --config_file accelerate_configs/X.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from transformers import HfArgumentParser

from .choices import (ATTN_IMPLEMENTATIONS, COMPILE_MODES, GRAPHED_COMPILE_MODES,
                      PADDING_CHOICES, REPORT_TO, SCHEDULERS)
from .configio import (ConfigError, config_differences, did_you_mean, read_yaml_mapping,
                       to_cli_args)
from .fileio import atomic_write_text

__all__ = ["ConfigError", "MLMConfig", "parse_config", "save_config", "BOOKKEEPING_KEYS",
           "PER_RUN_KEYS", "differences", "RunShape", "run_shape", "micro_batch"]


_OWN_METADATA = ("bookkeeping", "per_run")


def _meta(help: str | None = None, *, bookkeeping: bool = False, per_run: bool = False) -> dict:
    """Field metadata. ``bookkeeping``: the key does not change what a run computes (logging,
    tracking, checkpoint cadence, resume control), so a run may be resumed with it changed and a
    finished run is not "different" because of it. ``per_run``: the key names one run of a set
    (an ablation's arms x seeds), so it differs between runs by construction."""
    meta: dict[str, Any] = {"bookkeeping": bookkeeping, "per_run": per_run}  # _OWN_METADATA
    if help:
        meta["help"] = help
    return meta


@dataclass
class MLMConfig:
    # --- model -------------------------------------------------------------------------------
    model_name_or_path: str | None = field(default=None, metadata=_meta(
        "Hub id or local folder of a pretrained encoder. Default: the embedded all-MiniLM-L6-v2 "
        "that installs with mlmkit."))
    config_name: str | None = field(default=None, metadata=_meta(
        "Train from scratch from this config (hub id, folder or config.json) instead of "
        "pretrained weights; the tokenizer is --tokenizer_name, else the embedded model's "
        "(uncased WordPiece, 30,522 ids)."))
    tokenizer_name: str | None = field(default=None, metadata=_meta(
        "Tokenizer, if not the model's."))
    attn_implementation: str | None = field(default=None, metadata=_meta(
        f"One of {ATTN_IMPLEMENTATIONS}; unset: transformers' choice (SDPA where the "
        "architecture supports it, else eager)."))
    # --- data --------------------------------------------------------------------------------
    dataset_name: str | None = field(default=None, metadata=_meta(
        "A `datasets.load_dataset` name (hub or local folder)."))
    dataset_config_name: str | None = field(default=None, metadata=_meta(
        "The --dataset_name configuration (subset), if it has several."))
    train_file: str | None = field(default=None, metadata=_meta(
        "Local training file: .txt, .json/.jsonl, .csv, .parquet."))
    validation_file: str | None = field(default=None, metadata=_meta(
        "Local eval file, used whole (same formats as --train_file)."))
    text_column: str = field(default="text", metadata=_meta("Column holding the text."))
    validation_split_percentage: int = field(default=10, metadata=_meta(
        "Held-out percentage when no validation split exists."))
    max_train_samples: int | None = field(default=None, metadata=_meta(
        "Train on the first N examples only."))
    max_eval_samples: int | None = field(default=None, metadata=_meta(
        "Evaluate on the first N examples only."))
    line_by_line: bool = field(default=True, metadata=_meta(
        "One example per non-blank line (true) or concatenate and chunk into max_seq_length "
        "blocks (false)."))
    max_seq_length: int = field(default=128, metadata=_meta("Tokens per example / packed row."))
    mixture_files: list[str] = field(default_factory=list, metadata=_meta(
        "Train on a weighted mixture of local corpora instead of --train_file: one file or glob "
        "per source (with --mixture_weights)."))
    mixture_weights: list[float] = field(default_factory=list, metadata=_meta(
        "Sampling probability of each --mixture_files source (per example; normalised to sum to "
        "1; drawn reproducibly from --seed)."))
    tokenized_dir: str | None = field(default=None, metadata=_meta(
        "Train from a folder written by recipes/pretokenize.py (no tokenization at start); model "
        "tokenizer and max_seq_length must match."))
    streaming: bool = field(default=False, metadata=_meta(
        "Read the corpus as a stream (datasets IterableDataset), tokenized on the fly, each "
        "process its own shards; needs --max_train_steps."))
    streaming_eval_examples: int = field(default=1000, metadata=_meta(
        "--streaming without --validation_file: the first N examples of the stream are held out "
        "for eval and never trained on."))
    preprocessing_num_workers: int | None = field(default=None, metadata=_meta(
        "Processes that tokenize (datasets.map num_proc). Default: one.", bookkeeping=True))
    overwrite_cache: bool = field(default=False, metadata=_meta(
        "Tokenize again instead of reading the datasets cache.", bookkeeping=True))
    # --- batching and masking ----------------------------------------------------------------
    padding: str = field(default="auto", metadata=_meta(
        f"One of {PADDING_CHOICES}. auto: packed where the start-up probe proves that packed "
        "examples are isolated on this model, else longest."))
    accept_padding_leak: bool = field(default=False, metadata=_meta(
        "Train a model whose outputs depend on padding even with the attention mask (ConvBERT, "
        "FNet, ...), which the start-up probe otherwise refuses."))
    pad_to_multiple_of: int | None = field(default=None, metadata=_meta(
        "Round each batch's width up to a multiple of this (e.g. 8 for tensor cores)."))
    mask_padding: bool = field(default=True, metadata=_meta(
        "false withholds the attention mask from the model: padding is attended (the ablation's "
        "unmasked arm). Never for real training."))
    group_by_length: bool = field(default=False, metadata=_meta(
        "Batch examples of similar length together (less padding); the step order stays "
        "random."))
    mlm_probability: float = field(default=0.15, metadata=_meta(
        "Fraction of the training tokens masked for prediction."))
    eval_mlm_probability: float = field(default=0.15, metadata=_meta(
        "Masking rate of the eval set, independent of --mlm_probability (e.g. train at 0.3 and "
        "evaluate at 0.15, as ModernBERT and MosaicBERT do)."))
    mask_replace_prob: float = field(default=0.8, metadata=_meta(
        "Of the masked tokens, the fraction replaced by the mask token."))
    random_replace_prob: float = field(default=0.1, metadata=_meta(
        "Of the masked tokens, the fraction replaced by a random token (the rest stay as they "
        "are)."))
    whole_word_mask: bool = field(default=False, metadata=_meta(
        "Mask whole words: every piece of a word together. Words from the tokenizer's scheme: "
        "WordPiece '##', byte-level BPE 'Ġ', SentencePiece '▁' (masking.word_start_scheme)."))
    sparse_prediction: bool = field(default=True, metadata=_meta(
        "Apply the MLM head only at masked positions (same loss, less compute)."))
    # --- optimisation ------------------------------------------------------------------------
    per_device_train_batch_size: int = field(default=16, metadata=_meta(
        "Examples per device per micro-batch; with --padding packed, rows of max_seq_length "
        "tokens. --per_device_train_tokens, when set, replaces it."))
    per_device_train_tokens: int | None = field(default=None, metadata=_meta(
        "The micro-batch as tokens per device (what memory and speed follow), instead of "
        "--per_device_train_batch_size: packed, N // max_seq_length rows; padded, as many "
        "examples (in the plan's order) as fit with rows x padded width <= N. At least "
        "max_seq_length."))
    per_device_eval_batch_size: int = field(default=32, metadata=_meta(
        "Eval examples per device per batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=_meta(
        "Micro-batches per optimizer step."))
    learning_rate: float = field(default=5e-5, metadata=_meta("Peak learning rate (AdamW)."))
    weight_decay: float = field(default=0.01, metadata=_meta("AdamW weight decay."))
    adam_beta1: float = field(default=0.9, metadata=_meta("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_meta("AdamW beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_meta("AdamW epsilon."))
    max_grad_norm: float = field(default=1.0, metadata=_meta("0 disables clipping."))
    lr_scheduler_type: str = field(default="linear", metadata=_meta(f"One of {SCHEDULERS}."))
    num_warmup_steps: int = field(default=0, metadata=_meta(
        "Optimizer steps of linear warmup; 0: --warmup_ratio decides."))
    warmup_ratio: float = field(default=0.0, metadata=_meta("Used when num_warmup_steps is 0."))
    decay_ratio: float = field(default=0.1, metadata=_meta(
        "warmup_stable_decay only: fraction of the training steps in the final decay phase (the "
        "rest after warmup is stable at the peak rate)."))
    num_train_epochs: float = field(default=1.0, metadata=_meta(
        "Passes over the training set, unless --max_train_steps is set."))
    max_train_steps: int | None = field(default=None, metadata=_meta(
        "Optimizer steps; overrides num_train_epochs."))
    seed: int = field(default=42, metadata=_meta(
        "Seeds the batch plan, the masking and the model's initialisation.", per_run=True))
    # --- speed -------------------------------------------------------------------------------
    torch_compile: bool = field(default=False, metadata=_meta(
        "torch.compile the training module (inductor). With --padding packed the rows are laid "
        "out at a fixed (rows, max_seq_length) shape."))
    torch_compile_mode: str = field(default="default", metadata=_meta(
        f"torch.compile mode, one of {COMPILE_MODES}; reduce-overhead and max-autotune replay "
        "CUDA graphs (masked positions are then padded to a multiple of 256 so few shapes "
        "occur)."))
    gradient_checkpointing: bool = field(default=False, metadata=_meta(
        "Recompute activations in the backward pass (large models, long sequences): less "
        "memory, about a third more compute."))
    dataloader_num_workers: int | None = field(default=None, metadata=_meta(
        "Worker processes that collate steps ahead (pinned, copied asynchronously); 0 collates "
        "inline. Default: 2 on a GPU, 0 on CPU (where workers would compete with training for "
        "the same cores).", bookkeeping=True))
    peak_tflops: float | None = field(default=None, metadata=_meta(
        "The device's dense peak TFLOP/s for train/mfu (default: looked up for known GPUs; "
        "mlmkit.flops).", bookkeeping=True))
    # --- distributed -------------------------------------------------------------------------
    data_cache_per_node: bool = field(default=False, metadata=_meta(
        "The datasets cache is node-local (not on a shared filesystem): one process per node "
        "tokenizes, the node's others wait. Default: one process in all (shared cache).",
        bookkeeping=True))
    ddp_timeout: int = field(default=1800, metadata=_meta(
        "Seconds a collective may wait (e.g. while one process tokenizes) before the run fails; "
        "every backend (gloo, NCCL, DeepSpeed).", bookkeeping=True))
    # --- logging, eval, checkpoints ----------------------------------------------------------
    output_dir: str = field(default="outputs/mlm", metadata=_meta(
        "The run's folder: config, logs, checkpoints, the exported model.", bookkeeping=True,
        per_run=True))
    overwrite_output_dir: bool = field(default=False, metadata=_meta(
        "Delete a previous run's outputs in --output_dir and start fresh.", bookkeeping=True,
        per_run=True))
    logging_steps: int = field(default=10, metadata=_meta(
        "Log train metrics every N optimizer steps.", bookkeeping=True))
    eval_steps: int | None = field(default=None, metadata=_meta(
        "Evaluate every N optimizer steps (and always at the end).", bookkeeping=True))
    eval_pad_sensitivity: bool = field(default=True, metadata=_meta(
        "Log eval/loss_unmasked and eval/pad_sensitivity.", bookkeeping=True))
    checkpointing_steps: int | None = field(default=None, metadata=_meta(
        "Save a resumable checkpoint every N optimizer steps.", bookkeeping=True))
    save_total_limit: int | None = field(default=None, metadata=_meta(
        "Keep only the newest N checkpoints. Default: all.", bookkeeping=True))
    resume_from_checkpoint: str = field(default="auto", metadata=_meta(
        "auto (newest complete checkpoint), a path, or none.", bookkeeping=True, per_run=True))
    report_to: str = field(default="wandb", metadata=_meta(
        f"One of {REPORT_TO}.", bookkeeping=True))
    run_name: str | None = field(default=None, metadata=_meta(
        "The tracker's run name.", bookkeeping=True, per_run=True))
    wandb_project: str = field(default="mlmkit", metadata=_meta(
        "The tracker's project.", bookkeeping=True))
    wandb_group: str | None = field(default=None, metadata=_meta(
        "The tracker's run group.", bookkeeping=True))
    wandb_tags: list[str] = field(default_factory=list, metadata=_meta(
        "The W&B run's tags.", bookkeeping=True, per_run=True))
    progress_bar: bool = field(default=True, metadata=_meta(
        "Show a tqdm progress bar (main process).", bookkeeping=True))
    fill_mask_check: bool = field(default=True, metadata=_meta(
        "After training, fill one masked word in a few validation sentences with the exported "
        "model/ and the initial model (top-5 in the log and summary.json; mlmkit.fill_mask).",
        bookkeeping=True))

    # -----------------------------------------------------------------------------------------
    def validate(self) -> "MLMConfig":
        """Raise ConfigError for impossible values; called before anything heavy is loaded."""
        return validate_config(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
               "torch_compile_mode": COMPILE_MODES}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed and not (
                key == "attn_implementation" and cfg.attn_implementation is None):
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
    inside the folders is checked by `modelcheck.check_model_source`, before the data loads.)"""
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


_CHECKS = (_check_choices, _check_rates, _check_sizes, _check_runtime, _check_sources,
           _check_grouping, _check_streaming, _check_files, _check_model, _check_resume)


def validate_config(cfg: MLMConfig) -> MLMConfig:
    """Raise ConfigError for impossible values of ``cfg``; called before anything heavy loads.

    The checks run by topic, in the order of ``_CHECKS`` (values on their own first, then how
    they combine, then what they name on disk), so the first error is the one reported."""
    for check in _CHECKS:
        check(cfg)
    return cfg


FIELDS = tuple(f.name for f in dataclasses.fields(MLMConfig))
BOOKKEEPING_KEYS = frozenset(f.name for f in dataclasses.fields(MLMConfig)
                             if f.metadata.get("bookkeeping"))
PER_RUN_KEYS = frozenset(f.name for f in dataclasses.fields(MLMConfig) if f.metadata.get("per_run"))


def differences(saved: dict, current: dict) -> list[str]:
    """Settings that change what a run computes and differ between ``saved`` and ``current``
    (bookkeeping keys are free to differ; a key an older mlmkit did not write is its default)."""
    return config_differences(saved, current, defaults=MLMConfig().to_dict(),
                              ignore=BOOKKEEPING_KEYS)


@dataclass(frozen=True)
class RunShape:
    """Settings derived from the config, the launch and the resolved padding, computed once."""
    workers: int                    # DataLoader workers that prepare steps ahead
    pad_to_multiple_of: int | None  # train collator's width multiple (compile+packed: fixed)
    positions_multiple: int | None  # masked positions padded to a multiple (CUDA-graph friendly)
    global_batch_size: int          # examples (or packed rows) per optimizer step, all processes
    unit: str                       # "rows" when packed, else "examples"
    micro_batch_size: int           # examples (rows) per device per micro-batch; with
    #                                 micro_batch_tokens, the count at full width (a lower bound)
    micro_batch_tokens: int | None  # padded map-style --per_device_train_tokens: the plan fills
    #                                 each micro-batch to rows x padded width <= this


# Masked positions are padded (with "no target") to a multiple of this for compiled steps: few
# shapes under CUDA graphs (`RunShape.positions_multiple`), and the step of a static-shape run
# that outgrows its capacity takes the next multiple (`prefetch.StaticShapes`).
POSITIONS_MULTIPLE = 256


def micro_batch(cfg: MLMConfig, padding: str | None = None) -> tuple[int, int | None]:
    """``(examples or rows per device per micro-batch, padded token budget or None)`` of ``cfg``
    under the resolved ``padding`` (None: not yet known; the count is then the one every layout
    reaches). The one reading of --per_device_train_batch_size / --per_device_train_tokens.

    Tokens, packed: ``N // max_seq_length`` rows. Tokens, padded: rows vary with the width, so
    the map-style plan (`plans.TrainPlan`) fills each micro-batch to ``N``; ``--padding
    max_length`` (width always max_seq_length) and streams take the count that always fits,
    ``N // max_seq_length``."""
    tokens = cfg.per_device_train_tokens
    if tokens is None:
        return cfg.per_device_train_batch_size, None
    fits = tokens // cfg.max_seq_length
    budget = padding == "longest" and not cfg.streaming
    return fits, tokens if budget else None


def run_shape(cfg: MLMConfig, *, num_processes: int, on_gpu: bool, padding: str) -> RunShape:
    """The `RunShape` of a run of ``cfg`` on ``num_processes`` processes, with ``padding`` the
    resolved layout (``probe.resolve_padding``: never "auto")."""
    workers = cfg.dataloader_num_workers if cfg.dataloader_num_workers is not None else \
        (2 if on_gpu else 0)
    if cfg.streaming:  # one process reads the stream (its order is its state): one worker at most
        workers = min(workers, 1)
    packed = padding == "packed"
    micro, budget = micro_batch(cfg, padding)
    return RunShape(
        workers=workers,
        # compiled + packed: rows at a fixed (rows, max_seq_length) shape, so the graph is static
        pad_to_multiple_of=cfg.max_seq_length if cfg.torch_compile and packed
        else cfg.pad_to_multiple_of,
        # CUDA graphs (reduce-overhead, max-autotune): few distinct shapes of masked positions
        positions_multiple=POSITIONS_MULTIPLE if cfg.torch_compile
        and cfg.torch_compile_mode in GRAPHED_COMPILE_MODES else None,
        global_batch_size=micro * cfg.gradient_accumulation_steps * num_processes,
        unit="rows" if packed else "examples", micro_batch_size=micro, micro_batch_tokens=budget)


# -------------------------------------------------------------------------------------------------
class _Parser(HfArgumentParser):
    """HfArgumentParser that raises ConfigError instead of printing usage and exiting, and keeps
    mlmkit's own field metadata (bookkeeping, per_run) away from argparse."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        field = copy.copy(field)
        field.metadata = {k: v for k, v in field.metadata.items() if k not in _OWN_METADATA}
        HfArgumentParser._parse_dataclass_field(parser, field)

    def error(self, message: str):  # noqa: D401 - argparse hook
        raise ConfigError(f"{message.rstrip('.')}. Fix: {_argparse_fix(message)}.")


def _argparse_fix(message: str) -> str:
    """The fix for one of argparse's messages (a value of the wrong type, a missing value)."""
    match = re.match(r"argument (--\w+)", message)
    flag = match.group(1) if match else "the flag"
    if "expected one argument" in message or "expected at least one argument" in message:
        return f"give {flag} a value ({flag} VALUE; `python recipes/mlm.py --help` lists them)"
    if "invalid int value" in message:
        return f"pass a whole number to {flag}"
    if "invalid float value" in message:
        return f"pass a number to {flag} (e.g. 1e-4 or 0.15)"
    if "Truthy value expected" in message:
        return f"pass true or false to {flag}"
    return "see `python recipes/mlm.py --help` for the flags and their values"


def _parse_args(args: list[str]) -> MLMConfig:
    """``--key value`` arguments -> an MLMConfig, not yet validated. A word left over (a stray
    value, often a glob the shell expanded) is a ConfigError, not HfArgumentParser's ValueError."""
    cfg, leftover = _Parser(MLMConfig).parse_args_into_dataclasses(
        args=args, return_remaining_strings=True)
    flags = [arg for arg in leftover if re.match(r"--?[A-Za-z]", arg)]
    if flags:  # e.g. a single-dash -flag (its value is left over too)
        raise _unknown_option(flags[0])
    if leftover:
        raise ConfigError(
            f"unexpected argument(s) {', '.join(map(repr, leftover))} (not a --flag; a flag that "
            "takes one value was given several, often a glob the shell expanded). Fix: quote "
            "globs so the shell does not expand them (--train_file 'data/*.parquet'), or remove "
            "the stray words.")
    return cfg


def _unknown_option(flag: str) -> ConfigError:
    """The error for a command-line option that is not a recipe flag, with the nearest flag."""
    hint = did_you_mean(flag.lstrip("-"), FIELDS, "see --help", flag=True)
    return ConfigError(f"unknown option {flag}. Fix: remove it ({hint}).")


def unknown_key_error(key: str, where: str) -> ConfigError:
    """The error for a YAML key that is not a recipe flag, with the nearest flag as a hint."""
    hint = did_you_mean(key, FIELDS, "see `recipes/mlm.py --help`")
    return ConfigError(f"{where}: unknown key '{key}'. Fix: remove it or rename it ({hint}). "
                       "Launch settings (processes, ZeRO stage, mixed precision) belong in "
                       "accelerate_configs/, not in recipe YAMLs.")


def yaml_args(path: str) -> list[str]:
    """A recipe YAML as command-line arguments, each key checked and type-checked (errors name
    the file)."""
    data = read_yaml_mapping(path)
    for key in data:
        if key not in FIELDS:
            raise unknown_key_error(str(key), path)
    args = to_cli_args(data)
    try:  # type-check the file on its own so the error names the file
        _parse_args(args)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return args


def parse_config(argv: list[str] | None = None) -> MLMConfig:
    """Parse ``[--config FILE] [--key value ...]`` into a validated MLMConfig.

    Precedence: dataclass defaults < YAML file < command line.
    """
    argv = list(argv or [])
    from_yaml: list[str] = []
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise ConfigError("--config needs a path. Fix: --config recipes/configs/default.yaml.")
        from_yaml = yaml_args(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    cli = _keys(argv)
    for key in cli:
        if key not in FIELDS and key != "help":
            raise _unknown_option(f"--{key}")
    cfg = _parse_args(from_yaml + argv)
    return _one_micro_batch(cfg, yaml=set(_keys(from_yaml)), cli=set(cli)).validate()


_MICRO_KEYS = ("per_device_train_batch_size", "per_device_train_tokens")


def _keys(args: list[str]) -> list[str]:
    """The option names of ``args`` (``--key value`` or ``--key=value``), in order."""
    return [arg[2:].split("=")[0] for arg in args if arg.startswith("--")]


def _one_micro_batch(cfg: MLMConfig, *, yaml: set[str], cli: set[str]) -> MLMConfig:
    """The micro-batch stated once: both sizes at one level (the YAML, or the command line) is a
    ConfigError; a batch size on the command line overrides the YAML's token budget (the
    command line wins, as for every key)."""
    for where, keys in (("the command line", cli), ("the --config file", yaml)):
        if all(k in keys for k in _MICRO_KEYS):
            raise ConfigError(
                f"per_device_train_tokens and per_device_train_batch_size both given on {where}: "
                "the micro-batch is stated once. Fix: keep --per_device_train_tokens (tokens per "
                "device) or --per_device_train_batch_size (examples), not both.")
    if "per_device_train_batch_size" in cli and "per_device_train_tokens" in yaml:
        cfg = dataclasses.replace(cfg, per_device_train_tokens=None)
    return cfg


def save_config(cfg: MLMConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    import yaml
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
