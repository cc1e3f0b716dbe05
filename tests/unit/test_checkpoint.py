"""checkpoint.py helpers without processes: finding the newest complete checkpoint, retention,
output-folder checks, metrics.jsonl truncation and the stop signal."""

from __future__ import annotations

import json
import os
import signal
import types
from pathlib import Path

import pytest

from mlmkit import checkpoint as C
from mlmkit.config import ConfigError, MLMConfig, save_config


def make_checkpoint(out: Path, step: int, *, complete: bool = True, **state) -> Path:
    """A checkpoint folder as save_checkpoint leaves it (weights faked by a few bytes)."""
    folder = out / C.CHECKPOINTS / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * (100 + step))
    (folder / "random_states_0.pkl").write_bytes(b"r" * 10)
    (folder / C.STATE_FILE).write_text(json.dumps(C.TrainState(step=step, **state).to_dict()))
    if complete:
        C.write_marker(folder, step)
    return folder


def config(out: Path, **kw) -> MLMConfig:
    return MLMConfig(output_dir=str(out), report_to="none", **kw)


# ------------------------------------------------------------------------------ finding
def test_validate_names_what_is_wrong(tmp_path):
    good = make_checkpoint(tmp_path, 2)
    assert C.validate_checkpoint(good) is None
    assert "marker" in C.validate_checkpoint(make_checkpoint(tmp_path, 4, complete=False))

    truncated = make_checkpoint(tmp_path, 6)
    (truncated / "model.safetensors").write_bytes(b"w" * 5)
    assert "model.safetensors is truncated" in C.validate_checkpoint(truncated)

    missing = make_checkpoint(tmp_path, 8)
    (missing / "random_states_0.pkl").unlink()
    assert "random_states_0.pkl is missing" in C.validate_checkpoint(missing)

    garbled = make_checkpoint(tmp_path, 10)
    (garbled / C.MARKER).write_text("{not json")
    assert "unreadable completion marker" in C.validate_checkpoint(garbled)

    bad_state = make_checkpoint(tmp_path, 12)
    (bad_state / C.STATE_FILE).write_text("[1, 2" + " " * (len((bad_state / C.STATE_FILE)
                                                                .read_text()) - 5))
    assert "trainer_state.json is unreadable" in C.validate_checkpoint(bad_state)
    assert C.validate_checkpoint(tmp_path / "nope") == "not a folder"


def test_newest_complete_checkpoint_skips_broken_ones_with_a_warning(tmp_path):
    assert C.newest_complete_checkpoint(tmp_path) == (None, [])
    make_checkpoint(tmp_path, 3)
    second = make_checkpoint(tmp_path, 10)  # 10 > 9: steps sort as numbers, not strings
    broken = make_checkpoint(tmp_path, 12)
    (broken / "model.safetensors").unlink()
    unmarked = make_checkpoint(tmp_path, 15, complete=False)
    (tmp_path / C.CHECKPOINTS / ".tmp-checkpoint-18").mkdir()  # a save killed half-way
    (tmp_path / C.CHECKPOINTS / "notes").mkdir()
    path, warnings = C.newest_complete_checkpoint(tmp_path)
    assert path == second
    assert len(warnings) == 2
    assert str(unmarked) in warnings[0] and "marker" in warnings[0]
    assert str(broken) in warnings[1] and "model.safetensors is missing" in warnings[1]
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [3, 10, 12, 15]


# ------------------------------------------------------------------------------ retention
def test_retention_keeps_the_newest_complete_ones():
    P = Path
    entries = [(2, P("c2"), True), (4, P("c4"), True), (6, P("c6"), False), (8, P("c8"), True),
               (10, P("c10"), False)]
    # limit 2: keep 4 and 8; delete 2 and the broken 6 (older than the newest complete);
    # the broken 10 is newer than every complete one: left alone (a later save replaces it)
    assert C.checkpoints_to_delete(entries, 2) == [P("c2"), P("c6")]
    assert C.checkpoints_to_delete(entries, 1) == [P("c2"), P("c4"), P("c6")]
    assert C.checkpoints_to_delete(entries, None) == []
    assert C.checkpoints_to_delete(entries, 10) == [P("c6")]
    # the newest complete checkpoint survives whatever the limit, even when newer ones are broken
    only_broken_after = [(2, P("c2"), True), (4, P("c4"), False)]
    assert C.checkpoints_to_delete(only_broken_after, 1) == []
    assert C.checkpoints_to_delete([(4, P("c4"), False)], 1) == []


