"""Ablations end to end: `python recipes/ablate.py --config <yaml>` launches the recipe per arm x
seed (tiny BERT, real W&B offline), skips finished runs when re-run, carries on past a failed run,
and writes the report (table, JSON, plots): padding arms with the padding measurements, and arms
of other flags (two learning rates) paired over two seeds without them. The runner's checks and
its dry run, in this process: tests/unit/test_ablate.py."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, launch_env

from mlmkit.train import tracking as M

RUNNER = ROOT / "recipes" / "ablate.py"
TAB10 = {"masked": (0x1F, 0x77, 0xB4), "unmasked": (0xFF, 0x7F, 0x0E)}  # arm colours, in arm order


def run_ablation(args: list[str], timeout: int = 480) -> subprocess.CompletedProcess:
    env = {k: v for k, v in launch_env(WANDB_MODE="offline", WANDB_SILENT="true").items()
           if not k.startswith("WANDB_") or k in ("WANDB_MODE", "WANDB_SILENT")}
    # no WANDB_DIR: the recipe puts each run's W&B folder under the run's output_dir
    return subprocess.run([sys.executable, str(RUNNER), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------- W&B's offline transaction log
def wandb_records(path: Path):
    """The protobuf Records of a .wandb file (LevelDB-log framing: 32 KiB blocks, 7-byte record
    headers, records split FIRST/MIDDLE/LAST across blocks), parsed with wandb's own protobufs.
    wandb 0.31 ships no Python reader (its internal DataStore moved to the Go core)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B transaction log"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record
        if kind in (1, 4):  # FULL/LAST end one
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run(run_dir: Path) -> dict:
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    out = {"config": {}, "history": set()}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(name=record.run.display_name, group=record.run.run_group,
                       tags=list(record.run.tags), project=record.run.project)
            out["config"].update(
                {u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            out["history"].update(i.key or "/".join(i.nested_key) for i in record.history.item)
    return out


def arm_pixels(png: Path, arm: str) -> int:
    """Pixels of exactly the arm's colour: the arm was drawn (lines, bars, dots)."""
    from PIL import Image
    image = Image.open(png).convert("RGB")
    colours = image.getcolors(image.width * image.height)  # [(count, (r, g, b)), ...]
    return sum(n for n, colour in colours if colour == TAB10[arm])


# ------------------------------------------------------------------------------------------ tests
def test_ablation_end_to_end(ablation_yaml):
    spec = yaml.safe_load(ablation_yaml.read_text())
    out = Path(spec["output_dir"])
    proc = run_ablation(["--config", str(ablation_yaml)])
    log = proc.stdout + proc.stderr
    # the broken arm fails, the others still run, and the runner says so with a non-zero exit
    assert proc.returncode == 1, log
    assert "[3/3] broken-seed0: FAILED" in proc.stdout and "1 run(s) failed: broken-seed0" in log
    assert not (out / "broken" / "seed0" / "summary.json").exists()

    for arm in ("masked", "unmasked"):
        run_dir = out / arm / "seed0"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary[M.STEP] == 4 and summary[M.TRAIN_RUNTIME] > 0
        names = set().union(*M.read_metrics(run_dir))
        assert {M.EVAL_LOSS, M.EVAL_LOSS_UNMASKED, M.EVAL_PAD_SENSITIVITY, M.EVAL_PERPLEXITY,
                M.TRAIN_REAL_TOKENS_PER_S, M.TRAIN_PAD_FRACTION, M.TRAIN_LOSS} <= names
        # the real W&B offline run: named, grouped, tagged, with the resolved config and metrics
        wb = wandb_run(run_dir)
        assert wb["name"] == f"{arm}-seed0" and wb["group"] == "abl-test"
        assert wb["tags"][:2] == [arm, "seed0"] and wb["project"] == "mlmkit"  # then the run's
        assert wb["config"]["mask_padding"] is (arm == "masked")
        assert wb["config"]["seed"] == 0 and wb["config"]["max_train_steps"] == 4
        assert {M.EVAL_LOSS, M.TRAIN_REAL_TOKENS_PER_S, M.EVAL_PAD_SENSITIVITY} <= wb["history"]

    # the report: table rows for every arm, numbers for the finished ones, the failure listed
    md = (out / "report.md").read_text()
    assert "| `masked` | 1 |" in md and "| `unmasked` | 1 |" in md and "| `broken` | 0 |" in md
    assert "[n/a: 1 seed]" in md and "1 of 3 runs did not finish" in md
    report = json.loads((out / "report.json").read_text())
    masked, unmasked = report["arms"]["masked"], report["arms"]["unmasked"]
    for entry in (masked, unmasked):
        for key in ("eval_loss", "perplexity", "eval_loss_unmasked", "pad_sensitivity",
                    "real_tokens_per_s", "pad_fraction", "runtime_s"):
            assert isinstance(entry[key]["mean"], float), key
        assert entry["curve"]["step"] == [0, 2, 4]
    delta = unmasked["paired_delta_vs_reference"]
    assert delta["n"] == 1 and delta["ci95"] is None
    assert delta["mean"] == pytest.approx(unmasked["eval_loss"]["mean"]
                                          - masked["eval_loss"]["mean"])
    assert report["arms"]["broken"]["n_seeds"] == 0
    assert report["arms"]["broken"]["not_finished"][0]["status"] == "unfinished"
    for name in ("eval_loss.png", "perplexity.png", "pad_sensitivity.png", "throughput.png"):
        png = out / name
        assert png.stat().st_size > 5000, name
        assert arm_pixels(png, "masked") > 50 and arm_pixels(png, "unmasked") > 50, name
    assert arm_pixels(out / "paired_delta.png", "unmasked") > 5

    # re-run: finished runs are skipped (untouched), only the failed one is tried again
    stamps = {arm: (out / arm / "seed0" / "summary.json").stat().st_mtime_ns
              for arm in ("masked", "unmasked")}
    proc = run_ablation(["--config", str(ablation_yaml)])
    assert proc.returncode == 1
    assert "[1/3] masked-seed0: finished earlier, skipped" in proc.stdout
    assert "[2/3] unmasked-seed0: finished earlier, skipped" in proc.stdout
    assert "[3/3] broken-seed0: running" in proc.stdout and "WARNING" not in proc.stdout
    for arm, stamp in stamps.items():
        assert (out / arm / "seed0" / "summary.json").stat().st_mtime_ns == stamp
        assert len(list((out / arm / "seed0" / "wandb").glob("offline-run-*"))) == 1
    assert (out / "broken" / "seed0" / "launch.log").read_text().count("==== exit") == 2


def test_ablation_of_any_flags(ablation_yaml, tmp_path):
    """Arms of ordinary recipe flags (two learning rates): seed 0 first, then the whole ablation
    skips it and runs seed 1; the report pairs the two seeds, leaves the padding measurements out,
    and goes with a copy of the plan to --report_dir."""
    spec = yaml.safe_load(ablation_yaml.read_text())
    out, published = tmp_path / "lr", tmp_path / "published"
    spec.update(name="lr-test", output_dir=str(out), seeds=2, arms={
        "lr_high": {"learning_rate": 3e-3}, "lr_low": {"learning_rate": 1e-4}})
    spec["recipe"].update(max_train_steps=2, report_to="none", eval_pad_sensitivity=False)
    config = tmp_path / "lr.yaml"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))

    proc = run_ablation(["--config", str(config), "--seeds", "0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stamps = {arm: (out / arm / "seed0" / "summary.json").stat().st_mtime_ns
              for arm in spec["arms"]}
    proc = run_ablation(["--config", str(config), "--report_dir", str(published)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[1/4] lr_high-seed0: finished earlier, skipped" in proc.stdout
    assert "[2/4] lr_low-seed0: finished earlier, skipped" in proc.stdout
    assert "[3/4] lr_high-seed1: running" in proc.stdout and "WARNING" not in proc.stdout
    loss = {}
    for arm, flags in spec["arms"].items():
        assert (out / arm / "seed0" / "summary.json").stat().st_mtime_ns == stamps[arm]
        for seed in (0, 1):
            run_dir = out / arm / f"seed{seed}"
            saved = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert saved["learning_rate"] == flags["learning_rate"] and saved["seed"] == seed
            assert saved["wandb_group"] == "lr-test" and saved["wandb_tags"] == [arm, f"seed{seed}"]
            loss[arm, seed] = json.loads((run_dir / "summary.json").read_text())[M.EVAL_LOSS]

    report = json.loads((published / "report.json").read_text())
    assert report["padding"] is False and report["reference"] == "lr_high"
    assert report["arm_differences"] == {"learning_rate": {"lr_high": 3e-3, "lr_low": 1e-4}}
    delta = report["arms"]["lr_low"]["paired_delta_vs_reference"]
    assert delta["per_seed"] == pytest.approx(
        {str(s): loss["lr_low", s] - loss["lr_high", s] for s in (0, 1)})
    assert delta["n"] == 2 and delta["ci95"][0] < delta["mean"] < delta["ci95"][1]
    md = (published / "report.md").read_text()
    assert md.startswith("# Ablation report: lr-test") and "| `lr_low` | 2 |" in md
    assert "mask withheld" not in md and "ad sensitivity" not in md
    assert not (published / "pad_sensitivity.png").exists()
    assert (published / "paired_delta.png").stat().st_size > 5000
    assert json.loads((published / "ablation.json").read_text())["arms"] == ["lr_high", "lr_low"]
    assert "| `lr_low` | 1 |" in (out / "report.md").read_text()  # the first one's, seed 0 only
