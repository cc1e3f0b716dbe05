"""checkpoint.py without processes: the train state, validating and finding the newest complete
checkpoint, retention (checkpoint folders faked by helpers.make_checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_checkpoint

from mlmkit.train import checkpoint as C


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


def test_train_state_round_trips_exactly():
    window = C.RunningStats(computed=40, real=30, masked=7, loss_sum=0.1 + 0.2, seconds=1 / 7)
    state = C.TrainState(step=5, epoch=1, step_in_epoch=2, window=window,
                         first_eval={"eval/loss": 1 / 3}, wandb_run_id="abc",
                         launch={"num_processes": 2, "distributed_type": "MULTI_CPU"})
    again = C.TrainState.from_dict(json.loads(json.dumps({**state.to_dict(), "future_key": 1})))
    assert again == state


def test_running_stats_count_tokens_and_weigh_the_loss_by_masked_tokens():
    stats = C.RunningStats()
    stats.add_data(computed=16, real=12, flops=3e12, data_wait=0.25)
    stats.add_data(computed=16, real=0)  # a dummy step: computed, not real
    stats.add_step(loss=2.0, masked=3, seconds=0.5)
    stats.add_step(loss=1.0, masked=1, seconds=0.5)
    assert stats.mean_loss() == pytest.approx((2.0 * 3 + 1.0) / 4)
    rates = stats.rates(num_processes=2)
    assert rates["train/tokens_per_s"] == 64 and rates["train/real_tokens_per_s"] == 24
    assert rates["train/pad_fraction"] == pytest.approx(1 - 12 / 32)
    assert rates["train/data_wait_fraction"] == pytest.approx(0.25)
    assert rates["train/tflops"] == pytest.approx(3.0) and "train/mfu" not in rates  # no peak
    assert stats.rates(2, peak_tflops=10.0)["train/mfu"] == pytest.approx(0.3)