# ------------------------------------------------------------------------------ output folder
def test_config_differences_ignore_keys_that_do_not_change_results():
    base = MLMConfig().to_dict()
    same = {**base, "logging_steps": 99, "report_to": "none", "run_name": "x", "wandb_tags": ["a"],
            "checkpointing_steps": 7, "save_total_limit": 1, "resume_from_checkpoint": "none",
            "overwrite_output_dir": True, "progress_bar": False, "eval_steps": 3}
    assert C.config_differences(base, same) == []
    diffs = C.config_differences(base, {**base, "learning_rate": 1e-3, "seed": 1})
    assert len(diffs) == 2 and diffs[0].startswith("learning_rate: 5e-05 there, 0.001 now")
    # a key an older mlmkit did not write counts as its default
    old = {k: v for k, v in base.items() if k != "whole_word_mask"}
    assert C.config_differences(old, base) == []
    assert "whole_word_mask" in C.config_differences(old, {**base, "whole_word_mask": True})[0]


def test_check_output_dir_fresh_resume_and_refusals(tmp_path):
    out = tmp_path / "run"
    assert C.check_output_dir(config(out)).checkpoint is None  # nothing there: fresh

    out.mkdir()
    save_config(config(out, learning_rate=1e-4), out / "config.yaml")
    # same settings (logging frequency aside), no checkpoint yet: fresh start
    plan = C.check_output_dir(config(out, learning_rate=1e-4, logging_steps=1))
    assert plan.checkpoint is None and not plan.wipe

    make_checkpoint(out, 4)
    newest = make_checkpoint(out, 8, epoch=1, step_in_epoch=3)
    plan = C.check_output_dir(config(out, learning_rate=1e-4))
    assert plan.checkpoint == newest and plan.state.step == 8 and plan.state.step_in_epoch == 3

    with pytest.raises(ConfigError, match=r"different settings \(learning_rate: 0.0001 there, "
                                          r"0.001 now\).*--overwrite_output_dir true"):
        C.check_output_dir(config(out, learning_rate=1e-3))
    with pytest.raises(ConfigError, match="unfinished run.*checkpoint-8.*auto"):
        C.check_output_dir(config(out, learning_rate=1e-4, resume_from_checkpoint="none"))

    explicit = config(out, learning_rate=1e-4, resume_from_checkpoint=str(out / "checkpoints" /
                                                                          "checkpoint-4"))
    assert C.check_output_dir(explicit).state.step == 4
    (out / "checkpoints" / "checkpoint-4" / C.MARKER).unlink()
    with pytest.raises(ConfigError, match="not a complete checkpoint.*marker"):
        C.check_output_dir(explicit)

    wipe = C.check_output_dir(config(out, learning_rate=1e-3, overwrite_output_dir=True))
    assert wipe.wipe and wipe.checkpoint is None
    with pytest.raises(ConfigError, match="drop one"):  # resume from a folder it would delete
        C.check_output_dir(config(out, overwrite_output_dir=True,
                                  resume_from_checkpoint=str(newest)))

    (out / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"finished run \(summary.json\).*--overwrite_output_dir"):
        C.check_output_dir(config(out, learning_rate=1e-4))


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
    C.prepare_output_dir(cfg, C.check_output_dir(cfg))  # resumes from checkpoint-4
    assert not stale.exists()
    kept = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in kept] == [0, 2, 4]
    assert (out / "config.yaml").exists()

    for name in ("summary.json", "metrics.jsonl"):
        (out / name).write_text("{}\n")
    (out / "model").mkdir()
    wipe = config(out, overwrite_output_dir=True, seed=3)
    C.prepare_output_dir(wipe, C.check_output_dir(wipe))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_train_state_round_trips_exactly():
    state = C.TrainState(step=5, epoch=1, step_in_epoch=2, window_loss=0.1 + 0.2, window_masked=7,
                         first_eval={"eval/loss": 1 / 3}, wandb_run_id="abc",
                         launch={"num_processes": 2, "distributed_type": "MULTI_CPU"})
    again = C.TrainState.from_dict(json.loads(json.dumps({**state.to_dict(), "future_key": 1})))
    assert again == state


def test_check_launch_refuses_another_process_count(tmp_path):
    accelerator = types.SimpleNamespace(num_processes=1, distributed_type="NO")
    state = C.TrainState(launch={"num_processes": 2, "distributed_type": "MULTI_CPU"})
    with pytest.raises(ConfigError, match="num_processes"):
        C.check_launch(C.ResumePlan(tmp_path, state), accelerator)
    C.check_launch(C.ResumePlan(tmp_path, C.TrainState(launch=C.launch_signature(accelerator))),
                   accelerator)


# ------------------------------------------------------------------------------ signals
def test_stop_signal_sets_a_flag_instead_of_killing():
    accelerator = types.SimpleNamespace(num_processes=1)
    before = signal.getsignal(signal.SIGTERM)
    stopper = C.StopSignal().install()
    try:
        assert not stopper.agreed(accelerator)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt either
        assert stopper.received == "SIGTERM" and stopper.agreed(accelerator)
    finally:
        stopper.restore()
    assert signal.getsignal(signal.SIGTERM) == before
