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

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlmkit.config.choices import (
    ATTN_IMPLEMENTATIONS,
    COMPILE_MODES,
    LR_DECAY_TYPES,
    OPTIMIZERS,
    PADDING_CHOICES,
    PROBE_MASK_PADDING,
    REPORT_TO,
    SCHEDULERS,
)
from mlmkit.config.configio import config_differences

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
    config_overrides: str | None = field(default=None, metadata=_meta(
        "Changes to the model's config before it is built, for every model source: "
        "comma-separated key=value, nested keys with dots, e.g. max_position_embeddings=8192,"
        "rope_parameters.full_attention.rope_theta=160000 (a second phase at a longer "
        "--max_seq_length)."))
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
    mlm_probability_final: float | None = field(default=None, metadata=_meta(
        "Move the training masking rate linearly from --mlm_probability at the first step to "
        "this at the last (train/mlm_probability); the eval rate stays fixed."))
    mask_replace_prob: float = field(default=0.8, metadata=_meta(
        "Of the masked tokens, the fraction replaced by the mask token."))
    random_replace_prob: float = field(default=0.1, metadata=_meta(
        "Of the masked tokens, the fraction replaced by a random token (the rest stay as they "
        "are)."))
    whole_word_mask: bool = field(default=False, metadata=_meta(
        "Mask whole words: every piece of a word together. Words from the tokenizer's scheme: "
        "WordPiece '##', byte-level BPE 'Ġ', SentencePiece '▁' (masking.word_start_scheme)."))
    span_masking: bool = field(default=False, metadata=_meta(
        "Mask contiguous spans of whole words (SpanBERT): span lengths geometric (p=0.2, at "
        "most 10 words), drawn until --mlm_probability of each example's tokens are targets."))
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
    seq_len_warmup_steps: int = field(default=0, metadata=_meta(
        "Grow the training length linearly from --seq_len_warmup_start to --max_seq_length over "
        "the first N optimizer steps (multiples of 64), cropping each example to its first "
        "tokens, with proportionally more rows per step (train/seq_length). 0: off."))
    seq_len_warmup_start: int | None = field(default=None, metadata=_meta(
        "The training length at the first step of --seq_len_warmup_steps."))
    batch_warmup_steps: int = field(default=0, metadata=_meta(
        "Grow the batch linearly over the first N optimizer steps: step k of them takes k/N of "
        "the examples (rows, tokens) of a full step, at least one per micro-batch "
        "(train/batch_fraction). 0: off."))
    optimizer: str = field(default="adamw", metadata=_meta(
        f"One of {OPTIMIZERS}: torch's fused AdamW, or torch-optimi's StableAdamW (AdamW with "
        "per-tensor update clipping, as ModernBERT trains; not under DeepSpeed ZeRO). Both take "
        "--weight_decay and --adam_*."))
    learning_rate: float = field(default=5e-5, metadata=_meta("Peak learning rate."))
    weight_decay: float = field(default=0.01, metadata=_meta(
        "Decoupled weight decay (not on biases and LayerNorm weights)."))
    adam_beta1: float = field(default=0.9, metadata=_meta("Adam beta1."))
    adam_beta2: float = field(default=0.999, metadata=_meta("Adam beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_meta("Adam epsilon."))
    max_grad_norm: float = field(default=1.0, metadata=_meta(
        "Clip the gradient norm to this; 0 disables clipping (the norm is still computed, "
        "logged and checked)."))
    skip_nonfinite_steps: bool = field(default=False, metadata=_meta(
        "Skip an optimizer step whose loss or gradient norm is not finite (weights, moments and "
        "the step count untouched) and count it (train/skipped_steps) instead of stopping the "
        "run; --optimizer adamw, not under DeepSpeed or fp16. May be added on resume.",
        bookkeeping=True))
    lr_scheduler_type: str = field(default="linear", metadata=_meta(f"One of {SCHEDULERS}."))
    num_warmup_steps: int = field(default=0, metadata=_meta(
        "Optimizer steps of linear warmup; 0: --warmup_ratio decides."))
    warmup_ratio: float = field(default=0.0, metadata=_meta("Used when num_warmup_steps is 0."))
    decay_ratio: float = field(default=0.1, metadata=_meta(
        "warmup_stable_decay only: fraction of the training steps in the final decay phase (the "
        "rest after warmup is stable at the peak rate)."))
    lr_decay_type: str | None = field(default=None, metadata=_meta(
        f"warmup_stable_decay only: the decay phase's shape, one of {LR_DECAY_TYPES} (1-sqrt: "
        "lr = peak x (1 - sqrt(progress))). Unset: cosine."))
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
        "mlmkit.model.flops).", bookkeeping=True))
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
    probe_file: list[str] = field(default_factory=list, metadata=_meta(
        "Labelled texts (.csv, .tsv or .jsonl) for a downstream probe at every eval: a "
        "logistic regression on the model's mean-pooled embeddings, cross-validated "
        "(eval/probe_accuracy; docs/downstream.md). Several files: one probe each, its metrics "
        "named by the file's stem (eval/probe_accuracy/<stem>).", bookkeeping=True))
    probe_text_column: str = field(default="text", metadata=_meta(
        "--probe_file's column holding the text.", bookkeeping=True))
    probe_label_column: str = field(default="label", metadata=_meta(
        "--probe_file's column holding the label (any values: each distinct one a class).",
        bookkeeping=True))
    probe_folds: int = field(default=5, metadata=_meta(
        "Stratified cross-validation folds of the probe (every label needs at least this many "
        "examples).", bookkeeping=True))
    probe_mask_padding: str = field(default="true", metadata=_meta(
        f"One of {PROBE_MASK_PADDING}: embed the probe's texts with the attention mask (true: "
        "eval/probe_accuracy, as users run the model), without it (false: "
        "eval/probe_accuracy_unmasked, as --mask_padding false trains), or both.",
        bookkeeping=True))
    pseudo_perplexity_examples: int = field(default=0, metadata=_meta(
        "At every eval, the pseudo-perplexity of the first N validation examples "
        "(eval/pseudo_perplexity: each token masked in turn; no eval masks). 0: off.",
        bookkeeping=True))
    checkpointing_steps: int | None = field(default=None, metadata=_meta(
        "Save a resumable checkpoint every N optimizer steps.", bookkeeping=True))
    save_total_limit: int | None = field(default=None, metadata=_meta(
        "Keep only the newest N checkpoints. Default: all.", bookkeeping=True))
    average_checkpoints: int | None = field(default=None, metadata=_meta(
        "At the end, also write model_avg/: the mean of the final weights and the newest K-1 "
        "checkpoints saved before the last step (K >= 2; needs --checkpointing_steps), "
        "evaluated beside model/ (eval/avg_loss)."))
    resume_from_checkpoint: str = field(default="auto", metadata=_meta(
        "auto (newest complete checkpoint), a path, or none.", bookkeeping=True, per_run=True))
    report_to: str = field(default="wandb", metadata=_meta(
        f"One of {REPORT_TO}.", bookkeeping=True))
    run_name: str | None = field(default=None, metadata=_meta(
        "The tracker's run name. Default: the output folder's name.", bookkeeping=True,
        per_run=True))
    wandb_project: str = field(default="mlmkit", metadata=_meta(
        "The tracker's project.", bookkeeping=True))
    wandb_group: str | None = field(default=None, metadata=_meta(
        "The tracker's run group.", bookkeeping=True))
    wandb_tags: list[str] = field(default_factory=list, metadata=_meta(
        "The W&B run's tags; padding:<mode> and model:<type> are added.", bookkeeping=True,
        per_run=True))
    progress_bar: bool = field(default=True, metadata=_meta(
        "Show a tqdm progress bar (main process).", bookkeeping=True))
    fill_mask_check: bool = field(default=True, metadata=_meta(
        "After training, fill one masked word in a few validation sentences with the exported "
        "model/ and the initial model (top-5 in the log and summary.json; mlmkit.train.fill_mask).",
        bookkeeping=True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(MLMConfig))
BOOKKEEPING_KEYS = frozenset(f.name for f in dataclasses.fields(MLMConfig)
                             if f.metadata.get("bookkeeping"))
PER_RUN_KEYS = frozenset(f.name for f in dataclasses.fields(MLMConfig) if f.metadata.get("per_run"))


def differences(saved: dict, current: dict) -> list[str]:
    """Settings that change what a run computes and differ between ``saved`` and ``current``
    (bookkeeping keys are free to differ; a key an older mlmkit did not write is its default)."""
    return config_differences(saved, current, defaults=MLMConfig().to_dict(),
                              ignore=BOOKKEEPING_KEYS)
