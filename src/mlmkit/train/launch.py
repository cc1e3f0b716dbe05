"""The Accelerator of a run, and the launch shape a checkpoint must be resumed under.

Launch settings (processes, nodes, mixed precision, DDP, ZeRO or FSDP2) come from `accelerate
launch` and its config file, never from the recipe config; this module only adapts to them.
"""

from __future__ import annotations

import datetime
import os

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule

from mlmkit.config.errors import ConfigError
from mlmkit.config.shape import micro_batch


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
    * Every backend: collectives time out after ``--ddp_timeout`` seconds (default 1800, e.g.
      while one process tokenizes and the others wait at a barrier).
    * FSDP (``distributed_type: FSDP``, ``fsdp_version: 2``; any device): the plugin comes from the
      launch's ``FSDP_*`` settings, with one change (`fsdp_plugin`): when the config names no
      layer classes, each transformer layer is its own FSDP unit, chosen from the model by
      `fsdp_layer_classes`, which keeps the tied embedding/decoder pair in one unit, and the
      inner model may be run directly (`gather_root_on_direct_calls`).
    * CPU with FSDP: Accelerate enables FSDP on accelerators only (on CPU its state becomes
      multi-CPU and drops the plugin), so the Accelerator is built as for CPU DDP (``cpu=True``,
      gloo) and then switched to FSDP with the plugin, the way Accelerate's own state does it on
      GPUs (`_switch_to_fsdp`); FSDP2's ``fully_shard`` runs on CPU tensors with gloo collectives.
    """
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    no_gpu = not torch.cuda.is_available()
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if no_gpu:  # what DeepSpeed would detect anyway, without its "[WARNING] Setting accelerator"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    plugin = fsdp_plugin() if use_fsdp else None
    if plugin is not None and plugin.fsdp_version != 2:
        raise ConfigError(f"the accelerate config asks for FSDP version {plugin.fsdp_version}; "
                          "mlmkit runs FSDP2 (fully_shard) only. Fix: set `fsdp_version: 2` in "
                          "its fsdp_config, as accelerate_configs/fsdp2.yaml does.")
    accelerator = Accelerator(
        cpu=no_gpu and not use_deepspeed,
        # --ddp_timeout for every collective (DDP, FSDP and DeepSpeed alike init through it)
        kwargs_handlers=[InitProcessGroupKwargs(
            backend="gloo" if no_gpu and several else "nccl",
            timeout=datetime.timedelta(seconds=cfg.ddp_timeout))],
        fsdp_plugin=plugin,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=trackers or None, project_dir=str(cfg.output_dir))
    if plugin is not None and no_gpu:
        _switch_to_fsdp(accelerator, plugin)
    if accelerator.state.deepspeed_plugin is not None:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # DeepSpeed's bookkeeping only (the recipe forms the batches): the nominal micro-batch
        ds_config["train_micro_batch_size_per_gpu"] = micro_batch(cfg)[0]
        ds_config["gradient_clipping"] = cfg.max_grad_norm
        ds_config["zero_force_ds_cpu_optimizer"] = False  # offload: keep the recipe's torch AdamW
    if not accelerator.is_main_process:  # transformers' warnings, datasets' bars: once per run
        import datasets
        import transformers
        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    return accelerator


def zero_note(accelerator) -> str | None:
    """A note for one GPU process under DeepSpeed: ZeRO shards nothing there, so it only costs
    (README, "Scale out"); None otherwise."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or accelerator.num_processes > 1 or accelerator.device.type != "cuda":
        return None
    return (f"one GPU under DeepSpeed ZeRO-{plugin.zero_stage}, which shards nothing on one "
            "process and measured 1.65x (ZeRO-2) to 3.8x (ZeRO-3) slower; unless the model does "
            "not fit (AdamW: ~16 bytes per parameter + activations), launch without DeepSpeed "
            "(plain `accelerate launch recipes/mlm.py`, or accelerate_configs/ddp.yaml)")


