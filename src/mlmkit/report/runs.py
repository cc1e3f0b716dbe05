"""Reading an ablation's run folders for the report: each run's config.yaml, metrics.jsonl and
summary.json, its arm and seed (from the runner's plan, ablation.json, or the run's own tags and
folder names). Never raises on a bad folder: it becomes a `RunResult` with a status and a note."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlmkit.config.fileio import read_jsonl
from mlmkit.train.runfolder import CONFIG, METRICS, NOT_RUNS, SUMMARY
from mlmkit.train.tracking import EPOCH, EVAL_LOSS, STEP, TRAIN_LOSS

PLAN_FILE = "ablation.json"  # written by recipes/ablate_padding.py
SEED_TAG = re.compile(r"^seed(\d+)$")


@dataclass
class RunResult:
    path: Path                      # the run folder
    arm: str
    seed: int | None
    status: str                     # finished | unfinished | missing | unreadable
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    note: str = ""

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def final(self, name: str) -> float | None:
        value = self.summary.get(name)
        return float(value) if isinstance(value, (int, float)) else None

    def eval_curve(self) -> list[tuple[int, float]]:
        return [(int(r[STEP]), float(r[EVAL_LOSS])) for r in self.records
                if EVAL_LOSS in r and STEP in r]

    def fill_mask(self) -> list[dict]:
        """summary.json's fill-mask check (`fill_mask.combine`), [] when the run has none."""
        entries = self.summary.get("fill_mask")
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []

    def mean_fill_mask_rank(self, when: str = "after") -> float | None:
        """Mean rank of the masked word over the check's sentences (1 = the model's first
        choice), ``when`` "after" or "before" training."""
        ranks = [e.get(f"rank_{when}") for e in self.fill_mask()]
        ranks = [r for r in ranks if isinstance(r, (int, float))]
        return sum(ranks) / len(ranks) if ranks else None

    def epochs_per_step(self) -> float | None:
        """Epochs per optimizer step, from the newest train record (epoch = step /
        steps_per_epoch; the newest, because a batch warm-up's first steps hold less data)."""
        for r in reversed(self.records):
            if TRAIN_LOSS in r and r.get(EPOCH) and r.get(STEP):
                return float(r[EPOCH]) / float(r[STEP])
        return None

    def train_mean(self, name: str, how: str = "median") -> float | None:
        """From summary.json when the recipe puts it there, else over the logged windows."""
        if self.final(name) is not None:
            return self.final(name)
        values = sorted(float(r[name]) for r in self.records if TRAIN_LOSS in r and name in r)
        if not values:
            return None
        if how == "mean":
            return sum(values) / len(values)
        mid = len(values) // 2  # the median shrugs off the first (warm-up) window
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _seed_from(path: Path, config: dict) -> int | None:
    if isinstance(config.get("seed"), int):
        return config["seed"]
    match = SEED_TAG.match(path.name)
    return int(match.group(1)) if match else None


def _arm_from(path: Path, config: dict, root: Path) -> str:
    for tag in config.get("wandb_tags") or []:
        if not SEED_TAG.match(str(tag)):
            return str(tag)
    if SEED_TAG.match(path.name) and path.parent != root:
        return path.parent.name
    return path.name


def load_run(path: Path, root: Path, arm: str | None = None, seed: int | None = None) -> RunResult:
    """Read one run folder; never raises (a bad folder becomes a RunResult with a status and a note)."""
    if not path.is_dir():
        return RunResult(path, arm or path.name, seed, "missing", note="no run folder")
    config, note = {}, ""
    try:
        if (path / CONFIG).is_file():
            config = yaml.safe_load((path / CONFIG).read_text()) or {}
    except yaml.YAMLError as err:
        note = f"config.yaml unreadable ({err.__class__.__name__})"
    run = RunResult(path, arm or _arm_from(path, config, root),
              seed if seed is not None else _seed_from(path, config), "unfinished",
              config=config if isinstance(config, dict) else {}, note=note)
    if (path / METRICS).is_file():
        run.records = read_jsonl(path / METRICS)
    if not (path / SUMMARY).is_file():
        run.note = run.note or "no summary.json (failed, killed or still running)"
        log = path / "launch.log"
        if log.is_file():
            run.note += "; see launch.log there"
        return run
    try:
        run.summary = _read_json(path / SUMMARY)
    except (ValueError, OSError) as err:
        run.status, run.note = "unreadable", f"summary.json unreadable ({err})"
        return run
    if run.final(EVAL_LOSS) is None:
        run.status, run.note = "unreadable", f"summary.json has no {EVAL_LOSS}"
        return run
    run.status = "finished"
    return run


def find_run_dirs(root: Path) -> list[Path]:
    """Folders under root that hold a run (config.yaml or summary.json); not their subfolders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here != root and (SUMMARY in filenames or CONFIG in filenames):
            found.append(here)
            dirnames[:] = []  # a run's own subfolders (wandb/, model/, checkpoints) are not runs
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in NOT_RUNS and not d.startswith("."))
    return sorted(found)


def collect_runs(root: str | os.PathLike) -> tuple[list[RunResult], dict]:
    """All runs of an ablation folder (planned runs first, in plan order) and the plan, if any."""
    root = Path(root)
    plan: dict = {}
    if (root / PLAN_FILE).is_file():
        try:
            plan = _read_json(root / PLAN_FILE)
        except (ValueError, OSError):
            plan = {}
    runs, seen = [], set()
    for entry in plan.get("runs", []):
        path = (root / entry["output_dir"]).resolve()
        runs.append(load_run(path, root, arm=entry.get("arm"), seed=entry.get("seed")))
        seen.add(path)
    for path in find_run_dirs(root):
        if path.resolve() not in seen:
            runs.append(load_run(path.resolve(), root.resolve()))
    return runs, plan
