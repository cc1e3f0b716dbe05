"""The ablation report's downstream measures, where the runs have them (``--probe_file``,
``--pseudo_perplexity_examples``; docs/downstream.md): numbers (`summarize_downstream`), the
report's table and sentence (`downstream_lines`) and its plot (`downstream_plot`).

Per probe (a file's stem, or None for a run's only probe: its metrics carry no suffix):

* ``probe accuracy`` -- the final ``eval/probe_accuracy[/<probe>]``: the texts embedded with the
  attention mask, as users run the model, in every arm;
* ``probe accuracy as trained`` -- only where an arm trained with ``mask_padding: false`` and
  probed without the mask (``--probe_mask_padding both``): that arm's
  ``eval/probe_accuracy_unmasked[/<probe>]``, the other arms' masked accuracy (they were trained
  with the mask), so each arm is probed the way it was trained;

and ``pseudo-perplexity`` (``eval/pseudo_perplexity``). Each: per seed, mean ± sd, and the paired
difference to the reference arm with a 95% t-interval (`stats.paired_difference`), and the mean
of the same measure at step 0 (summary.json's ``first/<key>``: the model before training, so the
table says whether training moved it at all). An ablation
whose runs measured none of them has no downstream numbers (an empty list), and its report no
downstream table or plot.
"""

from __future__ import annotations

from mlmkit.report.stats import paired_difference, per_seed, seed_stats
from mlmkit.train.tracking import (
    EVAL_PROBE_ACCURACY,
    EVAL_PROBE_ACCURACY_UNMASKED,
    EVAL_PSEUDO_PERPLEXITY,
    FIRST,
    probe_key,
)

PLOT = "downstream.png"
PLOT_TITLE = "Downstream, final (bar: mean, dots: seeds; dashed: step 0)"


def probe_names(runs) -> list[str | None]:
    """The probes the runs measured, in order of first appearance: a file's stem, or None for a
    run's only probe (``eval/probe_accuracy`` itself)."""
    names: list[str | None] = []
    for run in runs:
        for key in run.summary:
            if key == EVAL_PROBE_ACCURACY:
                name = None
            elif key.startswith(EVAL_PROBE_ACCURACY + "/"):
                name = key[len(EVAL_PROBE_ACCURACY) + 1:]
            else:
                continue
            if name not in names:
                names.append(name)
    return names


def trained_unmasked(run) -> bool:
    """Whether the run trained with padding attended (``mask_padding: false``)."""
    return run.config.get("mask_padding") is False


def as_trained(run, probe: str | None) -> str:
    """The summary key of the run's probe accuracy with its texts embedded the way it trained:
    unmasked for a ``mask_padding: false`` run, masked otherwise."""
    key = EVAL_PROBE_ACCURACY_UNMASKED if trained_unmasked(run) else EVAL_PROBE_ACCURACY
    return probe_key(key, probe)


def _measures(runs) -> list[tuple[str, str, object]]:
    """(name, label, the measure's summary key in a run) of every downstream measure the runs
    have."""
    out = []
    for probe in probe_names(runs):
        suffix = "" if probe is None else f", {probe}"
        name = "probe_accuracy" + ("" if probe is None else f"/{probe}")
        masked = probe_key(EVAL_PROBE_ACCURACY, probe)
        out.append((name, f"probe accuracy{suffix}", lambda r, k=masked: k))
        unmasked = probe_key(EVAL_PROBE_ACCURACY_UNMASKED, probe)
        if any(trained_unmasked(r) and r.final(unmasked) is not None for r in runs):
            out.append((name + "/as_trained", f"probe accuracy as trained{suffix}",
                        lambda r, p=probe: as_trained(r, p)))
    if any(r.final(EVAL_PSEUDO_PERPLEXITY) is not None for r in runs):
        out.append(("pseudo_perplexity", "pseudo-perplexity", lambda r: EVAL_PSEUDO_PERPLEXITY))
    return out


def summarize_downstream(by_arm: dict, reference: str | None) -> list[dict]:
    """Each downstream measure the finished runs (``by_arm``: arm -> seed -> run) have: its name,
    label, and per arm the stats over seeds and the paired difference to ``reference`` (None for
    the reference itself or where it has no value)."""
    runs = [run for finished in by_arm.values() for run in finished.values()]
    out = []
    for name, label, key in _measures(runs):
        values = {arm: per_seed(finished, lambda r: r.final(key(r)))
                  for arm, finished in by_arm.items()}
        arms = {}
        for arm, seeds in values.items():
            delta = None
            if arm != reference and values.get(reference):
                delta = paired_difference(seeds, values[reference])
            first = per_seed(by_arm[arm], lambda r: r.final(FIRST + key(r)))
            arms[arm] = {**seed_stats(seeds), "paired_delta_vs_reference": delta,
                         "step0_mean": sum(first.values()) / len(first) if first else None}
        out.append({"name": name, "label": label, "arms": arms})
    return out


