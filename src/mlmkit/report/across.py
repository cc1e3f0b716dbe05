"""Several ablation reports side by side: one row per regime (a folder holding the report.json
that ``python -m mlmkit.report`` wrote), the final eval loss and every downstream measure as
paired differences to each regime's reference arm, with their 95% intervals and how many seeds
lie above zero.

    python -m mlmkit.report.across docs/ablation docs/ablation/scratch/bert \\
        --output docs/ablation/regimes.md

A folder may be given as ``LABEL=FOLDER`` to name its row (default: the report's name). Nothing
here recomputes a statistic: the cells are report.json's numbers, so the table cannot drift from
the reports it cites.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mlmkit.config.errors import DataError, exit_status
from mlmkit.config.fileio import atomic_write_text
from mlmkit.report.probing import delta_cell

PROG = "python -m mlmkit.report.across"


def read_regime(spec: str) -> tuple[str, Path, dict]:
    """``LABEL=FOLDER`` or ``FOLDER`` -> (label, folder, its report.json numbers)."""
    label, sep, folder = spec.partition("=")
    if not sep:
        label, folder = "", spec
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise DataError(f"{path}: no such file. Fix: run `python -m mlmkit.report {folder}` "
                        "first, or pass the folder that holds the report.")
    try:
        numbers = json.loads(path.read_text())
    except ValueError:
        numbers = None
    if not isinstance(numbers, dict) or not {"arms", "reference"} <= numbers.keys():
        raise DataError(f"{path}: not a report.json written by mlmkit.report. Fix: rebuild it "
                        f"with `python -m mlmkit.report {folder}`.")
    return label or numbers.get("name") or folder, Path(folder), numbers


def _above_zero(d: dict | None) -> str:
    per_seed = (d or {}).get("per_seed") or {}
    return f", {sum(v > 0 for v in per_seed.values())}/{len(per_seed)}" if per_seed else ""


def _cell(d: dict | None, digits: int) -> str:
    if not d or not d.get("n"):
        return "—"
    ci = d.get("ci95")
    excludes_zero = bool(ci) and (ci[0] > 0 or ci[1] < 0)
    text = delta_cell(d, digits)
    return (f"**{text}**" if excludes_zero else text) + _above_zero(d)


def _arms(regimes: list[tuple[str, Path, dict]]) -> list[str]:
    """The non-reference arms of every regime, in order of first appearance."""
    out: list[str] = []
    for _, _, numbers in regimes:
        out += [a for a in numbers["arms"] if a != numbers["reference"] and a not in out]
    return out


def _comparisons(regimes) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for _, _, numbers in regimes:
        out += [(c["arm"], c["against"]) for c in numbers.get("comparisons", [])
                if (c["arm"], c["against"]) not in out]
    return out


def _link(label: str, folder: Path, base: Path | None) -> str:
    if base is None:
        return label
    return f"[{label}]({Path(os.path.relpath(folder / 'report.md', base)).as_posix()})"


def render_across(regimes: list[tuple[str, Path, dict]], base: Path | None = None) -> str:
    """The markdown: an eval-loss table and, where any regime measured them, a downstream table.
    ``base``: the folder the markdown will live in (row labels link to each report.md)."""
    arms, comparisons = _arms(regimes), _comparisons(regimes)
    lines = ["# The ablation across regimes", "",
             "Written by `" + PROG + "` from each regime's report.json. Every cell is a paired "
             "difference (same seed: same data order, same masked positions) to the regime's "
             "reference arm, or to the arm its column names, with its 95% t-interval, then how "
             "many seeds lie above zero; **bold**: "
             "the interval excludes 0. For losses and pseudo-perplexity above zero is worse, "
             "for probe accuracy better.", "",
             "## Final eval loss", "",
             "| regime | seeds | reference: loss (perplexity) | "
             + " | ".join(f"`{a}` − reference" for a in arms)
             + "".join(f" | `{a}` − `{b}`" for a, b in comparisons) + " |",
             "|---|---|---|" + "---|" * (len(arms) + len(comparisons))]
    for label, folder, numbers in regimes:
        ref = numbers["reference"]
        ref_entry = numbers["arms"].get(ref, {})
        loss, ppl = ref_entry.get("eval_loss") or {}, ref_entry.get("perplexity") or {}
        ref_cell = (f"`{ref}`: {loss['mean']:.3f} ({ppl.get('mean', float('nan')):.1f})"
                    if loss.get("n") else f"`{ref}`: n/a")
        seeds = max((e.get("n_seeds", 0) for e in numbers["arms"].values()), default=0)
        cells = [_cell(numbers["arms"].get(a, {}).get("paired_delta_vs_reference"), 3)
                 for a in arms]
        by_pair = {(c["arm"], c["against"]): c["paired_delta"]
                   for c in numbers.get("comparisons", [])}
        cells += [_cell(by_pair.get(pair), 3) for pair in comparisons]
        lines.append(f"| {_link(label, folder, base)} | {seeds} | {ref_cell} | "
                     + " | ".join(cells) + " |")
    measured = [(label, folder, numbers) for label, folder, numbers in regimes
                if numbers.get("downstream")]
    if measured:
        lines += ["", "## Downstream", "",
                  "Final probe accuracies and pseudo-perplexity (the reports' Downstream "
                  "tables); the reference column is its mean over seeds, and before training "
                  "where the runs measured it then.", "",
                  "| regime | measure | reference | "
                  + " | ".join(f"`{a}` − reference" for a in arms) + " |",
                  "|---|---|---|" + "---|" * len(arms)]
        for label, folder, numbers in measured:
            ref = numbers["reference"]
            for measure in numbers["downstream"]:
                digits = 1 if measure["name"] == "pseudo_perplexity" else 3
                entry = measure["arms"].get(ref) or {}
                ref_cell = (f"`{ref}`: {entry['mean']:.{digits}f}" if entry.get("n")
                            else f"`{ref}`: n/a")
                if entry.get("step0_mean") is not None:
                    ref_cell += f" (step 0: {entry['step0_mean']:.{digits}f})"
                cells = [_cell((measure["arms"].get(a) or {}).get("paired_delta_vs_reference"),
                               digits) for a in arms]
                lines.append(f"| {_link(label, folder, base)} | {measure['label']} | "
                             f"{ref_cell} | " + " | ".join(cells) + " |")
    unmeasured = [label for label, _, numbers in regimes if not numbers.get("downstream")]
    if unmeasured:
        lines += ["", "No downstream measures in: " + ", ".join(unmeasured) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when written; 2 after one ``mlmkit: error: ... Fix: ...`` line (nothing
    written) for a folder without a readable report."""
    return exit_status(_command, argv)


def _command(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("regimes", nargs="+", metavar="[LABEL=]FOLDER",
                        help="a folder holding a report.json (python -m mlmkit.report wrote it)")
    parser.add_argument("--output", default=None,
                        help="write the markdown to this file (its row labels link to each "
                             "report.md); default: print it")
    args = parser.parse_args(argv)
    regimes = [read_regime(spec) for spec in args.regimes]
    if args.output is None:
        sys.stdout.write(render_across(regimes))
        return
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render_across(regimes, base=out.parent))
    print(f"{len(regimes)} regimes -> {out}")


if __name__ == "__main__":
    sys.exit(main())
