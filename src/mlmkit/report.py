"""Ablation report: a table, plots and a factual summary, built from run folders alone.

    python -m mlmkit.report outputs/ablation_padding [--reference masked] [--output_dir DIR]

Reads every run under the ablation folder -- ``<dir>/<arm>/seed<k>/`` as written by
``recipes/ablate_padding.py``, or generally any subfolder holding a run's ``config.yaml`` -- from
the files every run writes (``config.yaml``, ``metrics.jsonl``, ``summary.json``), so it needs no
W&B. Writes into the ablation folder (or ``--output_dir``):

* ``report.md``   the table (arm, seeds, final eval loss mean ± sd, perplexity, eval loss with the
                  mask withheld, paired Δ vs the reference arm with a 95% t-interval, pad
                  sensitivity, real tokens/s, pad fraction, runtime), a "what the numbers say"
                  paragraph computed from the numbers, the per-run table, and the plots;
* ``report.json`` the same numbers, machine-readable (null where a number does not exist);
* ``eval_loss.png``, ``perplexity.png``, ``paired_delta.png``, ``pad_sensitivity.png``,
  ``throughput.png`` (matplotlib, Agg backend; skipped with a note if matplotlib is missing).

A run's arm comes from ``ablation.json`` (the runner's plan) when present, else from its
``wandb_tags`` (the first tag that is not ``seed<k>``), else from its folder name. A run without
``summary.json`` (failed, or still running) and a planned run without a folder are listed as not
finished; they never stop the report. Paired differences use the seeds that both the arm and the
reference finished: d_k = final eval/loss(arm, seed k) - final eval/loss(reference, seed k), with
mean ± t(0.975, n-1) · sd / sqrt(n) (no interval for n = 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .tracking import (EPOCH, EVAL_LOSS, EVAL_LOSS_UNMASKED, EVAL_PAD_SENSITIVITY, EVAL_PERPLEXITY,
                       STEP, TRAIN_LOSS, TRAIN_PAD_FRACTION, TRAIN_REAL_TOKENS_PER_S, TRAIN_RUNTIME)

PLAN_FILE = "ablation.json"  # written by recipes/ablate_padding.py
DEFAULT_REFERENCE = "masked"
SEED_TAG = re.compile(r"^seed(\d+)$")
# Folders inside a run that are never runs themselves (W&B's files/ holds a config.yaml).
NOT_RUNS = {"wandb", "model", "model.tmp", "tensorboard", "checkpoints", "__pycache__"}
# Keys that differ between every pair of runs by construction: not "what the arms change".
PER_RUN_KEYS = {"output_dir", "run_name", "seed", "wandb_tags", "overwrite_output_dir",
                "resume_from_checkpoint"}

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; beyond, a Cornish-Fisher
# expansion around the normal quantile (error < 1e-5 for df > 30).
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
         2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
         2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
         2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the multiplier of the standard error in a two-sided 95% interval."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def describe(values: list[float]) -> dict:
    """n, mean, sample sd (n-1; None for n < 2), min, max of finite values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "sd": sd, "min": min(values), "max": max(values)}


def paired_difference(arm: dict[int, float], reference: dict[int, float]) -> dict:
    """Per-seed differences arm - reference over the seeds both have, with a 95% t-interval.

    Returns n, mean, sd, se, t, ci95 ([low, high], None for n < 2), per_seed {seed: d}.
    """
    seeds = sorted(set(arm) & set(reference))
    diffs = {s: arm[s] - reference[s] for s in seeds
             if arm[s] is not None and reference[s] is not None}
    stats = describe(list(diffs.values()))
    out = {"n": stats["n"], "mean": stats["mean"], "sd": stats["sd"], "se": None, "t": None,
           "ci95": None, "per_seed": {str(s): d for s, d in diffs.items()}}
    if stats["n"] >= 2:
        se = stats["sd"] / math.sqrt(stats["n"])
        t = t_quantile_975(stats["n"] - 1)
        out.update(se=se, t=t, ci95=[stats["mean"] - t * se, stats["mean"] + t * se])
    return out