def _cell(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def delta_cell(d: dict | None, digits: int) -> str:
    if not d or not d.get("n"):
        return "n/a"
    ci = (f" [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}]" if d["ci95"]
          else " [n/a: 1 seed]")
    return f"{d['mean']:+.{digits}f}{ci}"


def downstream_lines(numbers: dict) -> list[str]:
    """The report's downstream section (a table: measure, arm, seeds, mean ± sd, per seed,
    paired Δ vs the reference), [] where the runs measured nothing downstream."""
    measures = numbers.get("downstream") or []
    if not measures:
        return []
    ref = numbers["reference"]
    out = ["", "## Downstream", "",
           "Final values of each run (summary.json). Probe accuracy: a logistic regression on the "
           "model's mean-pooled embeddings, cross-validated, the texts embedded with the "
           "attention mask as users run the model; *as trained*: embedded without the mask for "
           "the arms trained with `mask_padding: false`, with it for the others. "
           f"Δ is paired by seed against `{ref}`, with a 95% t-interval. *Step 0*: the same "
           "measure before training (n/a where the runs did not measure it then).", "",
           f"| measure | arm | n seeds | step 0 (mean) | mean ± sd | per seed | "
           f"Δ vs `{ref}` [95% CI] |",
           "|---|---|---|---|---|---|---|"]
    for measure in measures:
        digits = 2 if measure["name"] == "pseudo_perplexity" else 4
        for arm, entry in measure["arms"].items():
            if not entry["n"]:
                continue
            sd = f" ± {entry['sd']:.{digits}f}" if entry["sd"] is not None else ""
            seeds = ", ".join(f"{v:.{digits}f}" for v in entry["per_seed"].values())
            delta = "(reference)" if arm == ref else delta_cell(
                entry["paired_delta_vs_reference"], digits)
            out.append(f"| {measure['label']} | `{arm}` | {entry['n']} | "
                       f"{_cell(entry.get('step0_mean'), digits)} | "
                       f"{_cell(entry['mean'], digits)}{sd} | {seeds} | {delta} |")
    return out


def downstream_sentence(numbers: dict) -> list[str]:
    """One sentence: the downstream paired differences whose interval excludes 0."""
    measures = numbers.get("downstream") or []
    if not measures:
        return []
    found = []
    for measure in measures:
        for arm, entry in measure["arms"].items():
            d = entry["paired_delta_vs_reference"]
            if d and d.get("ci95") and (d["ci95"][0] > 0 or d["ci95"][1] < 0):
                found.append(f"{measure['label']}: `{arm}` {d['mean']:+.4g}")
    ref = numbers["reference"]
    if not found:
        return [f"Downstream: no paired difference to `{ref}` has a 95% interval that excludes 0."]
    return [f"Downstream, paired differences to `{ref}` whose 95% interval excludes 0: "
            + "; ".join(found) + "."]


def downstream_plot(figures, numbers: dict, names: list[str], colors: dict) -> None:
    """``downstream.png`` (`render._Figures`): one panel per measure, a bar per arm (its mean)
    and each seed's value as a point; a probe's panel marks each arm's step-0 mean with a dashed
    line. Nothing without downstream measures."""
    measures = numbers.get("downstream") or []
    if not measures:
        return
    fig, axes = figures.plt.subplots(1, len(measures), squeeze=False,
                                     figsize=(max(4.8, 0.6 + (0.5 + 0.7 * len(names))
                                                  * len(measures)), 3.8))
    for ax, measure in zip(axes[0], measures):
        accuracy = measure["name"] != "pseudo_perplexity"  # (its step 0 is off any useful scale)
        step0 = []
        for i, arm in enumerate(names):
            entry = measure["arms"].get(arm)
            if not entry or entry["mean"] is None:
                continue
            ax.bar(i, entry["mean"], color=colors[arm])
            points = list(entry["per_seed"].values())
            ax.scatter([i] * len(points), points, color="black", s=12, zorder=3)
            if accuracy and entry.get("step0_mean") is not None:
                step0.append(entry["step0_mean"])
                ax.hlines(entry["step0_mean"], i - 0.4, i + 0.4, colors="black",
                          linestyles="--", linewidth=1, zorder=4,
                          label="step 0" if len(step0) == 1 else None)
        if step0:
            ax.legend(fontsize=7, loc="best")
        values = [v for e in measure["arms"].values() for v in e["per_seed"].values()] + step0
        if values and accuracy:  # accuracies: the bars' tops
            low, high = min(values), max(values)
            pad = max(0.02, (high - low) * 0.5)
            ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_title(measure["label"], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(PLOT_TITLE, fontsize=10)
    figures.save(fig, PLOT)
