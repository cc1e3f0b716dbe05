"""rundir.py without processes: fresh start, resume or refuse; cleaning and metrics truncation.
(The config comparison it relies on: test_config.py; the launch check: test_distributed.py.)"""

from __future__ import annotations

import json

import pytest
from helpers import make_checkpoint
from helpers import run_config as config

from mlmkit.config.errors import ConfigError
from mlmkit.config.parse import save_config
from mlmkit.train import checkpoint as C
from mlmkit.train import rundir as R


def test_check_output_dir_fresh_resume_and_refusals(tmp_path):
    out = tmp_path / "run"
    assert R.check_output_dir(config(out)).checkpoint is None  # nothing there: fresh

    out.mkdir()
    save_config(config(out, learning_rate=1e-4), out / "config.yaml")
    # same settings (logging frequency aside), no checkpoint yet: fresh start
    plan = R.check_output_dir(config(out, learning_rate=1e-4, logging_steps=1))
    assert plan.checkpoint is None and not plan.wipe

    make_checkpoint(out, 4)
    newest = make_checkpoint(out, 8, epoch=1, step_in_epoch=3)
    plan = R.check_output_dir(config(out, learning_rate=1e-4))
    assert plan.checkpoint == newest and plan.state.step == 8 and plan.state.step_in_epoch == 3

    with pytest.raises(ConfigError, match=r"different settings \(learning_rate: 0.0001 there, "
                                          r"0.001 now\).*--overwrite_output_dir true"):
        R.check_output_dir(config(out, learning_rate=1e-3))
    with pytest.raises(ConfigError, match="unfinished run.*checkpoint-8.*auto"):
        R.check_output_dir(config(out, learning_rate=1e-4, resume_from_checkpoint="none"))

    explicit = config(out, learning_rate=1e-4, resume_from_checkpoint=str(out / "checkpoints" /
                                                                          "checkpoint-4"))
    assert R.check_output_dir(explicit).state.step == 4
    (out / "checkpoints" / "checkpoint-4" / C.MARKER).unlink()
    with pytest.raises(ConfigError, match="not a complete checkpoint.*marker"):
        R.check_output_dir(explicit)

    wipe = R.check_output_dir(config(out, learning_rate=1e-3, overwrite_output_dir=True))
    assert wipe.wipe and wipe.checkpoint is None
    with pytest.raises(ConfigError, match="drop one"):  # resume from a folder it would delete
        R.check_output_dir(config(out, overwrite_output_dir=True,
                                  resume_from_checkpoint=str(newest)))

    (out / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"finished run \(summary.json\).*--overwrite_output_dir"):
        R.check_output_dir(config(out, learning_rate=1e-4))


def test_prepare_output_dir_wipes_cleans_and_truncates(tmp_path):
    out = tmp_path / "run"
    make_checkpoint(out, 4)
    stale = out / C.CHECKPOINTS / ".tmp-checkpoint-6"
    stale.mkdir()
    (stale / "x").write_text("partial")
    lines = [{"step": 0, "eval/loss": 3.0}, {"step": 2, "train/loss": 2.0},
             {"step": 4, "train/loss": 1.5}, {"step": 6, "train/loss": 1.0}]
    cut = '{"step": 8, "tr'  # the line a kill interrupted
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + cut)
    cfg = config(out)
    R.prepare_output_dir(cfg, R.check_output_dir(cfg))  # resumes from checkpoint-4
    assert not stale.exists()
    kept = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in kept] == [0, 2, 4]
    assert (out / "config.yaml").exists()

    for name in ("summary.json", "metrics.jsonl"):
        (out / name).write_text("{}\n")
    (out / "model").mkdir()
    wipe = config(out, overwrite_output_dir=True, seed=3)
    R.prepare_output_dir(wipe, R.check_output_dir(wipe))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
