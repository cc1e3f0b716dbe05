"""The run folder's layout: every name a run writes under ``--output_dir``, in one place.

Code that reads or writes a run folder (the recipe, checkpoints, the resume policy, the run lock,
metrics, the ablation runner and its report) takes its names from here; docs/design.md's "The run
folder" draws the same tree.

    <output_dir>/
      run.lock          the live run's lock (runlock.py)
      config.yaml       the resolved config
      metrics.jsonl     one JSON object per log line / eval
      checkpoints/checkpoint-<step>/   (trainer_state.json, config.yaml, COMPLETE,
                        data_state_<rank>.json, Accelerate's files); .tmp-* while saving
      model/            the trained model (HF format; model.tmp while written)
      model_avg/        --average_checkpoints: the averaged weights (HF format; model_avg.tmp)
      model.initial/    the initial model for the fill-mask check (deleted once tried)
      summary.json      written last: a run with it is finished
      wandb/            W&B's files
"""

from __future__ import annotations

from pathlib import Path

LOCK = "run.lock"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL = "model"
MODEL_INITIAL = "model.initial"
MODEL_AVG = "model_avg"
CHECKPOINTS = "checkpoints"
WANDB = "wandb"
TMP_SUFFIX = ".tmp"              # a folder being written (model.tmp), renamed when complete

# Inside checkpoints/
CHECKPOINT_PREFIX = "checkpoint-"  # + <step>
TMP_PREFIX = ".tmp-"             # a save in progress (removed at start-up if a kill left one)
MARKER = "COMPLETE"              # written last; JSON manifest {"step", "files": {path: bytes}}
STATE_FILE = "trainer_state.json"
RANK_STATE_PREFIX = "data_state_"  # + <rank>.json: one process's data position

# What --overwrite_output_dir deletes (config.yaml is rewritten; tracker folders are left alone).
RUN_OUTPUTS = (CHECKPOINTS, METRICS, SUMMARY, MODEL, MODEL + TMP_SUFFIX, MODEL_INITIAL,
               MODEL_INITIAL + TMP_SUFFIX, MODEL_AVG, MODEL_AVG + TMP_SUFFIX, CONFIG)
# Folders inside a run that are never runs themselves (W&B's files/ holds a config.yaml).
NOT_RUNS = frozenset({WANDB, MODEL, MODEL + TMP_SUFFIX, MODEL_INITIAL, MODEL_INITIAL + TMP_SUFFIX,
                      MODEL_AVG, MODEL_AVG + TMP_SUFFIX, "tensorboard", CHECKPOINTS,
                      "__pycache__"})


def _path(name: str) -> property:
    return property(lambda self: self.root / name, doc=f"``<output_dir>/{name}``")


class RunFolder:
    """The paths of one run folder."""

    def __init__(self, root) -> None:
        self.root = Path(root)

    lock = _path(LOCK)
    config = _path(CONFIG)
    metrics = _path(METRICS)
    summary = _path(SUMMARY)
    model = _path(MODEL)
    model_initial = _path(MODEL_INITIAL)
    model_avg = _path(MODEL_AVG)
    checkpoints = _path(CHECKPOINTS)

    def checkpoint(self, step: int, *, tmp: bool = False) -> Path:
        """``checkpoints/checkpoint-<step>`` (``tmp``: the folder it is saved into first)."""
        return self.checkpoints / f"{TMP_PREFIX if tmp else ''}{CHECKPOINT_PREFIX}{step}"