# ================================================================================ reading runs
@dataclass
class Run:
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

    def epochs_per_step(self) -> float | None:
        """Epochs per optimizer step, from any train record (epoch = step / steps_per_epoch)."""
        for r in self.records:
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


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off by a killed run: the rest is still good
    return records


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


def load_run(path: Path, root: Path, arm: str | None = None, seed: int | None = None) -> Run:
    """Read one run folder; never raises (a bad folder becomes a Run with a status and a note)."""
    if not path.is_dir():
        return Run(path, arm or path.name, seed, "missing", note="no run folder")
    config, note = {}, ""
    try:
        if (path / "config.yaml").is_file():
            config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except yaml.YAMLError as err:
        note = f"config.yaml unreadable ({err.__class__.__name__})"
    run = Run(path, arm or _arm_from(path, config, root),
              seed if seed is not None else _seed_from(path, config), "unfinished",
              config=config if isinstance(config, dict) else {}, note=note)
    if (path / "metrics.jsonl").is_file():
        run.records = _read_jsonl(path / "metrics.jsonl")
    if not (path / "summary.json").is_file():
        run.note = run.note or "no summary.json (failed, killed or still running)"
        log = path / "launch.log"
        if log.is_file():
            run.note += "; see launch.log there"
        return run
    try:
        run.summary = _read_json(path / "summary.json")
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
        if here != root and ("summary.json" in filenames or "config.yaml" in filenames):
            found.append(here)
            dirnames[:] = []  # a run's own subfolders (wandb/, model/, checkpoints) are not runs
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in NOT_RUNS and not d.startswith("."))
    return sorted(found)


def collect_runs(root: str | os.PathLike) -> tuple[list[Run], dict]:
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


# ================================================================================ numbers
def _arm_order(runs: list[Run], plan: dict) -> list[str]:
    order = list(plan.get("arms", []))
    for run in runs:
        if run.arm not in order:
            order.append(run.arm)
    return order


def summarize(runs: list[Run], plan: dict | None = None, reference: str | None = None,
              root: Path | None = None) -> dict:
    """The report's numbers: per arm, per run, paired differences, and notes."""
    plan = plan or {}

    def shown(path: Path) -> str:  # run folders relative to the ablation folder
        try:
            return str(path.relative_to(root.resolve())) if root else str(path)
        except ValueError:
            return str(path)

    reference = reference or plan.get("reference") or DEFAULT_REFERENCE
    arms = _arm_order(runs, plan)
    notes = []
    by_arm: dict[str, dict[int, Run]] = {a: {} for a in arms}
    for run in runs:
        if not run.finished:
            continue
        key = run.seed if run.seed is not None else -1 - len(by_arm[run.arm])
        if key in by_arm[run.arm]:
            first = by_arm[run.arm][key].path
            notes.append(f"{run.arm} seed {run.seed}: two finished runs ({first} and {run.path}); "
                         "the first is used")
            continue
        by_arm[run.arm][key] = run

    def per_seed(arm: str, fn) -> dict[int, float]:
        return {s: v for s, r in by_arm[arm].items() if (v := fn(r)) is not None}

    def stats(values: dict[int, float]) -> dict:
        return {**describe(list(values.values())),
                "per_seed": {str(s): v for s, v in sorted(values.items())}}

    final_loss = {a: per_seed(a, lambda r: r.final(EVAL_LOSS)) for a in arms}
    out_arms = {}
    for arm in arms:
        finished = by_arm[arm]
        planned = [r for r in runs if r.arm == arm]
        entry: dict[str, Any] = {
            "n_seeds": len(finished),
            "seeds": sorted(s for s in finished if s >= 0),
            "not_finished": [{"seed": r.seed, "status": r.status, "path": shown(r.path),
                              "note": r.note} for r in planned if not r.finished],
            # final values (the last eval of each run) and training rates, per seed and summarised
            "eval_loss": stats(final_loss[arm]),
            "perplexity": stats(per_seed(arm, lambda r: r.final(EVAL_PERPLEXITY))),
            "eval_loss_unmasked": stats(per_seed(arm, lambda r: r.final(EVAL_LOSS_UNMASKED))),
            "pad_sensitivity": stats(per_seed(arm, lambda r: r.final(EVAL_PAD_SENSITIVITY))),
            "real_tokens_per_s": stats(per_seed(
                arm, lambda r: r.train_mean(TRAIN_REAL_TOKENS_PER_S))),
            "pad_fraction": stats(per_seed(
                arm, lambda r: r.train_mean(TRAIN_PAD_FRACTION, how="mean"))),
            "runtime_s": stats(per_seed(arm, lambda r: r.final(TRAIN_RUNTIME))),
            "paired_delta_vs_reference": None,
            "curve": _mean_curve(list(finished.values())),
        }
        if arm != reference and reference in final_loss:
            entry["paired_delta_vs_reference"] = paired_difference(final_loss[arm],
                                                                   final_loss[reference])
        out_arms[arm] = entry
    if reference not in out_arms:
        notes.append(f"reference arm '{reference}' has no runs: no paired differences")
    unfinished = [r for r in runs if not r.finished]
    table = sorted(runs, key=lambda r: (arms.index(r.arm), -1 if r.seed is None else r.seed))
    return {
        "name": plan.get("name"),
        "reference": reference,
        "arms": out_arms,
        "runs": [{"arm": r.arm, "seed": r.seed, "status": r.status, "path": shown(r.path),
                  "note": r.note, "step": r.summary.get(STEP),
                  "eval_loss": r.final(EVAL_LOSS), "perplexity": r.final(EVAL_PERPLEXITY),
                  "runtime_s": r.final(TRAIN_RUNTIME)} for r in table],
        "comparisons": [
            {"arm": a, "against": b, "paired_delta": paired_difference(final_loss[a], final_loss[b])}
            for a, b in plan.get("comparisons", []) if a in final_loss and b in final_loss],
        "n_runs": len(runs), "n_finished": len(runs) - len(unfinished),
        "arm_differences": _config_differences(runs),
        "notes": notes,
    }