def fsdp_plugin():
    """Accelerate's FSDP plugin, read from the launch's ``FSDP_*`` settings, whose auto-wrap
    policy finds the transformer layer classes in the model (`fsdp_layer_classes`) when the
    accelerate config names none (``fsdp_transformer_layer_cls_to_wrap``).

    Accelerate's own default reads ``_no_split_modules`` from the prepared module, which here is
    `loading.MaskedLMModule` (no such attribute: nothing would be sharded layer by layer), and
    BERT-like models list their embeddings there too: sharding the embeddings as a unit of their
    own separates the word embeddings from the decoder tied to them, and the tie breaks. It also
    lets the inner model be run directly (`gather_root_on_direct_calls`).
    """
    return MLMFullyShardedDataParallelPlugin()


class MLMFullyShardedDataParallelPlugin(FullyShardedDataParallelPlugin):
    """Accelerate's FSDP plugin, whose wrap policy takes the model's own layers (`fsdp_plugin`)
    and lets its inner model be run directly (`gather_root_on_direct_calls`)."""

    def set_auto_wrap_policy(self, model):
        policy = getattr(self.auto_wrap_policy, "__name__", "")
        if policy == "transformer_auto_wrap_policy" and self.transformer_cls_names_to_wrap is None:
            self.transformer_cls_names_to_wrap = fsdp_layer_classes(model)
        gather_root_on_direct_calls(model)  # the one hook FSDP preparation offers
        super().set_auto_wrap_policy(model)


def fsdp_layer_classes(module) -> list[str]:
    """The class names FSDP2 shards as units of their own: the wrapped Hugging Face model's
    ``_no_split_modules`` (its transformer layers), minus every class that holds the input or
    output embedding weight. Those stay in the root unit, so a decoder tied to the word
    embeddings shares one parameter there, gathered once per forward."""
    hf = next((m for m in module.modules() if getattr(m, "_no_split_modules", None)), None)
    if hf is None:
        return []
    embeddings = [getattr(get(), "weight", None) for get in
                  (hf.get_input_embeddings, getattr(hf, "get_output_embeddings", lambda: None))]
    embeddings = [w for w in embeddings if w is not None]
    names = []
    for name in sorted(hf._no_split_modules):
        instances = [m for m in hf.modules() if type(m).__name__ == name]
        holds_embedding = any(p is w for m in instances for p in m.parameters() for w in embeddings)
        if instances and not holds_embedding:
            names.append(name)
    return names


def _switch_to_fsdp(accelerator, plugin) -> None:
    """Turn a CPU (gloo) Accelerator into an FSDP one: what `AcceleratorState.__init__` does when
    it enables FSDP on GPUs, including the copy into the process-wide state that every later
    `AcceleratorState()` reads."""
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def gather_root_on_direct_calls(root) -> None:
    """Let code run the Hugging Face model inside ``root`` (the prepared `MaskedLMModule`)
    directly, not through ``root``'s forward -- the pad-sensitivity and isolation probes run the
    inner model's own forward -- under FSDP2 as under every other engine.

    FSDP2 gathers the root unit's parameters (embeddings, head) in the root's forward hook only
    (the transformer layers, units of their own, gather in theirs), so a direct call would meet
    sharded weights, and a call before the root's first forward would make the first layer that
    runs take itself for the root. A forward pre-hook on each inner model initialises the root
    (as its first forward would) and gathers its parameters; they stay gathered, as after any
    root forward, until the next backward frees them. Inside the root's own forward both are
    no-ops. Other engines: nothing to do (ZeRO-3 gathers per submodule by itself)."""
    for inner in root.modules():
        if inner is not root and hasattr(inner, "_no_split_modules") and \
                not getattr(inner, "_mlmkit_gathers_root", False):
            inner.register_forward_pre_hook(_GatherRoot(root))
            inner._mlmkit_gathers_root = True


class _GatherRoot:
    """The forward pre-hook of `gather_root_on_direct_calls`: initialise and gather ``root``."""

    def __init__(self, root):
        self.root = root

    def __call__(self, inner, args) -> None:
        if isinstance(self.root, FSDPModule):
            self.root._get_fsdp_state()._lazy_init()  # what the root's first forward does first
            self.root.unshard()  # a no-op when already gathered


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
