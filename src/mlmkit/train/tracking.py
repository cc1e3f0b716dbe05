"""Trackers (W&B, TensorBoard, trackio through Accelerate) and metrics.jsonl.

Every run writes ``metrics.jsonl`` in its output folder whatever the tracker, so nothing depends on
the network. W&B runs offline by itself when no API key is configured or its server cannot be
reached (``wandb sync`` uploads later), and a tracker that fails never ends a run (`MetricsLog`).
The metric names (`mlmkit.config.keys`, re-exported here) are the one source of truth.

Every record carries the run's x-axes, ``train/examples_seen`` and ``train/tokens_seen`` (all
processes, restored on resume), beside ``step``. In W&B the run is named (`run_name`) and tagged
(`run_tags`), its metrics are plotted against the real tokens seen (`define_wandb_axes`), and its
summary gets summary.json's numbers at the end (`wandb_summary`).
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
import sys
from pathlib import Path

from mlmkit.config.choices import TRACKERS
from mlmkit.config.errors import ConfigError
from mlmkit.config.fileio import read_jsonl, write_json_atomic

# The metric and summary names (`mlmkit.config.keys`), re-exported where the records are written:
# ``tracking.TRAIN_LOSS`` and the rest.
from mlmkit.config.keys import *  # noqa: F403
from mlmkit.config.keys import STEP, TRACKERS_RAN, TRAIN_EXAMPLES_SEEN, TRAIN_TOKENS_SEEN
from mlmkit.train.runfolder import METRICS, SUMMARY

# The package each tracker imports (Accelerate accepts tensorboardX in place of tensorboard).
TRACKER_PACKAGES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX"),
                    "trackio": ("trackio",)}


def check_trackers(report_to: str) -> list[str]:
    """Accelerate's tracker names for ``--report_to``, after checking that their packages import.

    Accelerate drops a tracker whose package is missing with only a debug log line, so a run
    asked to log to trackio would silently log nowhere; this turns that into a ConfigError.
    """
    import importlib.util

    if report_to not in TRACKERS:
        raise ConfigError(f"report_to={report_to!r}: not a known value. "
                          f"Fix: use one of {', '.join(TRACKERS)}.")
    for name in TRACKERS[report_to]:
        if not any(importlib.util.find_spec(pkg) for pkg in TRACKER_PACKAGES[name]):
            raise ConfigError(
                f"report_to={report_to!r}: the {name} package is not installed. "
                f"Fix: `pip install {TRACKER_PACKAGES[name][0]}`, or pass another --report_to "
                "(metrics.jsonl is written whatever the tracker).")
    return list(TRACKERS[report_to])


def wandb_has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


WANDB_PROBE_S = 10.0  # how long the start may wait to learn that the W&B server is unreachable


def wandb_unreachable(timeout: float = WANDB_PROBE_S) -> str | None:
    """Why the W&B server (``WANDB_BASE_URL``, else W&B's cloud) cannot be reached, or None when
    it answers. Any HTTP answer counts as reachable; proxies (``HTTPS_PROXY``) are honoured, as
    W&B does. Bounded by ``timeout`` in all (a name look-up included)."""
    import threading
    url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    outcome: list[str | None] = []
    thread = threading.Thread(target=_probe, args=(url, timeout, outcome), daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"{url} did not answer within {timeout:.0f} s"


def _probe(url: str, timeout: float, outcome: list) -> None:
    """One HEAD request to ``url``: None into ``outcome`` when it answers, else why not."""
    import requests  # a dependency of wandb
    try:
        requests.head(url, timeout=timeout, allow_redirects=False)
        outcome.append(None)
    except requests.RequestException as err:
        inner = getattr(err.args[0], "reason", None) if err.args else None  # urllib3's why
        inner = inner or err
        text = re.sub(r"^(<[^>]*>|\w+\(host=[^)]*\)):\s*", "", str(inner)).split("\n")[0]
        outcome.append(f"{url} unreachable ({type(inner).__name__}: {text[:100]})")


def go_offline_notice(why: str) -> str:
    return (f"W&B: {why}; logging offline under {os.environ['WANDB_DIR']}/wandb instead. Upload "
            "later with `wandb sync <that folder>/offline-run-*`.")


def setup_wandb_env(output_dir: str, *, main_process: bool = True) -> str | None:
    """Go offline when no API key is configured, or (main process, online mode) when the W&B
    server cannot be reached within `WANDB_PROBE_S` seconds; returns a notice to print, if any."""
    os.environ.setdefault("WANDB_DIR", str(Path(output_dir).resolve()))
    os.environ.setdefault("WANDB_SILENT", "true")
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return None
    if not wandb_has_api_key():
        os.environ["WANDB_MODE"] = "offline"
        return go_offline_notice("no API key found")
    why = wandb_unreachable() if main_process else None
    if why:
        os.environ["WANDB_MODE"] = "offline"
        return go_offline_notice(why)
    return None


WANDB_INIT_TIMEOUT_S = 20


def run_name(cfg) -> str:
    """The tracker's run name: ``--run_name``, else the output folder's name."""
    return cfg.run_name or Path(cfg.output_dir).resolve().name


# The run's own tags (``<label>:<value>``) from the run config's entries ``key: label``.
AUTO_TAGS = {"padding_resolved": "padding", "model_type": "model"}


def run_tags(cfg, run_config: dict | None = None) -> list[str]:
    """The W&B run's tags: ``--wandb_tags``, then what the run resolved (`AUTO_TAGS`, e.g.
    ``padding:packed``, ``model:bert``), each once."""
    run_config = run_config or {}
    auto = [f"{label}:{run_config[key]}" for key, label in AUTO_TAGS.items()
            if run_config.get(key) is not None]
    return list(dict.fromkeys([*cfg.wandb_tags, *auto]))


def tracker_init_kwargs(cfg, run_id: str | None = None, run_config: dict | None = None) -> dict:
    """Per-tracker kwargs for ``accelerator.init_trackers``: name, group, tags, resume id."""
    name = run_name(cfg)
    wandb_kwargs = {"name": name, "group": cfg.wandb_group, "tags": run_tags(cfg, run_config),
                    "dir": os.environ.get("WANDB_DIR"),
                    # a server that answered the probe but stalls: fail (then go offline) soon
                    "settings": {"init_timeout": WANDB_INIT_TIMEOUT_S}}
    if run_id:
        wandb_kwargs.update(id=run_id, resume="allow")
    trackio_kwargs = {"name": name, "group": cfg.wandb_group}  # trackio has no tags
    return {"wandb": {k: v for k, v in wandb_kwargs.items() if v is not None},
            "trackio": {k: v for k, v in trackio_kwargs.items() if v is not None}}


def wandb_run_id(accelerator) -> str | None:
    """The W&B run id of this run, if it logs to W&B (so a resumed run continues it)."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            return tracker.run.id
    return None


