"""The Accelerator of a run, and the launch shape a checkpoint must be resumed under.

Launch settings (processes, nodes, mixed precision, DDP or ZeRO) come from `accelerate launch`
and its config file, never from the recipe config; this module only adapts to them.
"""

from __future__ import annotations

import os

from .configio import ConfigError


def build_accelerator(cfg, trackers: list[str]):
    """The run's Accelerator, for whatever `accelerate launch` set up.

    * GPU (one process, DDP, or DeepSpeed): Accelerate's defaults -- NCCL, one device per process.
    * CPU, one process or DDP: ``cpu=True`` (without it each DDP process would think it is alone)
      and, with several processes, a gloo process group.
    * CPU with DeepSpeed: ``cpu`` must stay False (``cpu=True`` disables DeepSpeed); the gloo
      group is still needed.
    * DeepSpeed (any device): the recipe owns the micro batch and clipping, so the DeepSpeed
      config's ``"auto"`` values for them are filled from ``cfg`` here; accumulation is given to
      the Accelerator, which passes it on.
    """
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs

    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    no_gpu = not torch.cuda.is_available()
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=no_gpu and not use_deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if no_gpu and several else [],
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=trackers or None, project_dir=str(cfg.output_dir))
    if accelerator.state.deepspeed_plugin is not None:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
        ds_config["gradient_clipping"] = cfg.max_grad_norm
    return accelerator


def launch_signature(accelerator) -> dict:
    """What must match between a checkpoint's launch and the launch that resumes it."""
    return {"num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1]}


def check_launch(saved: dict | None, checkpoint, accelerator) -> None:
    """A checkpoint resumes only under the launch that wrote it (same processes, same engine):
    otherwise the data shards, RNG streams and optimizer shards would not match."""
    if not saved:
        return
    now = launch_signature(accelerator)
    if saved != now:
        raise ConfigError(
            f"checkpoint {checkpoint} was written by {saved}, this launch is {now}: the data "
            "shards, RNG streams and optimizer shards would not match. Fix: relaunch with the "
            "same accelerate config and --num_processes, or --overwrite_output_dir true to "
            "start fresh.")
