"""Save and resume (atomic checkpoints), retention, output-folder checks, pre-emption signals,
and the final HF-format export.

A run can be killed at any moment and started again with the same command to reach the same
result. What makes that true:

* **What a checkpoint holds** — everything the run needs to continue exactly: Accelerate's
  ``save_state`` (model, optimizer, the registered LR scheduler, grad scaler, the RNG states of
  every process; under ZeRO DeepSpeed's own sharded checkpoint) plus ``trainer_state.json``
  (:class:`TrainState`: step counters, the data position, the logging-window accumulators, the
  step-0 eval, the W&B run id, the launch shape) and a copy of ``config.yaml``. The data position
  is just ``(epoch, step_in_epoch)``: batch order is a pure function of (seed, epoch) and masking
  of (seed, epoch, example index), so nothing else about the data needs saving.
* **Atomic writes** — all processes save into ``checkpoints/.tmp-checkpoint-<step>``, files are
  fsynced, then the main process writes the completion marker ``COMPLETE`` (a manifest of every
  file and its size) and renames the folder to ``checkpoints/checkpoint-<step>``. A folder without
  the marker, or whose files are missing or of another size than the manifest says, is never
  loaded: it is skipped with a warning and the previous complete checkpoint is used. Several
  nodes must share ``output_dir`` (one filesystem), as every rank writes into the same folder.
* **Retention** — ``save_total_limit`` keeps the newest K complete checkpoints (never fewer than
  one); stale temporary folders of a killed save are removed at start-up.
* **Output-folder checks** (:func:`check_output_dir`, before any model loads) — a folder holding
  a finished run or a run with different settings is never silently reused.
* **Pre-emption** (:class:`StopSignal`) — SIGTERM/SIGINT set a flag; at the next step boundary
  all processes agree (a sum-reduce of the flag), save a checkpoint and stop cleanly.

Layout of one checkpoint (DDP or one process; under DeepSpeed ``model.safetensors`` and
``optimizer.bin`` are replaced by DeepSpeed's ``pytorch_model/`` folder and ``latest``)::

    <output_dir>/checkpoints/checkpoint-<step>/
        model.safetensors  optimizer.bin  custom_checkpoint_0.pkl (scheduler)
        random_states_<rank>.pkl (one per process)  [scaler.pt]
        trainer_state.json  config.yaml  COMPLETE
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, MLMConfig, save_config

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"                 # written last; JSON manifest {"step", "files": {path: bytes}}
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
TMP_PREFIX = ".tmp-"
FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")

# Keys that do not change what a run computes: a run may be resumed with them changed.
IGNORED_KEYS = frozenset({
    "logging_steps", "eval_steps", "eval_pad_sensitivity", "checkpointing_steps",
    "save_total_limit", "resume_from_checkpoint", "overwrite_output_dir", "report_to", "run_name",
    "wandb_project", "wandb_group", "wandb_tags", "progress_bar", "preprocessing_num_workers",
    "overwrite_cache", "output_dir",
})
# What --overwrite_output_dir deletes (config.yaml is rewritten; tracker folders are left alone).
RUN_OUTPUTS = (CHECKPOINTS, "metrics.jsonl", "summary.json", "model", "model.tmp", "config.yaml")


@dataclass
class TrainState:
    """The loop's counters: saved in every checkpoint, restored on resume (JSON, exact floats)."""
    step: int = 0                      # optimizer steps done
    epoch: int = 0                     # data position: the epoch being read ...
    step_in_epoch: int = 0             # ... and the next global batch of it
    train_time: float = 0.0            # seconds inside train_step, all segments together
    logged_time: float = 0.0           # train_time at the last train log line
    window_loss: float = 0.0           # sum of loss x masked tokens since the last log line
    window_masked: int = 0             # masked tokens since the last log line
    window_tokens: list[int] = field(default_factory=lambda: [0, 0])  # TokenCounter computed, real
    total_tokens: list[int] = field(default_factory=lambda: [0, 0])   # the same, whole run
    first_eval: dict[str, float] = field(default_factory=dict)  # the step-0 eval (first/eval/*)
    wandb_run_id: str | None = None    # a resumed run continues the same W&B run
    launch: dict[str, Any] = field(default_factory=dict)  # num_processes, distributed_type
    format: int = FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ResumePlan:
    """What :func:`check_output_dir` decided: resume from ``checkpoint`` (or start fresh)."""
    checkpoint: Path | None = None
    state: TrainState | None = None
    warnings: list[str] = field(default_factory=list)
    wipe: bool = False                 # --overwrite_output_dir: delete the old run's outputs


