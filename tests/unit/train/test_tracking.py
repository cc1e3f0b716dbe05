"""tracking.py: a tracker never ends a run. MetricsLog guards every tracker call (a failure is
one warning line; metrics.jsonl keeps every record), holds records while a stop saves, and
start_tracking goes offline or on without trackers; W&B goes offline when its server does not
answer. With a real Accelerator and Accelerate's own tracker interface (a tracker of ours that
fails as W&B's does); W&B itself is launched for real in tests/integration/test_tracking_launch.py.
What W&B records of a run (its x-axes, name, tags and summary) is read back from a real offline
W&B run's transaction log, started here in process.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from helpers import isolated_globals, wandb_records

from mlmkit.config.parse import parse_config
from mlmkit.train import tracking as M
from mlmkit.train.checkpoint import TrainState


class Recorder(GeneralTracker):
    """A tracker that records what it gets and raises ``error`` from ``fail`` on."""
    name = "recorder"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, run_name: str = "r", fail: str | None = None, at_step: int = 0,
                 error: Exception = ConnectionResetError("Connection lost")):
        super().__init__()
        self.fail, self.at_step, self.error = fail, at_step, error
        self.logged, self.finished = [], False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict):
        if self.fail == "init":
            raise self.error

    def log(self, values: dict, step: int | None = None, **kwargs):
        if self.fail == "log" and step >= self.at_step:
            raise self.error
        self.logged.append(step)

    def finish(self):
        if self.fail == "finish":
            raise self.error
        self.finished = True


@pytest.fixture
def accelerator(tmp_path):
    with isolated_globals():
        yield Accelerator(cpu=True, project_dir=str(tmp_path))


def test_a_failing_tracker_is_one_warning_and_metrics_jsonl_keeps_everything(
        accelerator, tmp_path, capsys):
    bad, good = Recorder(fail="log", at_step=3), Recorder()
    bad.name = "bad"
    accelerator.trackers = [bad, good]
    log = M.MetricsLog(accelerator, tmp_path, {"bad": "local", "recorder": "local"})
    for step in range(1, 7):
        log.log({M.TRAIN_LOSS: 1.0 / step}, step)
    log.finish()

    assert [r[M.STEP] for r in M.read_metrics(tmp_path)] == list(range(1, 7))
    assert bad.logged == [1, 2] and good.logged == list(range(1, 7))  # the other goes on
    assert good.finished and not bad.finished and accelerator.trackers == []
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("mlmkit: warning: the bad tracker failed at step 3 "
                                  "(ConnectionResetError: Connection lost)")
    assert str(tmp_path / "metrics.jsonl") in warnings[0]
    assert log.summary() == {M.TRACKERS_RAN: {
        "bad": "failed at step 3 (ConnectionResetError: Connection lost)", "recorder": "local"}}


def test_a_stop_holds_the_trackers_until_its_checkpoint_is_written(accelerator, tmp_path):
    tracker = Recorder()
    accelerator.trackers = [tracker]
    log = M.MetricsLog(accelerator, tmp_path)
    log.log({M.TRAIN_LOSS: 1.0}, 1)
    log.hold()
    log.log({M.TRAIN_LOSS: 0.5}, 2)
    assert tracker.logged == [1]  # held ...
    assert [r[M.STEP] for r in M.read_metrics(tmp_path)] == [1, 2]  # ... but on disk at once
    log.release()
    assert tracker.logged == [1, 2]


def test_a_failure_at_the_end_is_a_warning_too(accelerator, tmp_path, capsys):
    accelerator.trackers = [Recorder(fail="finish", error=OSError(28, "No space left on device"))]
    log = M.MetricsLog(accelerator, tmp_path)
    log.finish()
    assert "failed at the end (OSError: [Errno 28] No space left on device)" in \
        log.summary()[M.TRACKERS_RAN]["recorder"]
    assert capsys.readouterr().err.count("mlmkit: warning:") == 1


def test_trackers_that_fail_to_start_leave_the_run_going(tmp_path, capsys, monkeypatch):
    cfg = parse_config(["--output_dir", str(tmp_path), "--report_to", "none"])
    with isolated_globals():
        accelerator = Accelerator(cpu=True, project_dir=str(tmp_path),
                                  log_with=[Recorder(fail="init")])
        log = M.start_tracking(accelerator, cfg, ["recorder"], TrainState(), {})
        assert accelerator.trackers == []
        assert log.status["recorder"].startswith("failed to start (ConnectionResetError")
        out = capsys.readouterr().out
        assert "warning: the trackers (recorder) failed to start" in out
        log.log({M.TRAIN_LOSS: 1.0}, 1)
        assert [r[M.STEP] for r in M.read_metrics(tmp_path)] == [1]


def test_wandb_goes_offline_without_a_key_or_a_server(tmp_path):
    with mock.patch.dict(os.environ):  # every variable set here is undone afterwards
        for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_BASE_URL",
                    "WANDB_SILENT"):
            os.environ.pop(key, None)
        os.environ["NETRC"] = str(tmp_path / "no-netrc")
        os.environ["HOME"] = str(tmp_path)  # no ~/.netrc with a key

        notice = M.setup_wandb_env(str(tmp_path))
        assert os.environ["WANDB_MODE"] == "offline"
        assert notice.startswith("W&B: no API key found; logging offline under")

        del os.environ["WANDB_MODE"]
        os.environ["WANDB_API_KEY"] = "f" * 40
        os.environ["WANDB_BASE_URL"] = "http://127.0.0.1:9"  # nothing listens there
        notice = M.setup_wandb_env(str(tmp_path))
        assert os.environ["WANDB_MODE"] == "offline"
        assert "http://127.0.0.1:9 unreachable (NewConnectionError" in notice
        assert "wandb sync" in notice and "\n" not in notice

        del os.environ["WANDB_MODE"]
        assert M.setup_wandb_env(str(tmp_path), main_process=False) is None  # the main probes
        os.environ["WANDB_MODE"] = "offline"
        assert M.setup_wandb_env(str(tmp_path)) is None
    assert "WANDB_DIR" not in os.environ or os.environ["WANDB_DIR"] != str(tmp_path)


def test_every_record_carries_the_examples_and_tokens_seen(accelerator, tmp_path):
    """The x-axes of a run: on train and eval records alike, as the train state holds them."""
    state, tracker = TrainState(), Recorder()
    accelerator.trackers = [tracker]
    log = M.MetricsLog(accelerator, tmp_path, seen=state)
    log.log({M.EVAL_LOSS: 5.0}, 0)
    state.examples_seen, state.tokens_seen = 8, 300
    log.log({M.TRAIN_LOSS: 4.0}, 1)
    log.log({M.EVAL_LOSS: 3.0}, 1)
    assert [(r[M.STEP], r[M.TRAIN_EXAMPLES_SEEN], r[M.TRAIN_TOKENS_SEEN])
            for r in M.read_metrics(tmp_path)] == [(0, 0, 0), (1, 8, 300), (1, 8, 300)]
    restored = TrainState.from_dict(state.to_dict())  # a checkpoint's trainer_state.json
    assert (restored.examples_seen, restored.tokens_seen) == (8, 300)


def test_run_name_and_tags(tmp_path):
    cfg = parse_config(["--output_dir", str(tmp_path / "runs" / "lr3e-4/"), "--wandb_tags", "a",
                        "model:bert"])
    assert M.run_name(cfg) == "lr3e-4"  # the output folder's name by default
    assert M.run_tags(cfg, {"padding_resolved": "packed", "model_type": "bert", "x": 1}) == [
        "a", "model:bert", "padding:packed"]  # each once
    assert M.run_tags(cfg) == ["a", "model:bert"]
    cfg = parse_config(["--run_name", "packed-seed0", "--wandb_group", "g"])
    kwargs = M.tracker_init_kwargs(cfg, None, {"padding_resolved": "longest"})
    assert (kwargs["wandb"]["name"], kwargs["wandb"]["group"], kwargs["wandb"]["tags"]) == (
        "packed-seed0", "g", ["padding:longest"])
    assert kwargs["trackio"] == {"name": "packed-seed0", "group": "g"}


def test_wandb_summary_is_summary_json_flattened():
    summary = {M.EVAL_LOSS: 3.0, M.FIRST_EVAL_LOSS: 5.0, M.STEP: 2, M.PADDING: "packed",
               M.TRAIN_MFU: None, M.EVAL_PERPLEXITY: float("inf"), "ok": True,
               M.DATA_SOURCE_TOKENS: {"a.txt": 3, "b.txt": 4}, "probe": {"k": {"acc": 0.5}},
               M.FILL_MASK: [{"text": "x"}], M.TRACKERS_RAN: {"wandb": "offline"}}
    assert M.wandb_summary(summary) == {
        M.EVAL_LOSS: 3.0, M.FIRST_EVAL_LOSS: 5.0, M.STEP: 2, M.PADDING: "packed", "ok": True,
        f"{M.DATA_SOURCE_TOKENS}/a.txt": 3, f"{M.DATA_SOURCE_TOKENS}/b.txt": 4,
        "probe/k/acc": 0.5, "trackers/wandb": "offline"}


def summary_of(records: dict) -> dict:
    """W&B's summary of a run as its transaction log leaves it (the updates, last wins)."""
    import json
    merged = {}
    for summary in records.get("summary", []):
        for item in summary.update:
            merged[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return merged


def test_wandb_records_the_axes_name_tags_and_summary(tmp_path):
    """A real offline W&B run, started in this process as the recipe starts it: its transaction
    log holds the seen axes as step metrics and every metric against train/tokens_seen, the run's
    name (the output folder's) and tags, every record's x-axes and summary.json's numbers."""
    out = tmp_path / "my-run"
    out.mkdir()
    cfg = parse_config(["--output_dir", str(out), "--report_to", "wandb", "--wandb_tags", "a"])
    with isolated_globals():
        os.environ["WANDB_MODE"] = "offline"
        accelerator = Accelerator(cpu=True, project_dir=str(out), log_with="wandb")
        state = TrainState()
        log = M.start_tracking(accelerator, cfg, ["wandb"], state,
                               {"padding_resolved": "packed", "model_type": "bert"})
        assert log.status == {"wandb": "offline"}
        log.log({M.EVAL_LOSS: 5.0}, 0)
        state.examples_seen, state.tokens_seen = 8, 300
        log.log({M.TRAIN_LOSS: 4.0}, 2)
        log.log({M.EVAL_LOSS: 3.0}, 2)
        log.finish({M.EVAL_LOSS: 3.0, M.FIRST_EVAL_LOSS: 5.0, M.TRAIN_RUNTIME: 1.5, M.STEP: 2,
                    M.TRAIN_TOKENS_SEEN: 300, "probe": {"acc": 0.75}, M.FILL_MASK: [{"x": 1}]})
        assert log.status == {"wandb": "offline"}  # nothing failed
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)

    (run,) = records["run"]
    assert run.display_name == "my-run"
    assert list(run.tags) == ["a", "padding:packed", "model:bert"]
    metrics = {m.name or m.glob_name: m.step_metric for m in records["metric"]}
    assert metrics == {M.TRAIN_TOKENS_SEEN: "", M.TRAIN_EXAMPLES_SEEN: "", M.STEP: "",
                       "*": M.TRAIN_TOKENS_SEEN}
    rows = [{i.nested_key[0]: i.value_json for i in h.item} for h in records["history"]]
    assert [(r["_step"], r[M.TRAIN_TOKENS_SEEN], r[M.TRAIN_EXAMPLES_SEEN]) for r in rows] == [
        ("0", "0", "0"), ("2", "300", "8")]  # W&B's step: the optimizer's (one row per step)
    assert M.TRAIN_LOSS in rows[1] and M.EVAL_LOSS in rows[1]
    summary = summary_of(records)
    assert {k: summary[k] for k in (M.EVAL_LOSS, M.FIRST_EVAL_LOSS, M.TRAIN_RUNTIME,
                                     M.TRAIN_TOKENS_SEEN, "probe/acc")} == {
        M.EVAL_LOSS: 3.0, M.FIRST_EVAL_LOSS: 5.0, M.TRAIN_RUNTIME: 1.5, M.TRAIN_TOKENS_SEEN: 300,
        "probe/acc": 0.75}
