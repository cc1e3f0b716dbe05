"""The run folder's policy: start fresh, resume, or refuse -- decided before any model loads.

* :func:`check_output_dir` (every process, reads only): a folder holding a finished run
  (summary.json) or a run with different settings (config.yaml, compared on the keys that change
  what a run computes) is never silently reused; ``--resume_from_checkpoint auto`` picks the
  newest complete checkpoint, skipping broken ones with a warning.
* :func:`prepare_output_dir` (main process): ``--overwrite_output_dir`` wipes the old outputs,
  stale temporaries of a killed save go, metrics.jsonl is cut back to the checkpoint's step
  (:func:`truncate_metrics`) so a resumed run's log equals an uninterrupted one's, and the
  resolved config.yaml is written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mlmkit.config.configio import read_yaml_mapping
from mlmkit.config.errors import ConfigError
from mlmkit.config.fields import MLMConfig, differences
from mlmkit.config.fileio import atomic_write_text, read_jsonl
from mlmkit.config.parse import save_config
from mlmkit.train.checkpoint import (
    TrainState,
    newest_complete_checkpoint,
    read_state,
    validate_checkpoint,
)
from mlmkit.train.runfolder import CONFIG, RUN_OUTPUTS, TMP_PREFIX, RunFolder
from mlmkit.train.runlock import check_output_path


@dataclass
class ResumePlan:
    """What :func:`check_output_dir` decided: resume from ``checkpoint`` (or start fresh)."""
    checkpoint: Path | None = None
    state: TrainState | None = None
    warnings: list[str] = field(default_factory=list)
    wipe: bool = False                 # --overwrite_output_dir: delete the old run's outputs


def _read_config(path: Path) -> dict:
    try:
        return read_yaml_mapping(path, what="saved config")
    except ConfigError as err:
        raise ConfigError(f"{err} Fix: delete the folder or pass --overwrite_output_dir true.") from err


def check_output_dir(cfg: MLMConfig) -> ResumePlan:
    """Decide, before any model loads, whether this run starts fresh or resumes, and from where.

    Raises ConfigError (naming the fix) when ``output_dir`` holds a finished run, a run with
    different settings, or an unfinished run that ``--resume_from_checkpoint none`` would clobber.
    Reads only; :func:`prepare_output_dir` (main process) makes the changes. An output_dir that
    is a file, or cannot be created, is a ConfigError too (`runlock.check_output_path`).
    """
    check_output_path(cfg.output_dir)
    out = RunFolder(cfg.output_dir)
    fresh = ("pass a new --output_dir, or --overwrite_output_dir true to start fresh in it "
             "(deletes its checkpoints/, metrics.jsonl, summary.json and model/)")
    explicit = cfg.resume_from_checkpoint not in ("auto", "none")
    plan = ResumePlan(wipe=cfg.overwrite_output_dir)
    if cfg.overwrite_output_dir:
        if explicit and out.checkpoints.resolve() in Path(
                cfg.resume_from_checkpoint).resolve().parents:
            raise ConfigError(f"resume_from_checkpoint={cfg.resume_from_checkpoint!r} lies inside "
                              "output_dir, which --overwrite_output_dir true would delete. Fix: "
                              "drop one of the two flags.")
    else:
        if out.summary.exists():
            raise ConfigError(f"output_dir={cfg.output_dir!r} holds a finished run (summary.json)."
                              f" Fix: {fresh}.")
        if out.config.exists():
            diffs = differences(_read_config(out.config), cfg.to_dict())
            if diffs:
                raise ConfigError(
                    f"output_dir={cfg.output_dir!r} holds a run with different settings "
                    f"({'; '.join(diffs[:5])}{'; ...' if len(diffs) > 5 else ''}). Fix: rerun with "
                    f"its settings (see {out.config}) to resume it, or {fresh}.")
    if explicit:
        path = Path(cfg.resume_from_checkpoint)
        reason = validate_checkpoint(path)
        if reason:
            raise ConfigError(f"resume_from_checkpoint={str(path)!r} is not a complete checkpoint "
                              f"({reason}). Fix: pass another checkpoint-<step> folder, or auto.")
        if (path / CONFIG).exists():
            diffs = differences(_read_config(path / CONFIG), cfg.to_dict())
            if diffs:
                raise ConfigError(f"resume_from_checkpoint={str(path)!r} was written with different"
                                  f" settings ({'; '.join(diffs[:5])}). Fix: rerun with the "
                                  f"settings of {path / CONFIG}, or drop the flag.")
        plan.checkpoint = path
    elif not cfg.overwrite_output_dir:
        path, plan.warnings = newest_complete_checkpoint(out.root)
        if path is not None and cfg.resume_from_checkpoint == "none":
            raise ConfigError(f"output_dir={cfg.output_dir!r} holds checkpoints of an unfinished "
                              f"run (newest: {path.name}) and resume_from_checkpoint=none. Fix: "
                              f"--resume_from_checkpoint auto to continue it, or {fresh}.")
        plan.checkpoint = path
    if plan.checkpoint is not None:
        plan.state = read_state(plan.checkpoint)
    return plan


def prepare_output_dir(cfg: MLMConfig, plan: ResumePlan) -> None:
    """Main process only: wipe (--overwrite_output_dir), clean stale temporaries, cut
    metrics.jsonl back to the checkpoint's step (or remove it when starting fresh), write config."""
    folder = RunFolder(cfg.output_dir)
    out = folder.root
    out.mkdir(parents=True, exist_ok=True)
    if plan.wipe:
        for name in RUN_OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    if folder.checkpoints.is_dir():
        for stale in folder.checkpoints.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
    folder.summary.unlink(missing_ok=True)
    if plan.checkpoint is None:
        folder.metrics.unlink(missing_ok=True)
    else:
        truncate_metrics(folder.metrics, plan.state.step)
    save_config(cfg, folder.config)


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Drop metrics.jsonl lines logged after ``step`` (and a line cut by a kill), atomically: the
    resumed run appends from there, so its log equals an uninterrupted run's."""
    path = Path(path)
    if path.exists():
        keep = [r for r in read_jsonl(path) if isinstance(r, dict) and r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
