"""Checkpoints: the train state, atomic save and load, finding the newest complete one, retention.

A run can be killed at any moment and started again with the same command to reach the same
result. What makes that true here:

* **What a checkpoint holds** -- Accelerate's ``save_state`` (model, optimizer, the registered LR
  scheduler, grad scaler, every process's RNG states; under ZeRO DeepSpeed's sharded checkpoint,
  under FSDP2 one shard of the model and optimizer per process, torch.distributed.checkpoint)
  plus ``trainer_state.json`` (:class:`TrainState`: step counters, the data position, the running
  statistics of the log window and of the whole run, the examples and real tokens seen (all
  processes), the step-0 eval and fill-mask check, the W&B
  run id, the launch shape) and a copy of ``config.yaml``. The data position is just ``(epoch, step_in_epoch)``:
  batch order is a pure function of (seed, epoch) and masking of (seed, epoch, example index).
  Under ``--streaming`` every process also saves its own :class:`DataPosition` (its stream's
  window, `streaming.py`), the shape both step sources resume from (:class:`RankState`).
* **Atomic writes** (:func:`save_checkpoint`) -- all processes save into
  ``checkpoints/.tmp-checkpoint-<step>``, files are fsynced, then the main process writes the
  completion marker ``COMPLETE`` (a manifest of every file and its size) and renames the folder
  to ``checkpoints/checkpoint-<step>``. A folder without the marker, or whose files are missing
  or of another size than the manifest says, is never loaded (:func:`validate_checkpoint`).
  Several nodes must share ``output_dir`` (one filesystem), as every rank writes into it.
* **Retention** (:func:`checkpoints_to_delete`) -- ``save_total_limit`` keeps the newest K
  complete checkpoints, never fewer than one.

The run-folder policy (fresh start, resume or refuse) is in `rundir.py`; pre-emption signals in
`preemption.py`; the final HF export in `loading.export_hf_model`.

Layout of one checkpoint (DDP or one process; under DeepSpeed ``model.safetensors`` and
``optimizer.bin`` are replaced by DeepSpeed's ``pytorch_model/`` folder and ``latest``, under
FSDP2 by ``pytorch_model_fsdp_0/`` and ``optimizer_0/``, each holding ``__<rank>_0.distcp`` shards
and a ``.metadata`` file; the marker lists them all)::

    <output_dir>/checkpoints/checkpoint-<step>/
        model.safetensors  optimizer.bin  custom_checkpoint_0.pkl (scheduler)
        random_states_<rank>.pkl (one per process)  [scaler.pt]
        trainer_state.json  config.yaml  COMPLETE
        [data_state_<rank>.json (one per process: --streaming / --mixture_files)]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlmkit.config.errors import ConfigError
from mlmkit.config.fields import MLMConfig
from mlmkit.config.fileio import fsync_dir, fsync_tree, write_json_atomic
from mlmkit.config.parse import save_config
from mlmkit.data.position import DataPosition
from mlmkit.train.metrics import RunningStats, mixture_summary
from mlmkit.train.runfolder import (  # noqa: F401
    CHECKPOINT_PREFIX,
    CHECKPOINTS,
    MARKER,
    RANK_STATE_PREFIX,
    STATE_FILE,
    TMP_PREFIX,
    RunFolder,
)
from mlmkit.train.runfolder import CONFIG as CONFIG_FILE

FORMAT = 2
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass
class TrainState:
    """The loop's counters: saved in every checkpoint, restored on resume (JSON, exact floats)."""
    step: int = 0                      # optimizer steps done
    epoch: int = 0                     # data position (`DataPosition`): the epoch being read ...
    step_in_epoch: int = 0             # ... and the next global batch of it
    window: RunningStats = field(default_factory=RunningStats)  # since the last log line
    total: RunningStats = field(default_factory=RunningStats)   # the whole run
    examples_seen: int = 0             # examples trained on, all processes (train/examples_seen)
    tokens_seen: int = 0               # real tokens trained on, all processes (train/tokens_seen)
    first_eval: dict[str, float] = field(default_factory=dict)  # the step-0 eval (first/eval/*)
    fill_mask_before: list[dict] = field(default_factory=list)  # the initial model's fill-mask
    wandb_run_id: str | None = None    # a resumed run continues the same W&B run
    launch: dict[str, Any] = field(default_factory=dict)  # num_processes, distributed_type
    format: int = FORMAT

    def advance(self, step) -> None:
        """One optimizer step done on ``step`` (a `steps.PreparedStep`): the data position
        moves past it."""
        self.step, self.epoch, self.step_in_epoch = (self.step + 1, step.position.epoch,
                                                     step.position.step)

    def position(self) -> DataPosition:
        """The data position saved here (the run's, for map-style steps)."""
        return DataPosition(self.epoch, self.step_in_epoch, done=self.step)

    def take_window(self) -> RunningStats:
        """The log window's statistics; a new window starts."""
        window, self.window = self.window, RunningStats()
        return window

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("window", "total"):
            if isinstance(values.get(key), dict):
                values[key] = RunningStats(**values[key])
        return cls(**values)


