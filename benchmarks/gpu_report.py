"""The markdown report of a GPU session: python benchmarks/gpu_report.py OUT_DIR > gpu.md

Reads what benchmarks/gpu.sh (or its earlier version) left in OUT_DIR, whatever of it exists:
check-*.json (benchmarks/gpu_checks.py), status.txt (each run's exit status and seconds),
throughput-*.json (benchmarks/throughput.py) and the recipe runs recipe-*/ (metrics.jsonl,
summary.json). Runs are named ``recipe-<size>-<width>x<rows>-<graphed|eager>`` and
``throughput-<size>-<width>x<rows>[-eager]`` (size: a BERT size, or a `throughput.py --shape`;
gpu.sh's older names are listed as they are).
The recipe's steady state is the mean over its log windows after the first two (compilation,
CUDA-graph recording and warm-up; the warm-up's time is also in summary.json as
``train/compile_seconds``); with fewer windows, the last one, marked.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

SIZES = {"minilm": "MiniLM-L6 size (23M)", "bert-base": "bert-base size (110M)",
         "bert-large": "bert-large size (335M)", "modernbert": "ModernBERT shape (scaled down)",
         "esm2": "ESM-2 8M shape", "deberta-v3": "DeBERTa-v3 shape (scaled down)"}
NAME = re.compile(r"^(recipe|throughput)-(minilm|bert-base|bert-large|modernbert|esm2|deberta-v3)"
                  r"-(\d+)x(\d+)(?:-(\w+))?$")


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def parse(name: str):
    """(kind, size, width, rows, variant) of a run's name, or None."""
    m = NAME.match(name)
    return (m[1], m[2], int(m[3]), int(m[4]), m[5] or "") if m else None


def throughputs(out: Path) -> dict:
    """{(size, width, rows, variant): throughput.py's JSON}."""
    found = {}
    for path in sorted(out.glob("throughput-*.json")):
        data, key = read_json(path), parse(path.stem)
        if data and key:
            found[key[1:]] = data
        elif data:
            found[(path.stem, 0, 0, "")] = data
    return found


def mode(data, name):
    return next((r for r in (data or {}).get("results", []) if r["mode"] == name), None)


def recipe_steady(run: Path) -> dict | None:
    metrics = []
    for line in (run / "metrics.jsonl").read_text().splitlines() if (
            run / "metrics.jsonl").is_file() else []:
        try:
            metrics.append(json.loads(line))
        except ValueError:
            pass
    windows = [m for m in metrics if "train/loss" in m]
    if not windows:
        return None
    steady = windows[2:] or windows[-1:]

    def mean(key):
        vals = [w[key] for w in steady if w.get(key) is not None]
        return sum(vals) / len(vals) if vals else None
    evals = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    summary = read_json(run / "summary.json") or {}
    return {"real": mean("train/real_tokens_per_s"), "tflops": mean("train/tflops"),
            "mfu": mean("train/mfu"), "wait": mean("train/data_wait_fraction"),
            "busy": mean("train/gpu_busy_fraction"),
            "mem": mean("sys/peak_mem_gb"), "warm_included": len(windows) <= 2,
            "compile_s": summary.get("train/compile_seconds"),
            "attn": summary.get("probe/attn_implementation"),
            "evals": f"{evals[0]:.3f} -> {evals[-1]:.3f}" if evals else "n/a"}


def check_line(label: str, result: dict | None, describe) -> str:
    """One check's line: not run, skipped, an error, or ``label`` + ``describe(result)``."""
    if result is None:
        return f"- {label}: not run"
    if "skipped" in result:
        return f"- {label}: skipped ({result['skipped']})"
    if "error" in result:
        return f"- {label}: **error** {result['error']}"
    return f"- {label} {describe(result)}"


def describe_varlen(varlen: dict) -> str:
    parts = [f"{n}: hidden {varlen[n]['hidden_rel_err']:.2e}, loss "
             f"{varlen[n]['loss_rel_err']:.2e}, grad {varlen[n]['grad_rel_err']:.2e}"
             for n in ("block", "varlen", "varlen_static")]
    ms = [f"{n} {varlen[n].get('ms_fwd_bwd', 0):.1f} ms" for n in ("block", "varlen_static")]
    parts.append(f"training with attention dropout (flash op: {varlen.get('dropout_kernel')}): "
                 f"{'ok' if varlen.get('dropout_ok') else '**FAILED**'}, loss "
                 f"{varlen['varlen_static'].get('train_loss', float('nan')):.4f} vs block "
                 f"{varlen['block'].get('train_loss', float('nan')):.4f}")
    return (f"({varlen['rows']} rows of {varlen['width']}, {varlen['segments']} segments, padded "
            f"to {varlen['static_segments']}; relative error vs fp32 block mask): "
            f"{'ok' if varlen['ok'] else '**FAILED**'}; {'; '.join(parts)}; forward+backward "
            f"{', '.join(ms)}")


def describe_graphed(graphed: dict) -> str:
    return (f"({graphed['attn_implementation']}, {len(graphed['eager'])} steps, bf16 losses): "
            f"{'ok' if graphed['ok'] else '**FAILED**'}; max relative loss difference "
            f"{max(graphed['rel_err']):.2e} (tolerance {graphed['tolerance']}); eager "
            f"{graphed['eager_seconds']:.0f} s, graphed {graphed['graphed_seconds']:.0f} s incl. "
            "compilation")


