"""The ablation report's text (report.md) and plots (PNG), from the numbers `report.summarize`
computes. Nothing here reads run folders or computes a statistic."""

from __future__ import annotations

import math
import os
from pathlib import Path

from mlmkit.report.probing import (
    PLOT,
    PLOT_TITLE,
    downstream_lines,
    downstream_plot,
    downstream_sentence,
)
from mlmkit.train.tracking import (
    EVAL_LOSS,
    EVAL_PAD_SENSITIVITY,
    EVAL_PERPLEXITY,
    TRAIN_REAL_TOKENS_PER_S,
)


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


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


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
    if numbers.get("padding", True):  # (reports written before the key were all padding)
        lines += _padding_sentences(arms)
    lines += downstream_sentence(numbers)
    averaged = [f"`{a}` {_f(e['eval_loss_averaged']['mean'])} "
                f"({_f(e['eval_loss_averaged']['mean'] - e['eval_loss']['mean'], signed=True)} "
                "vs its final weights)" for a, e in arms.items()
                if e.get("eval_loss_averaged", {}).get("mean") is not None
                and e["eval_loss"]["mean"] is not None]
    if averaged:
        lines.append("Eval loss of the averaged weights (model_avg/: the final weights and the "
                     "checkpoints before them, mean over seeds): " + ", ".join(averaged) + ".")
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
    ranks = []
    for arm, entry in arms.items():
        after = entry.get("fill_mask_rank_after", {}).get("mean")
        before = entry.get("fill_mask_rank_before", {}).get("mean")
        if after is not None:
            ranks.append(f"`{arm}` {after:,.1f}" + (f" (before: {before:,.0f})"
                                                     if before is not None else ""))
    if ranks:
        lines.append("Fill-mask check, mean rank of the masked word in the vocabulary after "
                     "training (1 = the model's first choice; mean over sentences and seeds): "
                     + ", ".join(ranks) + ".")
    missing = [r for r in numbers["runs"] if r["status"] != "finished"]
    if missing:
        names = ", ".join(f"{r['arm']} seed {r['seed']} ({r['status']})" for r in missing)
        lines.append(f"{len(missing)} of {numbers['n_runs']} runs did not finish and are left "
                     f"out of every number above: {names}.")
    return lines


def _padding_sentences(arms: dict) -> list[str]:
    """A padding ablation's measurements: the mask withheld at eval, pad sensitivity."""
    lines, gaps = [], []
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


def _fill_mask_table(check: dict | None) -> list[str]:
    """Each fill-mask sentence with its masked word and every arm's top-1 after training."""
    if not check or not check.get("top1_after"):
        return []
    arms = list(check["top1_after"])
    out = ["", "## Fill-mask check", "",
           "Top-1 filler of the masked word after training (each arm's lowest seed); the answer "
           "is the word that was masked.", "",
           "| sentence | answer | " + " | ".join(f"`{a}`" for a in arms) + " |",
           "|---|---|" + "---|" * len(arms)]
    for i, sentence in enumerate(check["sentences"]):
        text = str(sentence["text"]).replace("|", "\\|")
        cells = [str(check["top1_after"][a][i]).replace("|", "\\|") for a in arms]
        out.append(f"| {text} | {sentence['answer']} | " + " | ".join(cells) + " |")
    return out


# only in a padding ablation's report (`build.PADDING_KEY`)
PADDING_COLUMNS = ("eval loss, mask withheld", "pad sensitivity")
PADDING_PLOTS = ("pad_sensitivity.png",)
AVERAGED_COLUMN = "eval loss, averaged weights"  # only where an arm averaged checkpoints
PLOTS = {  # file -> title (short: it must fit a narrow figure)
    "eval_loss.png": "Eval loss during training (mean over seeds; band: min–max)",
    "perplexity.png": "Final eval perplexity (bar: mean, dots: seeds)",
    "paired_delta.png": "Paired Δ final eval loss (◆ mean, bar: 95% CI, dots: seeds)",
    "pad_sensitivity.png": "Final pad sensitivity (bar: mean, dots: seeds)",
    "throughput.png": "Real tokens/s in training (bar: mean, dots: seeds)",
    PLOT: PLOT_TITLE,  # downstream.png: only where the runs measured downstream
}


