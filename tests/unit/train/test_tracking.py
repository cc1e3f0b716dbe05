"""tracking.py: a tracker never ends a run. MetricsLog guards every tracker call (a failure is
one warning line; metrics.jsonl keeps every record), holds records while a stop saves, and
start_tracking goes offline or on without trackers; W&B goes offline when its server does not
answer. With a real Accelerator and Accelerate's own tracker interface (a tracker of ours that
fails as W&B's does); W&B itself is launched for real in tests/integration/test_tracking_launch.py.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from helpers import isolated_globals

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
