"""What trains and how it steps: the optimizer (fused AdamW or StableAdamW, weight-decay
groups, what each launch allows: `check_optimizer_launch`), the LR schedule, and `Training` -- the prepared module and optimizer, the ``--torch_compile`` forward and
what the model's layout tells the collator (`prepare_training`). The step itself is `loop`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import get_scheduler

from mlmkit.config.errors import ConfigError
from mlmkit.model.checks import position_offset
from mlmkit.model.flops import FlopCounter
from mlmkit.model.loading import MaskedLMModule, attn_implementation


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """``--optimizer``: AdamW or StableAdamW; no weight decay on biases and LayerNorm weights
    (the 1-D parameters), decoupled weight decay (lr x weight_decay) on the rest, for both.

    AdamW is torch's fused implementation (CPU and CUDA): on a 2-core CPU the default ``foreach``
    AdamW took 1.8-3 s per step for the 22M-parameter demo model, the fused one about 0.05 s; it
    can also skip a step on the device (``--skip_nonfinite_steps``: `loop.train_step`).
    StableAdamW is torch-optimi's ``optimi.StableAdamW`` with optimi's own choice of kernel
    (Triton on CUDA, else its for-loop) and its default Kahan summation, which applies to
    bfloat16/float16 weights only: the weights mlmkit's optimizers hold are float32 (Accelerate's
    mixed precision computes in bf16 around them), so none is needed.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "stable_adamw":
        try:
            from optimi import StableAdamW
        except ImportError as err:
            raise ConfigError(f"optimizer='stable_adamw' needs torch-optimi ({err}). Fix: pip "
                              "install 'mlmkit[recipe]' (or torch-optimi), or use --optimizer "
                              "adamw.") from err
        return StableAdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon,
                           weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon,
                             fused=True)


def check_optimizer_launch(cfg, accelerator) -> None:
    """Refuse what the launch cannot do with the optimizer (before anything is written):
    StableAdamW under DeepSpeed ZeRO, which hands the optimizer one flat partition of parameters
    per process, so its per-tensor update clipping would clip whole partitions (and depend on
    the number of processes); ``--skip_nonfinite_steps`` where the step is not ours to skip
    (DeepSpeed steps inside its backward) or is already skipped (fp16's loss scaler)."""
    from accelerate.utils import DistributedType
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if cfg.optimizer == "stable_adamw" and deepspeed:
        raise ConfigError("optimizer='stable_adamw' under DeepSpeed ZeRO: ZeRO gives the "
                          "optimizer one flat partition per process, so StableAdamW's per-tensor "
                          "update clipping would clip whole partitions. Fix: launch with "
                          "accelerate_configs/fsdp2.yaml (or ddp.yaml), or use --optimizer adamw.")
    if cfg.skip_nonfinite_steps and (deepspeed or accelerator.mixed_precision == "fp16"):
        why = ("DeepSpeed takes the optimizer step inside its backward, before the step's "
               "gradient norm is known" if deepspeed else
               "fp16's loss scaler already skips the steps whose gradients overflow")
        raise ConfigError(f"skip_nonfinite_steps=True: {why}. Fix: drop --skip_nonfinite_steps "
                          "(a non-finite loss then stops the run), or launch with DDP or FSDP2 "
                          "in bf16 or fp32.")


def scheduler_phases(cfg, num_training_steps: int) -> dict[str, int]:
    """Warmup steps (``num_warmup_steps``, else ``warmup_ratio`` of the steps) and, for
    ``warmup_stable_decay``, decay steps (``decay_ratio`` of the steps, at least 1)."""
    phases = {"warmup": cfg.num_warmup_steps or math.ceil(cfg.warmup_ratio * num_training_steps)}
    if cfg.lr_scheduler_type == "warmup_stable_decay":
        phases["decay"] = max(1, math.ceil(cfg.decay_ratio * num_training_steps))
        if phases["warmup"] + phases["decay"] > num_training_steps:
            raise ConfigError(
                f"decay_ratio={cfg.decay_ratio!r}: {phases['warmup']} warmup + {phases['decay']} "
                f"decay steps exceed the {num_training_steps} training steps. Fix: lower "
                "--num_warmup_steps/--warmup_ratio or --decay_ratio, or train longer.")
    return phases


def build_scheduler(optimizer, cfg, num_training_steps: int):
    """The LR schedule for ``num_training_steps`` optimizer steps; every name in
    `choices.SCHEDULERS` builds here. Each takes transformers' defaults for its own knobs
    (cosine_with_restarts: 1 cycle; polynomial: power 1 down to lr_end 1e-7; inverse_sqrt:
    timescale = warmup), except warmup_stable_decay, whose decay phase is ``decay_ratio`` of the
    steps, shaped by ``lr_decay_type`` (default cosine; linear; 1-sqrt: ``1 - sqrt(progress)``)
    down to 0 (stable at the peak rate in between)."""
    phases = scheduler_phases(cfg, num_training_steps)
    specific = {"num_decay_steps": phases["decay"], "decay_type": cfg.lr_decay_type or "cosine"} \
        if "decay" in phases else None
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=phases["warmup"],
                         num_training_steps=num_training_steps,
                         scheduler_specific_kwargs=specific)


@dataclass
class Training:
    """What trains: the prepared module and optimizer, the training forward (compiled with
    ``--torch_compile``, else the module), and what the model's layout tells the collator."""
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    forward: torch.nn.Module | None
    flop_counter: FlopCounter
    position_offset: int
    attn_implementation: str

    @property
    def inner(self):
        """The unwrapped `loading.MaskedLMModule` (probes, the head switch)."""
        from accelerate.utils import extract_model_from_parallel
        return extract_model_from_parallel(self.module)


def prepare_training(cfg, accelerator, model) -> Training:
    """The training module around ``model`` (masked-only head per ``--sparse_prediction``),
    the ``--optimizer`` (`build_optimizer`; refused where the launch cannot run it:
    `check_optimizer_launch`), both through ``accelerator.prepare`` (DDP, ZeRO, FSDP2 as
    launched), and the ``--torch_compile`` forward (eval and the probe run eager)."""
    check_optimizer_launch(cfg, accelerator)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offset, attn = position_offset(model), attn_implementation(model)
    flop_counter = FlopCounter.for_model(model)  # train/tflops and train/mfu
    module = MaskedLMModule(model, sparse_prediction=cfg.sparse_prediction)
    optimizer = build_optimizer(module, cfg)
    module, optimizer = accelerator.prepare(module, optimizer)
    forward = compile_forward(module, accelerator, cfg.torch_compile_mode) \
        if cfg.torch_compile else None
    return Training(module, optimizer, forward, flop_counter, offset, attn)


def compile_forward(module, accelerator, mode: str):
    """``torch.compile`` of the prepared training module (inductor; DDP or one process)."""
    from accelerate.utils import DistributedType
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU,
                                            DistributedType.MULTI_CPU):
        raise ConfigError(f"--torch_compile is supported with DDP or one process, not under "
                          f"{accelerator.distributed_type.value}. Fix: drop --torch_compile, or "
                          "launch without DeepSpeed/FSDP.")
    return torch.compile(module, mode=mode)
