"""Checkpoint averaging: the mean of several saved weights of one model, as one HF model folder.

    python -m mlmkit.train.average OUT SOURCE SOURCE [SOURCE ...] [--config_from FOLDER]

A SOURCE is a run's checkpoint (``checkpoints/checkpoint-<step>``: one process or DDP, DeepSpeed
ZeRO-1/2/3, FSDP2) or an HF model folder (``model/``). Sharded checkpoints are consolidated with
the engines' own tools: DeepSpeed's ``zero_to_fp32`` (the fp32 master weights) and
``torch.distributed.checkpoint``'s ``dcp_to_torch_save``. The mean is taken in float32 and
saved in the dtype of the model folder the config comes from (``--config_from``, else the first
SOURCE that is a model folder, else the checkpoints' run's ``model/``), with its tokenizer.

In a run, ``--average_checkpoints K`` (`finish_run`) writes ``<output_dir>/model_avg/``: the mean
of the final weights (``model/``, which count as one of the K) and of the newest K-1 complete
checkpoints saved before the last step (a checkpoint of the last step holds the final weights
themselves), then evaluates it on the same fixed eval masks as ``model/`` (``eval/avg_loss``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from mlmkit.config.errors import ConfigError, exit_status
from mlmkit.config.fields import MLMConfig
from mlmkit.config.fileio import fsync_tree
from mlmkit.config.keys import (
    AVERAGED_CHECKPOINTS,
    EVAL_AVG_LOSS,
    EVAL_AVG_PERPLEXITY,
    EVAL_LOSS,
    EVAL_PERPLEXITY,
)
from mlmkit.model.checks import TOKENIZER_FILES, WEIGHT_FILES, outside_zero3
from mlmkit.model.loading import MaskedLMModule, load_model
from mlmkit.train.checkpoint import checkpoint_step, list_checkpoints, validate_checkpoint
from mlmkit.train.evaluation import evaluate
from mlmkit.train.runfolder import MARKER, MODEL, TMP_SUFFIX, RunFolder

PROG = "python -m mlmkit.train.average"
MODULE_PREFIX = "model."  # MaskedLMModule's: a checkpoint's keys are the training module's


# ------------------------------------------------------------------------------ the mean
class RunningMean:
    """The float32 mean of state dicts added one at a time (one sum in memory, not K copies)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, state: dict[str, torch.Tensor]) -> None:
        floats = {k: v for k, v in state.items() if v.is_floating_point()}
        if self.count and floats.keys() != self.sums.keys():
            differ = sorted(floats.keys() ^ self.sums.keys())
            raise ConfigError(f"the weights to average hold different tensors (e.g. {differ[0]})."
                              " Fix: average checkpoints of one model only.")
        for key, value in floats.items():
            value = value.detach().to("cpu", torch.float32)
            if key in self.sums:
                if value.shape != self.sums[key].shape:
                    raise ConfigError(f"{key} has shape {list(value.shape)} here and "
                                      f"{list(self.sums[key].shape)} before. Fix: average "
                                      "checkpoints of one model only.")
                self.sums[key] += value
            else:
                self.sums[key] = value.clone()
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        return {k: v / self.count for k, v in self.sums.items()}