# ------------------------------------------------------------------------------ finding checkpoints
def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``checkpoints/checkpoint-<step>`` folder, complete or not, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None)


def validate_checkpoint(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a complete checkpoint, else why it is not (for the warning)."""
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    try:
        manifest = json.loads((path / MARKER).read_text())
        files = dict(manifest["files"])
    except FileNotFoundError:
        return f"no completion marker ({MARKER}): its save did not finish"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable completion marker ({MARKER})"
    for rel, size in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != size:
            return f"{rel} is truncated or changed ({file.stat().st_size} of {size} bytes)"
    if STATE_FILE not in files:
        return f"{STATE_FILE} is missing"
    try:
        TrainState.from_dict(json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return f"{STATE_FILE} is unreadable"
    return None


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint of ``output_dir``, and a warning per newer broken one."""
    warnings = []
    for step, path in reversed(list_checkpoints(output_dir)):
        reason = validate_checkpoint(path)
        if reason is None:
            return path, warnings
        warnings.append(f"skipping checkpoint {path}: {reason}; using the previous one.")
    return None, warnings


def read_state(path: str | os.PathLike) -> TrainState:
    return TrainState.from_dict(json.loads((Path(path) / STATE_FILE).read_text()))


def checkpoints_to_delete(checkpoints: list[tuple[int, Path, bool]],
                          limit: int | None) -> list[Path]:
    """Retention: from ``(step, path, complete)`` entries, the folders to delete.

    Keeps the ``limit`` newest complete checkpoints (at least one: the newest complete checkpoint
    is never deleted). Broken folders older than the newest complete one are deleted too; newer
    broken ones are left for inspection (a later save of the same step replaces them).
    """
    if not limit:
        return []
    complete = sorted((s, p) for s, p, ok in checkpoints if ok)
    if not complete:
        return []
    keep = {p for _, p in complete[-max(limit, 1):]}
    newest = complete[-1][0]
    return [p for s, p, ok in sorted(checkpoints)
            if (ok and p not in keep) or (not ok and s < newest)]


# ------------------------------------------------------------------------ output-folder checks
def config_differences(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """Settings that differ between a saved config.yaml and this run, ignoring IGNORED_KEYS.

    A key missing from ``saved`` (written by an older mlmkit) counts as its default value.
    """
    current = yaml.safe_load(yaml.safe_dump(current))  # compare in YAML's types on both sides
    defaults = defaults if defaults is not None else yaml.safe_load(yaml.safe_dump(
        MLMConfig().to_dict()))
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in IGNORED_KEYS:
            continue
        old, new = saved.get(key, defaults.get(key)), current.get(key, defaults.get(key))
        if old != new:
            diffs.append(f"{key}: {old!r} there, {new!r} now")
    return diffs


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: unreadable ({err}). Fix: delete the folder or pass "
                          "--overwrite_output_dir true.") from err
    return data if isinstance(data, dict) else {}


def check_output_dir(cfg: MLMConfig) -> ResumePlan:
    """Decide, before any model loads, whether this run starts fresh or resumes, and from where.

    Raises ConfigError (naming the fix) when ``output_dir`` holds a finished run, a run with
    different settings, or an unfinished run that ``--resume_from_checkpoint none`` would clobber.
    Reads only; :func:`prepare_output_dir` (main process) makes the changes.
    """
    out = Path(cfg.output_dir)
    fresh = ("pass a new --output_dir, or --overwrite_output_dir true to start fresh in it "
             "(deletes its checkpoints/, metrics.jsonl, summary.json and model/)")
    explicit = cfg.resume_from_checkpoint not in ("auto", "none")
    plan = ResumePlan(wipe=cfg.overwrite_output_dir)
    if cfg.overwrite_output_dir:
        if explicit and (out / CHECKPOINTS).resolve() in Path(
                cfg.resume_from_checkpoint).resolve().parents:
            raise ConfigError(f"resume_from_checkpoint={cfg.resume_from_checkpoint!r} lies inside "
                              "output_dir, which --overwrite_output_dir true would delete. Fix: "
                              "drop one of the two flags.")
    else:
        if (out / "summary.json").exists():
            raise ConfigError(f"output_dir={cfg.output_dir!r} holds a finished run (summary.json)."
                              f" Fix: {fresh}.")
        if (out / CONFIG_FILE).exists():
            diffs = config_differences(_read_yaml(out / CONFIG_FILE), cfg.to_dict())
            if diffs:
                raise ConfigError(
                    f"output_dir={cfg.output_dir!r} holds a run with different settings "
                    f"({'; '.join(diffs[:5])}{'; ...' if len(diffs) > 5 else ''}). Fix: rerun with "
                    f"its settings (see {out / CONFIG_FILE}) to resume it, or {fresh}.")
    if explicit:
        path = Path(cfg.resume_from_checkpoint)
        reason = validate_checkpoint(path)
        if reason:
            raise ConfigError(f"resume_from_checkpoint={str(path)!r} is not a complete checkpoint "
                              f"({reason}). Fix: pass another checkpoint-<step> folder, or auto.")
        if (path / CONFIG_FILE).exists():
            diffs = config_differences(_read_yaml(path / CONFIG_FILE), cfg.to_dict())
            if diffs:
                raise ConfigError(f"resume_from_checkpoint={str(path)!r} was written with different"
                                  f" settings ({'; '.join(diffs[:5])}). Fix: rerun with the "
                                  f"settings of {path / CONFIG_FILE}, or drop the flag.")
        plan.checkpoint = path
    elif not cfg.overwrite_output_dir:
        path, plan.warnings = newest_complete_checkpoint(out)
        if path is not None and cfg.resume_from_checkpoint == "none":
            raise ConfigError(f"output_dir={cfg.output_dir!r} holds checkpoints of an unfinished "
                              f"run (newest: {path.name}) and resume_from_checkpoint=none. Fix: "
                              f"--resume_from_checkpoint auto to continue it, or {fresh}.")
        plan.checkpoint = path
    if plan.checkpoint is not None:
        plan.state = read_state(plan.checkpoint)
    return plan


def check_launch(plan: ResumePlan, accelerator) -> None:
    """A checkpoint resumes only under the launch that wrote it (same processes, same engine)."""
    if plan.state is None or not plan.state.launch:
        return
    now = launch_signature(accelerator)
    if plan.state.launch != now:
        raise ConfigError(
            f"checkpoint {plan.checkpoint} was written by {plan.state.launch}, this launch is "
            f"{now}: the data shards, RNG streams and optimizer shards would not match. Fix: "
            "relaunch with the same accelerate config and --num_processes, or "
            "--overwrite_output_dir true to start fresh.")


def launch_signature(accelerator) -> dict:
    return {"num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1]}


def prepare_output_dir(cfg: MLMConfig, plan: ResumePlan) -> None:
    """Main process only: wipe (--overwrite_output_dir), clean stale temporaries, cut
    metrics.jsonl back to the checkpoint's step (or remove it when starting fresh), write config."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plan.wipe:
        for name in RUN_OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    root = out / CHECKPOINTS
    if root.is_dir():
        for stale in root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
    (out / "summary.json").unlink(missing_ok=True)
    if plan.checkpoint is None:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    else:
        truncate_metrics(out / "metrics.jsonl", plan.state.step)
    save_config(cfg, out / CONFIG_FILE)


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Drop metrics.jsonl lines logged after ``step`` (and a line cut by a kill), atomically: the
    resumed run appends from there, so its log equals an uninterrupted run's."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ save / load
def save_checkpoint(accelerator, cfg: MLMConfig, state: TrainState) -> Path:
    """Write ``checkpoints/checkpoint-<state.step>`` atomically; every process must call it."""
    root = Path(cfg.output_dir) / CHECKPOINTS
    final = root / f"checkpoint-{state.step}"
    tmp = root / f"{TMP_PREFIX}checkpoint-{state.step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    # Accelerate warns about every tied weight it de-duplicates for safetensors (the MLM head is
    # tied to the embeddings by design, and load_state re-ties them): not news, so kept quiet.
    quiet = logging.getLogger("accelerate.utils.other")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        accelerator.save_state(str(tmp))  # every rank: its RNG states; under ZeRO its shards
    finally:
        quiet.setLevel(level)
    if accelerator.is_main_process:
        _write_json(tmp / STATE_FILE, state.to_dict())
        save_config(cfg, tmp / CONFIG_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:  # one per node: flush what this node wrote
        _fsync_tree(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_marker(tmp, state.step)
        if final.exists():  # an older save of this step (e.g. a broken one that was skipped)
            trash = root / f"{TMP_PREFIX}old-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(root)
        entries = [(s, p, validate_checkpoint(p) is None)
                   for s, p in list_checkpoints(cfg.output_dir)]
        for old in checkpoints_to_delete(entries, cfg.save_total_limit):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_marker(folder: Path, step: int) -> None:
    """The completion marker: written last, it lists every file of the folder with its size."""
    files = {str(p.relative_to(folder)): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
    _write_json(folder / MARKER, {"step": step, "files": files})
    _fsync_dir(folder)


def load_checkpoint(accelerator, plan: ResumePlan) -> TrainState:
    """Restore model, optimizer, scheduler, scaler and every process's RNG; every process calls.

    Call it last before the training loop: the RNG states are those of the moment of the save.
    """
    try:
        accelerator.load_state(str(plan.checkpoint))
    except Exception as err:
        raise ConfigError(f"checkpoint {plan.checkpoint} could not be loaded "
                          f"({type(err).__name__}: {err}). Fix: delete it to resume from the "
                          "previous one, or pass --resume_from_checkpoint with another checkpoint "
                          "folder.") from err
    return plan.state


def export_hf_model(accelerator, module, tokenizer, target: Path) -> None:
    """Export model/ in HF format (safetensors + tokenizer); under ZeRO-3 the 16-bit gathered
    weights. Written to a temporary folder and renamed, so model/ is never half-written.
    Every process must call it."""
    state = accelerator.get_state_dict(module)  # every process must call (ZeRO-3 gathers)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.unwrap_model(module).model.save_pretrained(tmp, state_dict=state,
                                                           safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _fsync_tree(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    accelerator.wait_for_everyone()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary name, fsync, rename: readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    _write_json(tmp, data)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ pre-emption
class StopSignal:
    """SIGTERM (Slurm's pre-emption / time-limit warning) and SIGINT set a flag; the loop asks
    :meth:`agreed` at each step boundary, so every process stops after the same step.

    Launchers: torchrun (``accelerate launch`` with 2+ processes, DeepSpeed too) catches SIGTERM
    and SIGINT and forwards them to every worker, then SIGKILLs the workers still alive after
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by default: raise it when a checkpoint takes
    longer to write), and exits non-zero itself. Accelerate's one-process launcher does not
    forward signals and dies at once; the recipe gets SIGTERM from the kernel when its launcher
    dies (PR_SET_PDEATHSIG, see ``_terminate_with_launcher``), so ``kill <launcher pid>`` works
    there too. Whether a signal reaches only the launcher or every process (``kill -TERM -<pgid>``,
    Slurm's job-step signalling), every process stops after the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def install(self) -> "StopSignal":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        _terminate_with_launcher()
        return self

    def _handle(self, signum, frame) -> None:  # no I/O here: it may interrupt a print
        self.received = self.received or signal.Signals(signum).name

    def agreed(self, accelerator) -> bool:
        """True on every process when any process got a signal; a collective every process calls."""
        if accelerator.num_processes == 1:
            return self.received is not None
        import torch
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _terminate_with_launcher() -> bool:
    """Ask Linux for SIGTERM when the launcher that started this process dies (PR_SET_PDEATHSIG).

    Accelerate's one-process launcher (``subprocess.Popen`` + ``wait``) neither forwards SIGTERM
    nor waits for its child: ``kill <launcher pid>`` would leave the run going, orphaned. torchrun
    forwards signals, but starts every worker in a session of its own, so a launcher that is
    SIGKILLed (OOM killer, ``kill -9``) would leave its workers running unsupervised. With this,
    the run checkpoints and stops instead. Only when the parent is such a launcher, Linux only.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not any(name in part for part in cmdline
               for name in (b"accelerate", b"torchrun", b"torch.distributed.run")):
        return False
    import ctypes
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True
