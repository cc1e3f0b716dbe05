"""The markdown report of benchmarks/gpu.sh: python benchmarks/gpu_report.py OUT_DIR > gpu.md

Reads OUT_DIR/throughput-*.json (benchmarks/throughput.py) and the recipe runs
OUT_DIR/recipe-*/metrics.jsonl; the recipe's steady state is the mean over its log windows after
the first two (warm-up and compilation).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SIZES = {"minilm": "MiniLM-L6 size (23M)", "bert-base": "bert-base size (110M)",
         "bert-large": "bert-large size (335M)"}


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def throughput_tables(out: Path) -> list[str]:
    lines = ["## Inner loops and the recipe's step (benchmarks/throughput.py)", "",
             "Real (non-padding) tokens/s; × = ratio to hf_baseline; MFU = model FLOPs "
             "(mlmkit.flops) / time / dense bf16 peak.", "",
             "| model | batch | hf_baseline | padded_sparse | packed | packed_sparse | recipe step "
             "| recipe / packed_sparse | packed_sparse MFU | recipe MFU | recipe ms/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    device = None
    for path in sorted(out.glob("throughput-*.json")):
        data = json.loads(path.read_text())
        device = device or data["device"]
        res = {r["mode"]: r for r in data["results"]}
        size = path.stem.split("-", 1)[1].rsplit("-", 1)[0].removesuffix("-224")
        a = data["args"]
        name = SIZES.get(size.replace("-224", ""), size)
        if a.get("torch_compile"):
            name += ", compiled"
        base = res.get("hf_baseline")

        def cell(mode):
            r = res.get(mode)
            if r is None:
                return "-"
            ratio = f" ({r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x)" if base else ""
            return f"{r['real_tokens_per_s'] / 1e3:.0f}k{ratio}"
        rec, ps = res.get("recipe"), res.get("packed_sparse")
        lines.append(
            f"| {name} | {a['batch_size']} / {a['packed_rows']} rows | {cell('hf_baseline')} | "
            f"{cell('padded_sparse')} | {cell('packed')} | {cell('packed_sparse')} | "
            f"{cell('recipe')} | "
            f"{fmt(rec and ps and rec['real_tokens_per_s'] / ps['real_tokens_per_s'], '.2f')} | "
            f"{fmt(ps and ps['mfu'], '.1%')} | {fmt(rec and rec['mfu'], '.1%')} | "
            f"{fmt(rec and rec['ms_per_step'], '.1f')} |")
    return [f"Device: {device}", ""] + lines


def recipe_table(out: Path) -> list[str]:
    lines = ["## The recipe itself (accelerate launch recipes/mlm.py, bf16, 72 packed rows of 128)",
             "", "Steady state: the mean over the log windows (10 steps each) after the first two.",
             "", "| model | compile | real tokens/s | train/tflops | train/mfu | "
             "data wait | peak mem (GB) | eval loss first -> last |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for run in sorted(p for p in out.glob("recipe-*") if p.is_dir()):
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        windows = [m for m in metrics if "train/loss" in m][2:]
        evals = [m["eval/loss"] for m in metrics if "eval/loss" in m]
        if not windows:
            continue

        def mean(key):
            vals = [w[key] for w in windows if w.get(key) is not None]
            return sum(vals) / len(vals) if vals else None
        size, compile_ = run.name.removeprefix("recipe-").split("-compile-")
        lines.append(
            f"| {SIZES.get(size, size)} | {compile_} | {mean('train/real_tokens_per_s'):.0f} | "
            f"{fmt(mean('train/tflops'), '.1f')} | {fmt(mean('train/mfu'), '.1%')} | "
            f"{fmt(mean('train/data_wait_fraction'), '.1%')} | "
            f"{fmt(mean('sys/peak_mem_gb'), '.1f')} | {evals[0]:.3f} -> {evals[-1]:.3f} |")
    return lines


def main() -> None:
    out = Path(sys.argv[1])
    print("\n".join(["# GPU benchmarks (benchmarks/gpu.sh)", "", *throughput_tables(out), "",
                     *recipe_table(out)]))


if __name__ == "__main__":
    main()