def mean_state_dict(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The float32 mean of ``states`` (same keys and shapes), key by key."""
    mean = RunningMean()
    for state in states:
        mean.add(state)
    return mean.mean()


# ------------------------------------------------------------------------------ reading weights
def is_model_folder(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def _strip(state: dict, prefix: str = MODULE_PREFIX) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _read_model_folder(path: Path) -> dict[str, torch.Tensor]:
    """Read by transformers itself (shards, .bin, the legacy names it renames on load), in
    float32."""
    from transformers import AutoModelForMaskedLM
    if not any((path / n).is_file() for n in WEIGHT_FILES):
        raise ConfigError(f"{path}: a model folder without model.safetensors or "
                          "pytorch_model.bin. Fix: pass a folder that save_pretrained wrote, or "
                          "a checkpoint.")
    with outside_zero3():
        model = AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32)
    return model.state_dict()


def _read_deepspeed(path: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
    return _strip(state)


def _read_fsdp(folder: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "model.pt"
        dcp_to_torch_save(str(folder), str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    if len(state) == 1 and isinstance(next(iter(state.values())), dict):  # {"model": {...}}
        state = next(iter(state.values()))
    return _strip(state)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint or an HF model folder, named as the HF model names them
    (a checkpoint's training-module prefix removed); sharded checkpoints consolidated."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such folder. Fix: pass checkpoint-<step> folders "
                          "(<output_dir>/checkpoints/) or model folders.")
    if is_model_folder(path):
        return _read_model_folder(path)
    if (path / MARKER).exists() or checkpoint_step(path) is not None:
        reason = validate_checkpoint(path)
        if reason is not None:
            raise ConfigError(f"{path}: not a complete checkpoint ({reason}). Fix: pass another "
                              "checkpoint (the newest complete ones are listed by `ls "
                              "<output_dir>/checkpoints`).")
    if (path / "model.safetensors").is_file():  # one process or DDP (Accelerate's save_state)
        from safetensors.torch import load_file
        return _strip(load_file(path / "model.safetensors"))
    if (path / "latest").is_file():  # DeepSpeed ZeRO (its tag folder, pytorch_model/)
        return _read_deepspeed(path)
    fsdp = sorted(path.glob("pytorch_model_fsdp_*"))
    if fsdp:  # FSDP2: torch.distributed.checkpoint shards
        return _read_fsdp(fsdp[0])
    raise ConfigError(f"{path}: neither a checkpoint (model.safetensors, DeepSpeed's latest, "
                      "pytorch_model_fsdp_0/) nor a model folder (config.json). Fix: pass "
                      "checkpoint-<step> folders or model folders.")


# ------------------------------------------------------------------------------ into a model
def _tied_groups(model: nn.Module) -> dict[str, set[str]]:
    """name -> every state-dict name of the same tensor (tied weights share one)."""
    by_ptr: dict[int, set[str]] = {}
    state = model.state_dict()
    for name, value in state.items():
        by_ptr.setdefault(value.data_ptr(), set()).add(name)
    return {name: by_ptr[value.data_ptr()] for name, value in state.items()}


def load_into(model: nn.Module, state: dict, where: str) -> None:
    """Load ``state`` into ``model``: every tensor present (a tied weight saved under one of its
    names only), none unknown, each of the model's shape; a ConfigError naming ``where`` else."""
    groups = _tied_groups(model)
    unexpected = sorted(set(state) - set(groups))
    missing = sorted(k for k in groups if k not in state and not (groups[k] & state.keys()))
    if unexpected or missing:
        what = (f"{len(unexpected)} tensors the model does not have (e.g. {unexpected[0]})"
                if unexpected else f"no {missing[0]} ({len(missing)} tensors missing)")
        raise ConfigError(f"{where} holds {what}. Fix: average checkpoints of the model whose "
                          "config is used (--config_from).")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        line = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln),
                    str(err).splitlines()[0])
        raise ConfigError(f"{where} does not fit the model ({line}). Fix: average checkpoints "
                          "of the model whose config is used (--config_from).") from err