def checks_section(out: Path) -> list[str]:
    lines = ["## Correctness checks on the device", "",
             check_line("varlen vs dense block mask", read_json(out / "check-varlen.json"),
                        describe_varlen),
             check_line("graphed step vs eager step", read_json(out / "check-graphed.json"),
                        describe_graphed)]
    status = (out / "status.txt").read_text() if (out / "status.txt").is_file() else ""
    sync = [line for line in status.splitlines() if line.startswith("pytest-step-sync")]
    direct = read_json(out / "check-sync.json")
    if direct and "variants" in direct:
        sync.append(f"run directly (no pytest): {direct['variants']}")
    elif direct and "error" in direct:
        sync.append(f"run directly (no pytest): **error** {direct['error']}")
    lines.append(f"- tests/unit/train/test_step_sync.py on CUDA: {sync[-1] if sync else 'not run'}")
    return lines


def recipe_section(out: Path, tp: dict) -> list[str]:
    lines = ["## The recipe (accelerate launch recipes/mlm.py, one process)", "",
             "Steady state: log windows of 10 steps after the first two. × hf = real tokens/s "
             "over hf_baseline's at the same width (throughput.py, same run folder); recipe / "
             "inner = over the inner loop's packed_sparse (same shape, same compile mode).", "",
             "| model | width x rows | step | attention | real tokens/s | TFLOP/s | MFU | "
             "× hf | recipe / inner | data wait | GPU busy | compile s | peak GB | eval loss |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for run in sorted(p for p in out.glob("recipe-*") if p.is_dir()):
        res, key = recipe_steady(run), parse(run.name)
        if res is None:
            lines.append(f"| {run.name} | - | - | - | no log window | | | | | | | | | |")
            continue
        size, width, rows, variant = key[1:] if key else (run.name, 0, 0, "")
        data = tp.get((size, width, rows, "")) or tp.get((size, width, rows, "eager"))
        base, inner = mode(data, "hf_baseline"), mode(data, "packed_sparse")
        if variant == "eager":  # only an eager inner loop compares (none: no ratio)
            inner = mode(tp.get((size, width, rows, "eager")), "packed_sparse")
        real = res["real"]
        lines.append(
            f"| {SIZES.get(size, size)} | {width} x {rows} | {variant or '-'} | "
            f"{res['attn'] or '?'} | {fmt(real, '.0f')}{' (warm-up in)' if res['warm_included'] else ''}"
            f" | {fmt(res['tflops'], '.1f')} | {fmt(res['mfu'], '.1%')} | "
            f"{fmt(base and real and real / base['real_tokens_per_s'], '.2f')} | "
            f"{fmt(inner and real and real / inner['real_tokens_per_s'], '.3f')} | "
            f"{fmt(res['wait'], '.1%')} | {fmt(res['busy'], '.2f')} | "
            f"{fmt(res['compile_s'], '.0f')} | "
            f"{fmt(res['mem'], '.1f')} | {res['evals']} |")
    return lines


def throughput_section(tp: dict) -> list[str]:
    lines = ["## Inner loops (benchmarks/throughput.py)", "",
             "Real (non-padding) tokens/s (× = over hf_baseline), MFU = model FLOPs "
             "(mlmkit.model.flops) / time / dense bf16 peak, ms per step.", "",
             "| model | width x rows (examples) | compile | mode | real tokens/s | × hf | MFU | "
             "ms/step | peak GB |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for (size, width, rows, variant), data in sorted(tp.items()):
        a = data.get("args", {})
        compiled = (a.get("torch_compile_mode") or "default") if a.get("torch_compile") \
            else "eager"
        for r in data.get("results", []):
            lines.append(
                f"| {SIZES.get(size, size)} | {a.get('max_seq_length')} x "
                f"{a.get('packed_rows')} ({a.get('batch_size')}) | "
                f"{'eager' if r['mode'] == 'hf_baseline' else compiled} | {r['mode']} | "
                f"{r['real_tokens_per_s']:.0f} | {fmt(r.get('ratio_vs_baseline'), '.2f')} | "
                f"{fmt(r.get('mfu'), '.1%')} | {r['ms_per_step']:.1f} | "
                f"{fmt(r.get('peak_mem_gb'), '.1f')} |")
    return lines


def main() -> None:
    out = Path(sys.argv[1])
    tp = throughputs(out)
    device = next((d["device"] for d in tp.values() if d.get("device")), None)
    for name in ("check-varlen.json", "check-graphed.json"):
        device = device or (read_json(out / name) or {}).get("device")
    status = (out / "status.txt").read_text().strip() if (out / "status.txt").is_file() else ""
    print("\n".join(["# GPU benchmarks (benchmarks/gpu.sh)", "",
                     f"Device: {device or 'unknown'}", "", *checks_section(out), "",
                     *recipe_section(out, tp), "", *throughput_section(tp), "",
                     "## Runs (status.txt)", "", "```", status, "```"]))


if __name__ == "__main__":
    main()