def _mean_curve(runs: list[Run]) -> dict | None:
    """Eval loss against step, over the steps every seed evaluated: mean, min, max, x in epochs."""
    curves = [dict(r.eval_curve()) for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    rates = [r.epochs_per_step() for r in runs if r.epochs_per_step()]
    per_step = rates[0] if rates else None
    return {
        "step": steps,
        "epoch": [s * per_step for s in steps] if per_step else None,
        "mean": [sum(c[s] for c in curves) / len(curves) for s in steps],
        "min": [min(c[s] for c in curves) for s in steps],
        "max": [max(c[s] for c in curves) for s in steps],
        "per_seed": [[c[s] for s in steps] for c in curves],
    }


def _config_differences(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Config keys whose values differ between arms: {key: {arm: value}} (what the arms change)."""
    per_arm: dict[str, dict] = {}
    for run in runs:
        if run.config and run.arm not in per_arm:
            per_arm[run.arm] = run.config
    keys = sorted({k for c in per_arm.values() for k in c} - PER_RUN_KEYS)
    return {k: {a: c.get(k) for a, c in per_arm.items()} for k in keys
            if len({json.dumps(c.get(k), sort_keys=True) for c in per_arm.values()}) > 1}


# ================================================================================ text
def _f(value, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _mean_sd(stats: dict, digits: int = 4) -> str:
    if not stats["n"]:
        return "n/a"
    return _f(stats["mean"], digits) + (f" ± {_f(stats['sd'], digits)}" if stats["sd"] is not None
                                        else "")


def _delta(d: dict | None, reference_arm: bool) -> str:
    if reference_arm:
        return "(reference)"
    if not d or not d["n"]:
        return "n/a"
    ci = (f" [{_f(d['ci95'][0], signed=True)}, {_f(d['ci95'][1], signed=True)}]" if d["ci95"]
          else " [n/a: 1 seed]")
    return f"{_f(d['mean'], signed=True)}{ci}"


def what_the_numbers_say(numbers: dict) -> list[str]:
    """Factual sentences computed from the numbers (no judgement beyond what they show)."""
    ref, arms = numbers["reference"], numbers["arms"]
    pairs = [(arm, ref, entry["paired_delta_vs_reference"]) for arm, entry in arms.items()
             if arm != ref]
    pairs += [(c["arm"], c["against"], c["paired_delta"]) for c in numbers.get("comparisons", [])]
    lines = [_paired_sentence(arm, against, d) for arm, against, d in pairs if d and d["n"]]
    gaps = []
    for arm, entry in arms.items():
        lu, lm = entry["eval_loss_unmasked"]["mean"], entry["eval_loss"]["mean"]
        if lu is not None and lm is not None:
            gaps.append(f"`{arm}` {_f(lu - lm, signed=True)}")
    if gaps:
        lines.append("Withholding the attention mask at eval (padding attended) changes the final "
                     "eval loss by: " + ", ".join(gaps) + ".")
    sens = [f"`{a}` {_f(e['pad_sensitivity']['mean'])}" for a, e in arms.items()
            if e["pad_sensitivity"]["mean"] is not None]
    if sens:
        lines.append("Pad sensitivity (mean |Δ log p| of real tokens when unmasked padding is "
                     "appended; 0 = padding ignored): " + ", ".join(sens) + ".")
    base = arms.get(ref, {}).get("real_tokens_per_s", {}).get("mean")
    speed = []
    for arm, entry in arms.items():
        rate, pad = entry["real_tokens_per_s"]["mean"], entry["pad_fraction"]["mean"]
        if rate is None:
            continue
        ratio = f", {rate / base:.2f}× `{ref}`" if base and arm != ref else ""
        padtxt = f", {100 * pad:.1f}% padding" if pad is not None else ""
        speed.append(f"`{arm}` {rate:,.0f}{ratio}{padtxt}")
    if speed:
        lines.append("Training throughput in real (non-padding) tokens/s: " + "; ".join(speed)
                     + ".")
    missing = [r for r in numbers["runs"] if r["status"] != "finished"]
    if missing:
        names = ", ".join(f"{r['arm']} seed {r['seed']} ({r['status']})" for r in missing)
        lines.append(f"{len(missing)} of {numbers['n_runs']} runs did not finish and are left "
                     f"out of every number above: {names}.")
    return lines


def _paired_sentence(arm: str, against: str, d: dict) -> str:
    head = f"`{arm}` − `{against}`: final eval loss Δ = {_f(d['mean'], signed=True)}"
    if d["ci95"] is None:
        return f"{head} from a single paired seed; no interval (run more seeds)."
    lo, hi = d["ci95"]
    if lo > 0 or hi < 0:
        direction = "higher" if d["mean"] > 0 else "lower"
        verdict = f"the interval excludes 0: `{arm}` ends with a {direction} eval loss than `{against}`"
    else:
        verdict = f"the interval includes 0: no difference detectable with {d['n']} seeds"
    diffs = list(d["per_seed"].values())
    same = f"; {sum(v > 0 for v in diffs)} of {len(diffs)} seeds positive"
    return (f"{head} (95% CI [{_f(lo, signed=True)}, {_f(hi, signed=True)}], n = {d['n']} paired "
            f"seeds{same}); {verdict}.")


PLOTS = {  # file -> title (short: it must fit a narrow figure)
    "eval_loss.png": "Eval loss during training (mean over seeds; band: min–max)",
    "perplexity.png": "Final eval perplexity (bar: mean, dots: seeds)",
    "paired_delta.png": "Paired Δ final eval loss (◆ mean, bar: 95% CI, dots: seeds)",
    "pad_sensitivity.png": "Final pad sensitivity (bar: mean, dots: seeds)",
    "throughput.png": "Real tokens/s in training (bar: mean, dots: seeds)",
}


def render_markdown(numbers: dict, plots: list[str], plot_note: str = "") -> str:
    ref, arms = numbers["reference"], numbers["arms"]
    title = f"# Padding ablation report: {numbers['name']}" if numbers["name"] else \
        "# Padding ablation report"
    out = [title, "",
           f"{numbers['n_finished']} of {numbers['n_runs']} runs finished. Final values are the "
           f"last eval of each run (summary.json); Δ is paired by seed against `{ref}` "
           "(same data order and masked positions), with a 95% t-interval.", ""]
    header = ["arm", "n seeds", "final eval loss (mean ± sd)", "perplexity",
              "eval loss, mask withheld", f"paired Δ loss vs {ref} [95% CI]", "pad sensitivity",
              "real tokens/s", "pad fraction", "runtime (s)"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, e in arms.items():
        pad = e["pad_fraction"]["mean"]
        out.append("| " + " | ".join([
            f"`{arm}`", str(e["n_seeds"]), _mean_sd(e["eval_loss"]),
            _f(e["perplexity"]["mean"], 2), _f(e["eval_loss_unmasked"]["mean"]),
            _delta(e["paired_delta_vs_reference"], arm == ref),
            _f(e["pad_sensitivity"]["mean"]),
            _f(e["real_tokens_per_s"]["mean"], 0),
            "n/a" if pad is None else f"{100 * pad:.1f}%",
            _f(e["runtime_s"]["mean"], 1)]) + " |")
    out += ["", "## What the numbers say", ""]
    out += [f"- {line}" for line in what_the_numbers_say(numbers)] or ["- No finished runs."]
    if numbers["arm_differences"]:
        with_config = [a for a in arms if a in next(iter(numbers["arm_differences"].values()))]
        out += ["", "## What the arms change", "",
                "| key | " + " | ".join(f"`{a}`" for a in with_config) + " |",
                "|---|" + "---|" * len(with_config)]
        for key, values in numbers["arm_differences"].items():
            out.append(f"| {key} | " + " | ".join(str(values[a]) for a in with_config) + " |")
    if numbers["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in numbers["notes"]]
    out += ["", "## Plots", ""]
    out += [f"![{PLOTS[p]}]({p})\n" for p in plots] or [plot_note or "No plots."]
    if plots and plot_note:
        out.append(plot_note)
    out += ["", "## Runs", "", "| arm | seed | status | steps | final eval loss | perplexity | "
            "runtime (s) | folder |", "|---|---|---|---|---|---|---|---|"]
    for r in numbers["runs"]:
        status = r["status"] + (f" — {r['note']}" if r["note"] and r["status"] != "finished"
                                else "")
        out.append(f"| `{r['arm']}` | {r['seed']} | {status} | {r['step'] or 'n/a'} | "
                   f"{_f(r['eval_loss'])} | {_f(r['perplexity'], 2)} | {_f(r['runtime_s'], 1)} | "
                   f"{r['path']} |")
    return "\n".join(out) + "\n"


# ================================================================================ plots
def make_plots(numbers: dict, out_dir: Path) -> list[str]:
    """Write the PNGs; returns their file names. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, arms = numbers["reference"], numbers["arms"]
    names = [a for a, e in arms.items() if e["n_seeds"]]
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(arms)}
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    # eval loss against training progress: full run, and the second half zoomed in
    curves = {a: arms[a]["curve"] for a in names if arms[a]["curve"]}
    if curves:
        use_epoch = all(c["epoch"] for c in curves.values())
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, zoom in zip(axes, (False, True)):
            for arm, c in curves.items():
                x = c["epoch"] if use_epoch else c["step"]
                keep = [i for i, v in enumerate(x) if not zoom or v >= 0.5 * max(x)]
                if not keep:
                    continue
                xs = [x[i] for i in keep]
                ax.plot(xs, [c["mean"][i] for i in keep], marker="o", ms=3, color=colors[arm],
                        label=f"{arm} (n={arms[arm]['n_seeds']})")
                if arms[arm]["n_seeds"] > 1:
                    ax.fill_between(xs, [c["min"][i] for i in keep], [c["max"][i] for i in keep],
                                    color=colors[arm], alpha=0.2, linewidth=0)
            ax.set_xlabel("epoch" if use_epoch else "optimizer step")
            ax.set_ylabel(EVAL_LOSS)
            ax.set_title("second half of training" if zoom else "whole run")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(PLOTS["eval_loss.png"], fontsize=10)
        save(fig, "eval_loss.png")

    def bars(metric: str, name: str, ylabel: str):
        fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 1.3 * len(names)), 3.8))
        for i, arm in enumerate(names):
            stats = arms[arm][metric]
            if stats["mean"] is None:
                continue
            ax.bar(i, stats["mean"], color=colors[arm])
            points = list(arms[arm][metric]["per_seed"].values())
            ax.scatter([i] * len(points), points, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=15)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel(ylabel)
        ax.set_title(PLOTS[name], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        save(fig, name)

    bars("perplexity", "perplexity.png", EVAL_PERPLEXITY)
    bars("pad_sensitivity", "pad_sensitivity.png", EVAL_PAD_SENSITIVITY)
    bars("real_tokens_per_s", "throughput.png", TRAIN_REAL_TOKENS_PER_S)

    # every paired difference: each arm against the reference, then the extra comparisons
    pairs = [(a, ref, arms[a]["paired_delta_vs_reference"]) for a in names if a != ref]
    pairs += [(c["arm"], c["against"], c["paired_delta"]) for c in numbers.get("comparisons", [])]
    pairs = [(a, b, d) for a, b, d in pairs if d and d.get("n")]
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 1.5 * len(pairs)), 3.8))
    ax.axhline(0.0, color="gray", linewidth=1)
    for i, (arm, _, d) in enumerate(pairs):
        seeds = list(d["per_seed"].values())  # beside the mean, so that n = 1 stays visible
        ax.scatter([i + 0.15] * len(seeds), seeds, color=colors[arm], s=18, zorder=5)
        if d["ci95"]:
            ax.errorbar(i, d["mean"], yerr=[[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]],
                        fmt="D", color="black", capsize=6, zorder=4)
        else:
            ax.plot(i, d["mean"], "D", color="black", zorder=4)
    if pairs:
        ax.set_xticks(range(len(pairs)), [f"{a} − {b}" for a, b, _ in pairs], rotation=15)
        ax.set_xlim(-0.6, len(pairs) - 0.4)
    else:
        ax.text(0.5, 0.5, f"no arm paired with '{ref}'", ha="center", transform=ax.transAxes)
    ax.set_ylabel(f"Δ {EVAL_LOSS}")
    ax.set_title(PLOTS["paired_delta.png"], fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    save(fig, "paired_delta.png")
    return written


# ================================================================================ entry points
def build_report(root: str | os.PathLike, reference: str | None = None,
                 output_dir: str | os.PathLike | None = None) -> dict:
    """Read the runs under ``root``, write report.md, report.json and the plots; return numbers."""
    root = Path(root)
    out_dir = Path(output_dir) if output_dir else root
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, plan = collect_runs(root)
    numbers = summarize(runs, plan, reference, root)
    plot_note = ""
    try:
        plots = make_plots(numbers, out_dir) if numbers["n_finished"] else []
    except ImportError:
        plots = []
        plot_note = "Plots skipped: matplotlib is not installed (`pip install matplotlib`)."
    numbers["plots"] = plots
    (out_dir / "report.md").write_text(render_markdown(numbers, plots, plot_note))
    (out_dir / "report.json").write_text(json.dumps(_json_safe(numbers), indent=2) + "\n")
    return numbers


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlmkit.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("ablation_dir",
                        help="folder holding the runs (e.g. outputs/ablation_padding)")
    parser.add_argument("--reference", default=None,
                        help="arm that paired differences are taken against (default: the plan's "
                             f"reference, else '{DEFAULT_REFERENCE}')")
    parser.add_argument("--output_dir", default=None,
                        help="where report.md/json and the PNGs go (default: ablation_dir)")
    args = parser.parse_args(argv)
    root = Path(args.ablation_dir)
    if not root.is_dir():
        print(f"mlmkit.report: error: {root}: no such folder. Fix: pass the ablation's output_dir.",
              file=sys.stderr)
        return 2
    numbers = build_report(root, args.reference, args.output_dir)
    out = Path(args.output_dir or root)
    if not numbers["n_runs"]:
        print(f"mlmkit.report: error: no runs under {root} (no folder with config.yaml or "
              "summary.json). Fix: pass the ablation's output_dir.", file=sys.stderr)
        return 2
    print(f"report: {numbers['n_finished']}/{numbers['n_runs']} runs finished -> "
          f"{out / 'report.md'}, {out / 'report.json'}, {len(numbers['plots'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