# ------------------------------------------------------------------------------ finding checkpoints
def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``checkpoints/checkpoint-<step>`` folder, complete or not, oldest first."""
    root = RunFolder(output_dir).checkpoints
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None)


def validate_checkpoint(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a complete checkpoint, else why it is not (for the warning)."""
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    try:
        manifest = json.loads((path / MARKER).read_text())
        files = dict(manifest["files"])
    except FileNotFoundError:
        return f"no completion marker ({MARKER}): its save did not finish"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable completion marker ({MARKER})"
    for rel, size in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != size:
            return f"{rel} is truncated or changed ({file.stat().st_size} of {size} bytes)"
    if STATE_FILE not in files:
        return f"{STATE_FILE} is missing"
    try:
        TrainState.from_dict(json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return f"{STATE_FILE} is unreadable"
    return None


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint of ``output_dir``, and a warning per newer broken one."""
    warnings = []
    for step, path in reversed(list_checkpoints(output_dir)):
        reason = validate_checkpoint(path)
        if reason is None:
            return path, warnings
        warnings.append(f"skipping checkpoint {path}: {reason}; using the previous one.")
    return None, warnings


def read_state(path: str | os.PathLike) -> TrainState:
    return TrainState.from_dict(json.loads((Path(path) / STATE_FILE).read_text()))


def checkpoints_to_delete(checkpoints: list[tuple[int, Path, bool]],
                          limit: int | None) -> list[Path]:
    """Retention: from ``(step, path, complete)`` entries, the folders to delete.

    Keeps the ``limit`` newest complete checkpoints (at least one: the newest complete checkpoint
    is never deleted). Broken folders older than the newest complete one are deleted too; newer
    broken ones are left for inspection (a later save of the same step replaces them).
    """
    if not limit:
        return []
    complete = sorted((s, p) for s, p, ok in checkpoints if ok)
    if not complete:
        return []
    keep = {p for _, p in complete[-max(limit, 1):]}
    newest = complete[-1][0]
    return [p for s, p, ok in sorted(checkpoints)
            if (ok and p not in keep) or (not ok and s < newest)]


# ------------------------------------------------------------------------------ save / load
def rank_state_file(folder: Path, process_index: int) -> Path:
    return Path(folder) / f"{RANK_STATE_PREFIX}{process_index}.json"


def read_rank_state(folder: Path | None, process_index: int) -> dict | None:
    """This process's own part of a checkpoint (see `save_checkpoint`), or None."""
    if folder is None:
        return None
    path = rank_state_file(folder, process_index)
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class RankState:
    """What only this process knows of the data: its `DataPosition` after the newest step (under
    ``--streaming`` its own stream's) and its real tokens per ``--mixture_files`` source; saved per
    process (``data_state_<rank>.json``) when the run has either."""
    kept: bool                         # --streaming or --mixture_files: saved in checkpoints
    source_tokens: list[int]
    position: DataPosition | None = None

    @classmethod
    def load(cls, cfg: MLMConfig, checkpoint: Path | None, process_index: int) -> "RankState":
        saved = read_rank_state(checkpoint, process_index) or {}
        position = saved.get("position")
        state = cls(bool(cfg.streaming or cfg.mixture_files),
                    saved.get("source_tokens") or [0] * len(cfg.mixture_files),
                    DataPosition.from_dict(position) if position else None)
        if cfg.streaming and checkpoint is not None and state.position is None:
            raise ConfigError(f"checkpoint {checkpoint} holds no stream position of process "
                              f"{process_index} ({RANK_STATE_PREFIX}{process_index}.json missing, "
                              "or written by an older mlmkit). Fix: resume from another "
                              "checkpoint (--resume_from_checkpoint), or start afresh with "
                              "--overwrite_output_dir true.")
        return state

    def start(self, state: TrainState) -> DataPosition:
        """Where this process's steps resume: its own position, else the run's (``state``)."""
        return self.position or state.position()

    def update(self, step) -> None:
        """Advance past ``step`` (a `steps.PreparedStep`)."""
        if step.source_tokens is not None:
            self.source_tokens = [a + b for a, b in zip(self.source_tokens, step.source_tokens)]
        self.position = step.position

    def to_dict(self) -> dict | None:
        if not self.kept:
            return None
        return {"position": self.position.to_dict() if self.position else None,
                "source_tokens": self.source_tokens}

    def summary(self, cfg: MLMConfig, accelerator) -> dict:
        """The summary's ``data/*`` entries of a mixture: tokens per source, all processes
        (a collective: every process calls it)."""
        if not cfg.mixture_files:
            return {}
        import torch
        counts = accelerator.reduce(torch.tensor(self.source_tokens, device=accelerator.device),
                                    reduction="sum").tolist()
        return mixture_summary(cfg.mixture_files, cfg.mixture_weights, counts)


def save_checkpoint(accelerator, cfg: MLMConfig, state: TrainState,
                    rank_state: dict | None = None) -> Path:
    """Write ``checkpoints/checkpoint-<state.step>`` atomically; every process must call it.

    ``rank_state``: what only this process knows (its stream position under --streaming, its
    per-source token counts with --mixture_files), saved as ``data_state_<rank>.json``."""
    folder = RunFolder(cfg.output_dir)
    root, final = folder.checkpoints, folder.checkpoint(state.step)
    tmp = folder.checkpoint(state.step, tmp=True)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    # Accelerate warns about every tied weight it de-duplicates for safetensors (the MLM head is
    # tied to the embeddings by design, and load_state re-ties them): not news, so kept quiet.
    quiet = logging.getLogger("accelerate.utils.other")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        accelerator.save_state(str(tmp))  # every rank: its RNG states; under ZeRO/FSDP its shards
    finally:
        quiet.setLevel(level)
    if rank_state is not None:
        write_json_atomic(rank_state_file(tmp, accelerator.process_index), rank_state)
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, state.to_dict())
        save_config(cfg, tmp / CONFIG_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:  # one per node: flush what this node wrote
        fsync_tree(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_marker(tmp, state.step)
        if final.exists():  # an older save of this step (e.g. a broken one that was skipped)
            trash = root / f"{TMP_PREFIX}old-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(root)
        entries = [(s, p, validate_checkpoint(p) is None)
                   for s, p in list_checkpoints(cfg.output_dir)]
        for old in checkpoints_to_delete(entries, cfg.save_total_limit):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_marker(folder: Path, step: int) -> None:
    """The completion marker: written last, it lists every file of the folder with its size."""
    files = {str(p.relative_to(folder)): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
    write_json_atomic(folder / MARKER, {"step": step, "files": files})
    fsync_dir(folder)


def load_checkpoint(accelerator, path: Path) -> None:
    """Restore model, optimizer, scheduler, scaler and every process's RNG; every process calls.

    Call it last before the training loop: the RNG states are those of the moment of the save.
    """
    try:
        accelerator.load_state(str(path))
    except Exception as err:
        raise ConfigError(f"checkpoint {path} could not be loaded ({type(err).__name__}: {err})."
                          " Fix: delete it to resume from the previous one, or pass "
                          "--resume_from_checkpoint with another checkpoint folder.") from err