def average_folders(out: str | os.PathLike, sources: list, like: str | os.PathLike) -> Path:
    """Write the float32 mean of ``sources`` (checkpoints or model folders) to ``out`` as an HF
    model folder: the config and tokenizer of the model folder ``like``, saved in its dtype.
    Written to ``out.tmp`` and renamed, so ``out`` is never half-written."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    out, like = Path(out), Path(like)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report and the progress bars: not news here
    hf_logging.disable_progress_bar()
    try:
        with outside_zero3():  # built by this process alone, in its saved dtype ("auto")
            model = AutoModelForMaskedLM.from_pretrained(like)
        dtype = next(model.parameters()).dtype
        model.float()
        mean = RunningMean()
        for source in sources:
            load_into(model, read_weights(source), str(source))
            mean.add(model.state_dict())
        model.load_state_dict(mean.mean(), strict=False)
        model.to(dtype)
        tmp = out.with_name(out.name + TMP_SUFFIX)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if any((like / f).is_file() for f in (*TOKENIZER_FILES, "tokenizer_config.json")):
            AutoTokenizer.from_pretrained(like).save_pretrained(tmp)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    fsync_tree(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------ in a run
def check_schedule(cfg: MLMConfig, max_steps: int) -> None:
    """--average_checkpoints K needs K-1 checkpoints saved before the run's last step."""
    k, every = cfg.average_checkpoints, cfg.checkpointing_steps
    if not k or not every:
        return
    saved = (max_steps - 1) // every
    if saved < k - 1:
        fewer = max(1, (max_steps - 1) // (k - 1))
        raise ConfigError(
            f"average_checkpoints={k}: the run's {max_steps} steps save {saved} checkpoint(s) "
            f"before the last step every --checkpointing_steps {every}, and averaging {k} "
            f"weights needs {k - 1}. Fix: pass --checkpointing_steps {fewer} or less, or "
            f"--average_checkpoints {saved + 1}" + (" or more steps." if saved else "."))


def run_sources(cfg: MLMConfig, final_step: int) -> list[tuple[int, Path]]:
    """The newest K-1 complete checkpoints saved before ``final_step`` (oldest first)."""
    earlier = [(s, p) for s, p in list_checkpoints(cfg.output_dir)
               if s < final_step and validate_checkpoint(p) is None]
    return earlier[-(cfg.average_checkpoints - 1):]


def evaluate_folder(evaluator, cfg: MLMConfig, path: Path) -> dict:
    """``evaluate`` of the model folder ``path`` on the run's eval examples and fixed masks
    (``evaluator``: the run's `evaluation.Evaluator`), loaded on every process as the run's model
    was (attention, packed path) and run in the run's precision; every process calls it."""
    from transformers.utils import logging as hf_logging
    accelerator = evaluator.accelerator
    source = dataclasses.replace(cfg, model_name_or_path=str(path), config_name=None,
                                 config_overrides=None)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with outside_zero3():  # a whole copy on each process, never partitioned
            model = load_model(source, evaluator.collator.tokenizer, device=accelerator.device)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    module = MaskedLMModule(model, cfg.sparse_prediction).to(accelerator.device)
    with accelerator.autocast():
        metrics = evaluate(accelerator, module, evaluator.examples, evaluator.collator,
                           batch_size=cfg.per_device_eval_batch_size,
                           max_seq_length=cfg.max_seq_length, with_unmasked=False,
                           with_pad_probe=False)
    del module, model
    return metrics


def finish_run(accelerator, cfg: MLMConfig, evaluator, step: int, log) -> dict:
    """``--average_checkpoints``: model_avg/ (main process) from model/ and the newest K-1
    checkpoints before ``step``, evaluated (every process) and logged at ``step``; the summary's
    entries. Every process calls it, after model/ is exported."""
    if not cfg.average_checkpoints:
        return {}
    folder = RunFolder(cfg.output_dir)
    sources = run_sources(cfg, step)
    if not sources:
        log(f"warning: --average_checkpoints {cfg.average_checkpoints}: no complete checkpoint "
            f"before step {step} is left, so there is no model_avg/.")
        return {}
    steps = [s for s, _ in sources]
    if len(sources) < cfg.average_checkpoints - 1:
        log(f"warning: --average_checkpoints {cfg.average_checkpoints}: only {len(sources)} "
            f"complete checkpoint(s) before step {step}; averaging {len(sources) + 1} weights.")
    error = None
    if accelerator.is_main_process:
        try:
            average_folders(folder.model_avg, [folder.model, *(p for _, p in sources)],
                            like=folder.model)
        except (ConfigError, OSError) as err:  # the run's own outputs stay good: a warning
            error = str(err)
    from accelerate.utils import broadcast_object_list
    (error,) = broadcast_object_list([error])  # every process knows, none waits for nothing
    if error is not None:
        log(f"warning: --average_checkpoints: no model_avg/ ({error}); {PROG} can write it "
            "later.")
        return {}
    metrics = evaluate_folder(evaluator, cfg, folder.model_avg)
    averaged = {EVAL_AVG_LOSS: metrics[EVAL_LOSS], EVAL_AVG_PERPLEXITY: metrics[EVAL_PERPLEXITY]}
    evaluator.metrics_log.log(averaged, step)
    log(f"model_avg/: the final weights and checkpoint{'s' if len(steps) > 1 else ''} "
        f"{', '.join(map(str, steps))} averaged; "
        f"eval loss {averaged[EVAL_AVG_LOSS]:.4f}, perplexity {averaged[EVAL_AVG_PERPLEXITY]:.2f}")
    return {**averaged, AVERAGED_CHECKPOINTS: [*steps, step]}


# ------------------------------------------------------------------------------ the command
def config_folder(sources: list[Path], config_from: str | None) -> Path:
    """Where the averaged model's config and tokenizer come from (see the module's doc)."""
    if config_from:
        if not is_model_folder(Path(config_from)):
            raise ConfigError(f"--config_from {config_from}: not a model folder (no config.json)."
                              " Fix: pass a folder that save_pretrained wrote, e.g. the run's "
                              f"{MODEL}/.")
        return Path(config_from)
    for source in sources:
        if is_model_folder(source):
            return source
    for source in sources:  # <output_dir>/checkpoints/checkpoint-<step> -> <output_dir>/model
        run_model = source.parent.parent / MODEL
        if checkpoint_step(source) is not None and is_model_folder(run_model):
            return run_model
    raise ConfigError("no source holds the model's config (checkpoints hold weights only, and "
                      "their run has no model/ yet). Fix: add --config_from with a model folder of "
                      "the same architecture, e.g. the model the run started from.")


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when written; 2 after one ``mlmkit: error: ... Fix: ...`` line (nothing
    written) for a mistake of the user's."""
    return exit_status(_command, argv)


def _command(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder to write (an HF model folder), e.g. "
                                    "outputs/run/model_avg")
    parser.add_argument("sources", nargs="+", help="checkpoint-<step> folders or model folders")
    parser.add_argument("--config_from", default=None, help="model folder whose config, "
                        "tokenizer and dtype the average takes (default: the first source that "
                        "is a model folder, else the checkpoints' run's model/)")
    args = parser.parse_args(argv)
    sources = [Path(s) for s in args.sources]
    if len(sources) < 2:
        raise ConfigError(f"{len(sources)} source given: an average needs at least 2. Fix: pass "
                          "two or more checkpoint or model folders after OUT.")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists. Fix: pass a new folder for OUT, or delete it.")
    for source in sources:
        if not source.is_dir():
            raise ConfigError(f"{source}: no such folder. Fix: pass checkpoint-<step> folders "
                              "(<output_dir>/checkpoints/) or model folders.")
    like = config_folder(sources, args.config_from)
    average_folders(out, sources, like=like)
    print(f"{out}: the mean of {len(sources)} weights ({', '.join(map(str, sources))}); config "
          f"and tokenizer from {like}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
