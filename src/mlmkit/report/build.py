"""Ablation report: a table, plots and a factual summary, built from run folders alone.

    python -m mlmkit.report outputs/ablation_padding [--reference masked] [--output_dir DIR]

Reads every run under the ablation folder -- ``<dir>/<arm>/seed<k>/`` as written by
``recipes/ablate.py``, or generally any subfolder holding a run's ``config.yaml`` -- from
the files every run writes (``config.yaml``, ``metrics.jsonl``, ``summary.json``), so it needs no
W&B. Writes into the ablation folder (or ``--output_dir``):

* ``report.md``   the table (arm, seeds, final eval loss mean ± sd, perplexity, paired Δ vs the
                  reference arm with a 95% t-interval, real tokens/s, pad fraction, runtime;
                  the eval loss of the averaged weights where an arm has them
                  (--average_checkpoints); in a padding ablation also the eval loss with the
                  mask withheld and the pad sensitivity), a "what the numbers say"
                  paragraph computed from the numbers, the fill-mask check per arm (mean rank of
                  the masked word after training, and each sentence's top-1), the per-run table,
                  and the plots;
* ``report.json`` the same numbers, machine-readable (null where a number does not exist);
* where the runs probed downstream (``--probe_file``, ``--pseudo_perplexity_examples``), a
  downstream table (`report.probing`: each probe's accuracy, as users run the model and as
  the arm was trained, and the pseudo-perplexity, per arm and seed, paired Δ vs the reference);
* ``eval_loss.png``, ``perplexity.png``, ``paired_delta.png``, ``throughput.png``, in a
  padding ablation ``pad_sensitivity.png``, with downstream measures ``downstream.png``
  (matplotlib, Agg backend; skipped with a note if matplotlib is missing).

A padding ablation is one whose arms differ in ``mask_padding`` (`PADDING_KEY`): the padding
ablations' arms do, an ablation of other flags does not, and a report of it leaves the padding
measurements out (report.json keeps them, null where the runs did not measure them). The reference
arm is ``--reference``, else the plan's, else the first arm.

A run's arm comes from ``ablation.json`` (the runner's plan) when present, else from its
``wandb_tags`` (the first tag that is not ``seed<k>``), else from its folder name. A run without
``summary.json`` (failed, or still running) and a planned run without a folder are listed as not
finished; they never stop the report. Paired differences use the seeds that both the arm and the
reference finished: d_k = final eval/loss(arm, seed k) - final eval/loss(reference, seed k), with
mean ± t(0.975, n-1) · sd / sqrt(n) (no interval for n = 1; `stats.py`). Text and plots:
`report_render.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from mlmkit.config.fields import PER_RUN_KEYS
from mlmkit.config.fileio import atomic_write_text
from mlmkit.report.render import make_plots, render_markdown
from mlmkit.report.runs import RunResult, collect_runs
from mlmkit.report.probing import summarize_downstream
from mlmkit.report.stats import paired_difference, per_seed
from mlmkit.report.stats import seed_stats as stats
from mlmkit.train.tracking import (
    EVAL_AVG_LOSS,
    EVAL_LOSS,
    EVAL_LOSS_UNMASKED,
    EVAL_PAD_SENSITIVITY,
    EVAL_PERPLEXITY,
    STEP,
    TRAIN_PAD_FRACTION,
    TRAIN_REAL_TOKENS_PER_S,
    TRAIN_RUNTIME,
)

PADDING_KEY = "mask_padding"  # arms that differ in it make a padding ablation


# ================================================================================ numbers
def _arm_order(runs: list[RunResult], plan: dict) -> list[str]:
    order = list(plan.get("arms", []))
    for run in runs:
        if run.arm not in order:
            order.append(run.arm)
    return order


def shown(path: Path, root: Path | None) -> str:
    """A run folder as the report shows it: relative to the ablation folder ``root``."""
    try:
        return str(path.relative_to(root.resolve())) if root else str(path)
    except ValueError:
        return str(path)


def summarize(runs: list[RunResult], plan: dict | None = None, reference: str | None = None,
              root: Path | None = None) -> dict:
    """The report's numbers: per arm, per run, paired differences, and notes."""
    plan = plan or {}

    arms = _arm_order(runs, plan)
    reference = reference or plan.get("reference") or (arms[0] if arms else None)
    notes = []
    by_arm: dict[str, dict[int, RunResult]] = {a: {} for a in arms}
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

    final_loss = {a: per_seed(by_arm[a], lambda r: r.final(EVAL_LOSS)) for a in arms}
    out_arms = {}
    for arm in arms:
        finished = by_arm[arm]
        planned = [r for r in runs if r.arm == arm]
        entry: dict[str, Any] = {
            "n_seeds": len(finished),
            "seeds": sorted(s for s in finished if s >= 0),
            "not_finished": [{"seed": r.seed, "status": r.status, "path": shown(r.path, root),
                              "note": r.note} for r in planned if not r.finished],
            # final values (the last eval of each run) and training rates, per seed and summarised
            "eval_loss": stats(final_loss[arm]),
            "eval_loss_averaged": stats(per_seed(finished, lambda r: r.final(EVAL_AVG_LOSS))),
            "perplexity": stats(per_seed(finished, lambda r: r.final(EVAL_PERPLEXITY))),
            "eval_loss_unmasked": stats(per_seed(finished,
                                                 lambda r: r.final(EVAL_LOSS_UNMASKED))),
            "pad_sensitivity": stats(per_seed(finished, lambda r: r.final(EVAL_PAD_SENSITIVITY))),
            "real_tokens_per_s": stats(per_seed(
                finished, lambda r: r.train_mean(TRAIN_REAL_TOKENS_PER_S))),
            "pad_fraction": stats(per_seed(
                finished, lambda r: r.train_mean(TRAIN_PAD_FRACTION, how="mean"))),
            "runtime_s": stats(per_seed(finished, lambda r: r.final(TRAIN_RUNTIME))),
            "fill_mask_rank_after": stats(per_seed(finished, lambda r: r.mean_fill_mask_rank())),
            "fill_mask_rank_before": stats(per_seed(
                finished, lambda r: r.mean_fill_mask_rank("before"))),
            "paired_delta_vs_reference": None,
            "curve": _mean_curve(list(finished.values())),
        }
        if arm != reference and reference in final_loss:
            entry["paired_delta_vs_reference"] = paired_difference(final_loss[arm],
                                                                   final_loss[reference])
        out_arms[arm] = entry
    if arms and reference not in out_arms:
        notes.append(f"reference arm '{reference}' has no runs: no paired differences")
    unfinished = [r for r in runs if not r.finished]
    differences = _config_differences(runs)
    eval_rates = _eval_rates(runs)
    if len(set(eval_rates.values())) > 1:
        notes.append("the arms evaluate at different masking rates (eval_mlm_probability: "
                     + ", ".join(f"{a} {p}" for a, p in eval_rates.items()) + "): their eval "
                     "losses measure different tasks; set one eval_mlm_probability for every arm")
    table = sorted(runs, key=lambda r: (arms.index(r.arm), -1 if r.seed is None else r.seed))
    return {
        "name": plan.get("name"),
        "reference": reference,
        "arms": out_arms,
        "runs": [{"arm": r.arm, "seed": r.seed, "status": r.status, "path": shown(r.path, root),
                  "note": r.note, "step": r.summary.get(STEP),
                  "eval_loss": r.final(EVAL_LOSS), "perplexity": r.final(EVAL_PERPLEXITY),
                  "runtime_s": r.final(TRAIN_RUNTIME)} for r in table],
        "comparisons": [
            {"arm": a, "against": b, "paired_delta": paired_difference(final_loss[a], final_loss[b])}
            for a, b in plan.get("comparisons", []) if a in final_loss and b in final_loss],
        "n_runs": len(runs), "n_finished": len(runs) - len(unfinished),
        "padding": PADDING_KEY in differences,
        "eval_mlm_probability": next(iter(eval_rates.values())) if len(set(
            eval_rates.values())) == 1 else None,
        "arm_differences": differences,
        "fill_mask": _fill_mask_sentences(by_arm),
        "downstream": summarize_downstream(by_arm, reference),
        "notes": notes,
    }