def render_markdown(numbers: dict, plots: list[str], plot_note: str = "") -> str:
    ref, arms = numbers["reference"], numbers["arms"]
    padding = numbers.get("padding", True)
    title = "# " + ("Padding ablation report" if padding else "Ablation report") + (
        f": {numbers['name']}" if numbers["name"] else "")
    rate = numbers.get("eval_mlm_probability")
    at = f", at an eval masking rate of {rate:g} in every arm" if rate is not None else ""
    out = [title, "",
           f"{numbers['n_finished']} of {numbers['n_runs']} runs finished. Final values are the "
           f"last eval of each run (summary.json){at}; Δ is paired by seed against `{ref}` "
           "(a seed gives every arm the same data order and, at the same masking rate, the same "
           "masked positions), with a 95% t-interval.", ""]
    columns = [  # (header, cell of an arm's entry), the padding measurements in padding ablations
        ("final eval loss (mean ± sd)", lambda a, e: _mean_sd(e["eval_loss"])),
        ("perplexity", lambda a, e: _f(e["perplexity"]["mean"], 2)),
        (AVERAGED_COLUMN, lambda a, e: _f(e.get("eval_loss_averaged", {}).get("mean"))),
        ("eval loss, mask withheld", lambda a, e: _f(e["eval_loss_unmasked"]["mean"])),
        (f"paired Δ loss vs {ref} [95% CI]",
         lambda a, e: _delta(e["paired_delta_vs_reference"], a == ref)),
        ("pad sensitivity", lambda a, e: _f(e["pad_sensitivity"]["mean"])),
        ("real tokens/s", lambda a, e: _f(e["real_tokens_per_s"]["mean"], 0)),
        ("pad fraction", lambda a, e: _percent(e["pad_fraction"]["mean"])),
        ("runtime (s)", lambda a, e: _f(e["runtime_s"]["mean"], 1))]
    averaged = any(e.get("eval_loss_averaged", {}).get("n") for e in arms.values())
    columns = [c for c in columns if (padding or c[0] not in PADDING_COLUMNS)
               and (averaged or c[0] != AVERAGED_COLUMN)]
    header = ["arm", "n seeds"] + [name for name, _ in columns]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, e in arms.items():
        out.append("| " + " | ".join([f"`{arm}`", str(e["n_seeds"])]
                                     + [cell(arm, e) for _, cell in columns]) + " |")
    out += downstream_lines(numbers)
    out += ["", "## What the numbers say", ""]
    out += [f"- {line}" for line in what_the_numbers_say(numbers)] or ["- No finished runs."]
    out += _fill_mask_table(numbers.get("fill_mask"))
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
class _Figures:
    """The report's figures, each written atomically into ``out_dir`` (a reader never sees half a
    plot); `written` lists their names."""

    def __init__(self, plt, out_dir: Path):
        self.plt, self.out_dir, self.written = plt, out_dir, []

    def save(self, fig, name: str) -> None:
        fig.tight_layout()
        tmp = self.out_dir / f".{name}.tmp"
        fig.savefig(tmp, dpi=110, format=Path(name).suffix.lstrip("."))
        os.replace(tmp, self.out_dir / name)
        self.plt.close(fig)
        self.written.append(name)

    def bars(self, arms: dict, names: list[str], colors: dict, metric: str, name: str,
             ylabel: str) -> None:
        """One bar per arm (its mean) with each seed's value as a point."""
        fig, ax = self.plt.subplots(figsize=(max(4.8, 1.6 + 1.3 * len(names)), 3.8))
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
        self.save(fig, name)


def make_plots(numbers: dict, out_dir: Path) -> list[str]:
    """Write the PNGs; returns their file names. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, arms = numbers["reference"], numbers["arms"]
    names = [a for a, e in arms.items() if e["n_seeds"]]
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(arms)}
    figures = _Figures(plt, out_dir)

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
        figures.save(fig, "eval_loss.png")

    bars = [("perplexity", "perplexity.png", EVAL_PERPLEXITY),
            ("pad_sensitivity", "pad_sensitivity.png", EVAL_PAD_SENSITIVITY),
            ("real_tokens_per_s", "throughput.png", TRAIN_REAL_TOKENS_PER_S)]
    for metric, name, ylabel in bars:
        if name not in PADDING_PLOTS or numbers.get("padding", True):
            figures.bars(arms, names, colors, metric, name, ylabel)
    downstream_plot(figures, numbers, names, colors)

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
    figures.save(fig, "paired_delta.png")
    return figures.written
