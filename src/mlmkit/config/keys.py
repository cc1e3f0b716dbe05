"""The names of every logged metric and summary.json key, W&B and metrics.jsonl alike: the one
source of truth (do not rename them). Defined at the bottom so that every stage that reports one
(the probe's padding decision, the data's counts, the run's metrics) names it from here;
`mlmkit.train.tracking` re-exports them all.
"""

__all__ = ["TRAIN_LOSS", "TRAIN_LR", "TRAIN_GRAD_NORM", "TRAIN_TOKENS_PER_S",
           "TRAIN_REAL_TOKENS_PER_S", "TRAIN_PAD_FRACTION", "TRAIN_MASKED_TOKENS", "TRAIN_TFLOPS",
           "TRAIN_MFU", "TRAIN_DATA_WAIT_FRACTION", "TRAIN_GPU_BUSY_FRACTION",
           "TRAIN_COMPILE_SECONDS", "TRAIN_MLM_PROBABILITY", "TRAIN_SEQ_LENGTH",
           "TRAIN_BATCH_FRACTION", "TRAIN_RUNTIME", "EVAL_LOSS", "EVAL_PERPLEXITY",
           "EVAL_PAD_SENSITIVITY", "EVAL_LOSS_UNMASKED", "EVAL_PROBE_ACCURACY",
           "EVAL_PROBE_ACCURACY_STD", "EVAL_PROBE_ACCURACY_UNMASKED",
           "EVAL_PROBE_ACCURACY_UNMASKED_STD", "EVAL_PSEUDO_PERPLEXITY",
           "FIRST", "FIRST_EVAL_PROBE_ACCURACY", "FIRST_EVAL_PROBE_ACCURACY_UNMASKED",
           "FIRST_EVAL_PSEUDO_PERPLEXITY", "probe_key", "SYS_PEAK_MEM_GB", "STEP", "EPOCH",
           "FIRST_EVAL_LOSS", "FIRST_EVAL_PERPLEXITY", "TRAIN_PEAK_TFLOPS", "TRAIN_EXAMPLES",
           "TRAIN_EXAMPLES_SEEN", "TRAIN_TOKENS_SEEN", "NUM_PROCESSES", "DATA_MIXTURE",
           "DATA_SOURCE_TOKENS", "DATA_SOURCE_SHARE",
           "DATA_REPAIRED_LINES", "PADDING", "FILL_MASK", "TRACKERS_RAN", "EVAL_AVG_LOSS",
           "EVAL_AVG_PERPLEXITY", "AVERAGED_CHECKPOINTS", "TRAIN_SKIPPED_STEPS"]