def _fill_mask_sentences(by_arm: dict[str, dict[int, RunResult]]) -> dict | None:
    """The fill-mask check's sentences (from any run: every run of an ablation evaluates on the
    same split, so gets the same ones) and, per arm, the top-1 filler of each after training in
    its lowest-seed run that has the check."""
    sentences, top1 = None, {}
    for arm, finished in by_arm.items():
        for _, run in sorted(finished.items()):
            entries = run.fill_mask()
            if not entries:
                continue
            if sentences is None:
                sentences = [{"text": e.get("text"), "answer": e.get("answer")} for e in entries]
            if [e.get("text") for e in entries] == [s["text"] for s in sentences]:
                top1[arm] = [(e.get("after") or [None])[0] for e in entries]
                break
    return {"sentences": sentences, "top1_after": top1} if sentences else None


def _mean_curve(runs: list[RunResult]) -> dict | None:
    """Eval loss against step, over the steps every seed evaluated: mean, min, max, x in epochs.
    Each run's final eval counts as at the arm's last step (seeds of an arm may end a step
    apart: a batch warm-up's steps depend on the examples' lengths)."""
    curves = [dict(r.eval_curve()) for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return None
    end = max(max(c) for c in curves)
    curves = [{**{s: v for s, v in c.items() if s != max(c)}, end: c[max(c)]} for c in curves]
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


def _eval_rates(runs: list[RunResult]) -> dict[str, float]:
    """Each arm's eval masking rate, from its first run with a config that records it."""
    rates: dict[str, float] = {}
    for run in runs:
        if run.arm not in rates and isinstance(run.config.get("eval_mlm_probability"),
                                               (int, float)):
            rates[run.arm] = run.config["eval_mlm_probability"]
    return rates


def _config_differences(runs: list[RunResult]) -> dict[str, dict[str, Any]]:
    """Config keys whose values differ between arms: {key: {arm: value}} (what the arms change)."""
    per_arm: dict[str, dict] = {}
    for run in runs:
        if run.config and run.arm not in per_arm:
            per_arm[run.arm] = run.config
    keys = sorted({k for c in per_arm.values() for k in c} - PER_RUN_KEYS)
    return {k: {a: c.get(k) for a, c in per_arm.items()} for k in keys
            if len({json.dumps(c.get(k), sort_keys=True) for c in per_arm.values()}) > 1}


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
    atomic_write_text(out_dir / "report.md", render_markdown(numbers, plots, plot_note))
    atomic_write_text(out_dir / "report.json", json.dumps(_json_safe(numbers), indent=2) + "\n")
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
                             "reference, else the first arm)")
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
