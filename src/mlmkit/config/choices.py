"""The value lists of options that several modules check: defined once, here, with no imports.

`config.py` validates flags against them before anything heavy loads; `collator.py` and
`layout.py` validate their arguments against the same lists.
"""

PADDING_MODES = ("longest", "max_length", "packed")  # the collator's layouts
# --padding: "auto" is resolved per model by the start-up probe (probe.resolve_padding).
PADDING_CHOICES = ("auto", *PADDING_MODES)
# Attention backends the collator can lay packed rows out for (see layout.packed_attention).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")
ADDITIVE_MASK_ATTENTION = ("eager", "flex_attention")  # take a float mask added to the scores
# mlmkit's registered attention function (attention.py): chosen by the project for some models,
# never a flag; packed rows reach it, like flash attention, as example boundaries.
PACKED_ATTENTION = "mlmkit_packed"
BOUNDARY_ATTENTION = (*FLASH_ATTENTION, PACKED_ATTENTION)  # packed rows as cu_seq_lens
# --probe_mask_padding: the downstream probe's embeddings with the attention mask (as users run
# the model), without it (as the ablation's unmasked arm trains), or both.
PROBE_MASK_PADDING = ("true", "false", "both")
PROBE_FILE_TYPES = (".csv", ".tsv", ".jsonl")  # --probe_file (data/probe_file.py reads them)
# --report_to -> the trackers Accelerate starts for it.
TRACKERS = {"wandb": ["wandb"], "tensorboard": ["tensorboard"], "trackio": ["trackio"],
            "all": ["wandb", "tensorboard"], "none": []}
REPORT_TO = tuple(TRACKERS)
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "warmup_stable_decay",
)
# --lr_decay_type: the shape of warmup_stable_decay's decay phase (transformers' decay_type)
LR_DECAY_TYPES = ("linear", "cosine", "1-sqrt")
# --optimizer: torch's fused AdamW, or torch-optimi's StableAdamW
OPTIMIZERS = ("adamw", "stable_adamw")
# torch.compile modes (--torch_compile_mode); reduce-overhead and max-autotune add CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHED_COMPILE_MODES = ("reduce-overhead", "max-autotune")