WANDB_X_AXIS = TRAIN_TOKENS_SEEN  # W&B's default x-axis of every metric (`define_wandb_axes`)


def define_wandb_axes(run) -> None:
    """Declare the run's x-axes to W&B (``define_metric``): ``train/tokens_seen``,
    ``train/examples_seen`` and ``step`` are step metrics, and every other metric is plotted
    against `WANDB_X_AXIS` by default, so that runs with other step counts (packed against
    padded rows, another batch size) line up; a chart's x-axis can still be switched to the
    examples seen or the optimizer step."""
    for axis in (TRAIN_TOKENS_SEEN, TRAIN_EXAMPLES_SEEN, STEP):
        run.define_metric(axis)
    run.define_metric("*", step_metric=WANDB_X_AXIS)


def wandb_summary(summary: dict, prefix: str = "") -> dict:
    """summary.json's numbers and strings for W&B's summary: nested dicts flattened to
    ``a/b`` keys; lists (the fill-mask check), None and non-finite numbers left out."""
    flat = {}
    for key, value in summary.items():
        key = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(wandb_summary(value, key + "/"))
        elif isinstance(value, (bool, int, str)) or \
                (isinstance(value, float) and math.isfinite(value)):
            flat[key] = value
    return flat


class MetricsLog:
    """Appends every record to ``metrics.jsonl`` and logs it to Accelerate's trackers (main
    process only). A tracker never ends a run: the first error a tracker raises (W&B's service
    killed, a network error, a full disk) prints one warning line and that tracker logs nothing
    more; training, evaluation, checkpoints and ``metrics.jsonl`` go on. `hold` keeps records from
    the trackers until `release` (a stop writes its checkpoint before any tracker call).
    ``status``: tracker name -> how it ran ("online", "offline", "failed at step N: ...").
    ``seen``: the run's `checkpoint.TrainState`, whose examples and tokens seen every record
    carries (its x-axes, as of the last read of the steps)."""

    def __init__(self, accelerator, output_dir: str | os.PathLike,
                 status: dict[str, str] | None = None, seen=None):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS
        self.status = dict(status or {})
        self.seen = seen
        self._failed: set[str] = set()
        self._held: list | None = None

    def start(self) -> None:
        """W&B: declare the run's x-axes (`define_wandb_axes`)."""
        if self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                if tracker.name == "wandb" and tracker.name not in self._failed:
                    self._guard(tracker, "at the start", define_wandb_axes, tracker.tracker)

    def log(self, metrics: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        axes = {} if self.seen is None else {TRAIN_EXAMPLES_SEEN: self.seen.examples_seen,
                                             TRAIN_TOKENS_SEEN: self.seen.tokens_seen}
        metrics = {STEP: step, **axes, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self._held is not None:
            self._held.append((metrics, step))
        else:
            self._to_trackers(metrics, step)

    def hold(self) -> None:
        """Keep the next records from the trackers (``metrics.jsonl`` still gets them at once)."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Log the held records to the trackers, and log the next ones at once again."""
        held, self._held = self._held or [], None
        for metrics, step in held:
            self._to_trackers(metrics, step)

    def _to_trackers(self, metrics: dict, step: int) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name not in self._failed:
                self._guard(tracker, f"at step {step}", tracker.log, metrics, step=step)

    def finish(self, summary: dict | None = None) -> None:
        """Finish every tracker still working (W&B: ``summary``, the run's summary.json, into its
        summary (`wandb_summary`), then its last records written). Every process calls it, before
        ``accelerator.end_training()`` (which then only ends the process group: the trackers are
        taken off the accelerator here)."""
        self.release()
        if self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                if summary and tracker.name == "wandb" and tracker.name not in self._failed:
                    self._guard(tracker, "at the end", tracker.tracker.summary.update,
                                wandb_summary(summary))
                if tracker.name not in self._failed:
                    self._guard(tracker, "at the end", tracker.finish)
        self.accelerator.trackers = []

    def _guard(self, tracker, when: str, call, *args, **kwargs) -> None:
        try:
            call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 -- whatever a tracker raises, the run goes on
            self._failed.add(tracker.name)
            reason = _reason(err)
            self.status[tracker.name] = f"failed {when} ({reason})"
            where = f"; what it wrote is under {os.environ['WANDB_DIR']}/wandb" \
                if tracker.name == "wandb" and os.environ.get("WANDB_DIR") else ""
            print(f"mlmkit: warning: the {tracker.name} tracker failed {when} ({reason}) and "
                  f"logs nothing more in this run{where}; training goes on and {self.path} "
                  "keeps every record.", file=sys.stderr, flush=True)
            if tracker.name == "wandb":
                _drop_wandb_service()

    def summary(self) -> dict:
        """summary.json's ``trackers`` entry: how each tracker ran."""
        return {TRACKERS_RAN: dict(self.status)}


def _drop_wandb_service() -> None:
    """After W&B failed: let go of its service (``wandb.teardown``, which also drops its exit
    hook), so that the interpreter's exit does not end in W&B's traceback."""
    try:
        import wandb
        wandb.teardown()
    except Exception:  # noqa: BLE001 -- the service is gone already: nothing left to do
        pass


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl (``path`` is the file or the run folder)."""
    path = Path(path)
    return read_jsonl(path / METRICS if path.is_dir() else path)


class main_print:  # noqa: N801 -- used as a function: log = main_print(accelerator)
    """``print`` for a run's log lines on the launch's main process only: each line once per job,
    however many nodes it spans (``accelerator.print`` prints on every node's local main
    process, so once per node). Flushed: the lines reach a batch job's output file at once."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def __call__(self, *args, **kwargs) -> None:
        if self.accelerator.is_main_process:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)


def start_tracking(accelerator, cfg, trackers: list[str], state, run_config: dict) -> MetricsLog:
    """Start the trackers and return the run's `MetricsLog`. W&B goes offline without an API key
    or when its server cannot be reached (`setup_wandb_env`); a resumed run continues its W&B
    run, ``state.wandb_run_id``, and records it. A tracker that fails to start is retried once
    (W&B offline), then left out with one warning line: it never stops the run. The run is named
    and tagged (`run_name`, `run_tags` of ``run_config``, which the trackers' config records
    beside the flags), and W&B gets its x-axes (`define_wandb_axes`)."""
    log = main_print(accelerator)
    if "wandb" in trackers:
        _quiet_lost_socket()
        notice = setup_wandb_env(cfg.output_dir, main_process=accelerator.is_main_process)
        if notice:
            log(notice)
    status: dict[str, str] = {}
    if trackers:
        config = {**cfg.to_dict(), **run_config}
        kwargs = tracker_init_kwargs(cfg, state.wandb_run_id, run_config)
        reason = _init_trackers(accelerator, cfg.wandb_project, config, kwargs)
        if reason and "wandb" in trackers and os.environ.get("WANDB_MODE") != "offline":
            os.environ["WANDB_MODE"] = "offline"  # the one retry: W&B offline
            log(go_offline_notice(f"could not start online ({reason})"))
            reason = _init_trackers(accelerator, cfg.wandb_project, config, kwargs)
        if reason:
            status = {name: f"failed to start ({reason})" for name in trackers}
            log(f"warning: the trackers ({', '.join(trackers)}) failed to start ({reason}); "
                f"the run goes on without them and {cfg.output_dir}/{METRICS} keeps every "
                "record.")
        for tracker in accelerator.trackers:
            status[tracker.name] = tracker_mode(tracker)
        state.wandb_run_id = wandb_run_id(accelerator)
    metrics_log = MetricsLog(accelerator, cfg.output_dir, status, seen=state)
    metrics_log.start()
    return metrics_log


def _init_trackers(accelerator, project: str, config: dict, kwargs: dict) -> str | None:
    """``accelerator.init_trackers``; why it failed (none left half-started), or None."""
    try:
        accelerator.init_trackers(project, config=config, init_kwargs=kwargs)
        return None
    except Exception as err:  # noqa: BLE001 -- a tracker never ends a run
        accelerator.trackers = []
        return _reason(err)


def _reason(err: BaseException) -> str:
    """An error in one line: its type and its message's first line."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


class _LostSocket(logging.Filter):
    """Drops asyncio's bare "socket.send() raised exception.": W&B talks to its service through
    asyncio, whose logger adds that line when the service has died; `MetricsLog`'s warning says
    it all, once."""

    def filter(self, record) -> bool:
        return record.getMessage() != "socket.send() raised exception."


def _quiet_lost_socket() -> None:
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _LostSocket) for f in asyncio_log.filters):  # once
        asyncio_log.addFilter(_LostSocket())


def tracker_mode(tracker) -> str:
    """How a started tracker logs: W&B "online"/"offline"; the others "local"."""
    if tracker.name != "wandb":
        return "local"
    mode = getattr(getattr(tracker.run, "settings", None), "mode", None)
    return "offline" if mode in ("offline", "dryrun") else str(mode or "online")


def write_summary(output_dir: str | os.PathLike, summary: dict) -> None:
    """``summary.json``, written last and atomically: a run folder with it is finished."""
    write_json_atomic(Path(output_dir) / SUMMARY, summary)