# --- metric names (W&B and metrics.jsonl alike) ---------------------------------------------------
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_TOKENS_PER_S = "train/tokens_per_s"            # all positions computed, padding included
TRAIN_REAL_TOKENS_PER_S = "train/real_tokens_per_s"  # non-padding positions only
TRAIN_PAD_FRACTION = "train/pad_fraction"
TRAIN_MASKED_TOKENS = "train/masked_tokens"
TRAIN_TFLOPS = "train/tflops"                        # model TFLOP/s per device (flops.py)
TRAIN_MFU = "train/mfu"                              # train/tflops / the device's dense peak
TRAIN_DATA_WAIT_FRACTION = "train/data_wait_fraction"  # share of step time spent waiting for data
TRAIN_GPU_BUSY_FRACTION = "train/gpu_busy_fraction"  # device time / wall time (metrics.BusyClock;
#                                                     absent on CPU and before it is measured)
TRAIN_COMPILE_SECONDS = "train/compile_seconds"  # --torch_compile: the warm-up (compile, capture)
TRAIN_SKIPPED_STEPS = "train/skipped_steps"  # --skip_nonfinite_steps: in the log window; in
#                                              summary.json, the whole run's
TRAIN_MLM_PROBABILITY = "train/mlm_probability"  # --mlm_probability_final: the newest step's rate
TRAIN_SEQ_LENGTH = "train/seq_length"          # --seq_len_warmup_steps: the newest step's length
TRAIN_BATCH_FRACTION = "train/batch_fraction"  # --batch_warmup_steps: its share of a full step
TRAIN_RUNTIME = "train/runtime_s"
TRAIN_EXAMPLES_SEEN = "train/examples_seen"  # examples trained on so far, all processes (x-axis)
TRAIN_TOKENS_SEEN = "train/tokens_seen"      # real tokens trained on so far, all processes (x-axis)
EVAL_LOSS = "eval/loss"
EVAL_PERPLEXITY = "eval/perplexity"
EVAL_PAD_SENSITIVITY = "eval/pad_sensitivity"
EVAL_LOSS_UNMASKED = "eval/loss_unmasked"
# --probe_file (train/downstream.py): a logistic-regression probe on mean-pooled embeddings,
# the mean and std over the cross-validation folds; masked: as users run the model (attention
# mask), unmasked: as the ablation's unmasked arm trains (padding attended)
EVAL_PROBE_ACCURACY = "eval/probe_accuracy"
EVAL_PROBE_ACCURACY_STD = "eval/probe_accuracy_std"
EVAL_PROBE_ACCURACY_UNMASKED = "eval/probe_accuracy_unmasked"
EVAL_PROBE_ACCURACY_UNMASKED_STD = "eval/probe_accuracy_unmasked_std"
EVAL_PSEUDO_PERPLEXITY = "eval/pseudo_perplexity"    # --pseudo_perplexity_examples: no eval masks


def probe_key(key: str, probe: str | None = None) -> str:
    """The name of a probe metric (`EVAL_PROBE_ACCURACY` and its kin) for one of several
    ``--probe_file`` files: ``<key>/<probe>``, ``probe`` the file's stem (e.g.
    ``eval/probe_accuracy/movies``); a run with one probe file logs the key itself."""
    return key if probe is None else f"{key}/{probe}"


EVAL_AVG_LOSS = "eval/avg_loss"                      # model_avg/ (--average_checkpoints), same
EVAL_AVG_PERPLEXITY = "eval/avg_perplexity"          # eval masks as eval/loss, at the last step
SYS_PEAK_MEM_GB = "sys/peak_mem_gb"
STEP = "step"
EPOCH = "epoch"

# --- summary.json keys beyond the metrics above ----------------------------------------------------
FIRST = "first/"                                     # + a metric's name: its step-0 value
FIRST_EVAL_LOSS = FIRST + EVAL_LOSS                  # the step-0 eval
FIRST_EVAL_PERPLEXITY = FIRST + EVAL_PERPLEXITY
FIRST_EVAL_PROBE_ACCURACY = FIRST + EVAL_PROBE_ACCURACY  # (when measured at step 0)
FIRST_EVAL_PROBE_ACCURACY_UNMASKED = FIRST + EVAL_PROBE_ACCURACY_UNMASKED
FIRST_EVAL_PSEUDO_PERPLEXITY = FIRST + EVAL_PSEUDO_PERPLEXITY
TRAIN_PEAK_TFLOPS = "train/peak_tflops"              # the peak train/mfu is against (None: unknown)
TRAIN_EXAMPLES = "train/examples"                    # map-style training examples (None: stream)
NUM_PROCESSES = "num_processes"
DATA_MIXTURE = "data/mixture"                        # --mixture_files: source -> weight
DATA_SOURCE_TOKENS = "data/source_tokens"            # source -> real tokens trained, all processes
DATA_SOURCE_SHARE = "data/source_share"              # source -> share of those tokens
DATA_REPAIRED_LINES = "data/repaired_lines"          # lines with bytes that were not UTF-8
PADDING = "padding"                                  # what --padding resolved to
FILL_MASK = "fill_mask"                              # the fill-mask check (fill_mask.py)
AVERAGED_CHECKPOINTS = "averaged_checkpoints"        # what model_avg/ averages: final + steps
TRACKERS_RAN = "trackers"                            # tracker -> how it ran (MetricsLog.status)
