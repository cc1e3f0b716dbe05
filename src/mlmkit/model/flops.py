"""Model FLOPs of a training step, and the device's peak: ``train/tflops`` and ``train/mfu``.

The FLOPs counted are those the step *must* do (model FLOPs, as in the PaLM paper's MFU), not the
ones a layout happens to spend on padding or recomputation:

* every encoder matrix multiply on every real token: ``6 x P_encoder`` per token (2 per
  multiply-accumulate, forward + twice that backward), ``P_encoder`` the weights of the ``Linear``
  layers of the base model;
* attention over each example's own length: ``12 x layers x hidden x L^2`` per example (Q.K^T
  and A.V, forward and backward) -- a packed row costs what its examples cost alone;
* the MLM head (transform and vocabulary projection: the ``Linear`` layers outside the base
  model) on the predicted positions when it is masked-only, else on every real token.

Padding, the attention between packed neighbours that the mask discards, embeddings, norms and
activation recomputation (``--gradient_checkpointing``) are not counted, so MFU compares layouts
fairly: only useful work counts. ``train/tflops`` is per device; ``train/mfu`` divides it by the
device's dense peak for the step's precision (`PEAK_TFLOPS`, or ``--peak_tflops``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# Dense (no sparsity) peak TFLOP/s per device: (16-bit tensor core, fp32 without TF32). Matched
# as whole words of torch.cuda.get_device_name() ("L4" is not "NVIDIA L40", "A10" not "A10G"),
# first match wins (so the specific names come first).
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H200 NVL", 835.0, 60.0),
    ("GH200", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("H100", 989.0, 67.0),       # SXM
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
)


def peak_tflops(device_name: str | None, half_precision: bool) -> float | None:
    """The dense peak of a named device (16-bit or fp32), or None if the table lacks it."""
    for name, half, full in PEAK_TFLOPS:
        if device_name and re.search(rf"\b{re.escape(name)}\b", device_name):
            return half if half_precision else full
    return None


def device_peak_tflops(accelerator, override: float | None) -> float | None:
    """``--peak_tflops`` if given, else the table's value for this CUDA device and precision;
    None on CPU and unknown devices (then ``train/mfu`` is not logged)."""
    if override:
        return float(override)
    import torch
    if accelerator.device.type != "cuda":
        return None
    half = accelerator.mixed_precision in ("bf16", "fp16")
    return peak_tflops(torch.cuda.get_device_name(accelerator.device), half)


def _numel(param) -> int:
    return int(getattr(param, "ds_numel", 0) or param.numel())  # ZeRO-3 partitions: ds_numel


def _linear_weights(module: nn.Module) -> int:
    return sum(_numel(m.weight) for m in module.modules()
               if isinstance(m, nn.Linear) and m.weight is not None)


@dataclass(frozen=True)
class FlopCounter:
    """Per-token and per-example FLOP coefficients of one masked-LM model (see the module doc)."""
    encoder_per_token: float
    attention_per_square: float  # x sum of L^2 over examples
    head_per_prediction: float

    @classmethod
    def for_model(cls, model: nn.Module) -> "FlopCounter":
        """From a ``*ForMaskedLM`` model (ZeRO-3 partitioned weights count their full size)."""
        base = model.base_model
        encoder = _linear_weights(base)
        head = _linear_weights(model) - encoder
        if head == 0:  # a head that is not an nn.Linear (tied functional projection): V x H
            emb = model.get_input_embeddings()
            head = _numel(emb.weight) if emb is not None else 0
        cfg = model.config
        layers = getattr(cfg, "num_hidden_layers", 0) or 0
        hidden = getattr(cfg, "hidden_size", 0) or 0
        return cls(6.0 * encoder, 12.0 * layers * hidden, 6.0 * head)

    def step_flops(self, lengths, predicted: int, sparse_head: bool) -> float:
        """FLOPs of one micro-batch: ``lengths`` its examples' real lengths, ``predicted`` its
        masked (predicted) positions."""
        real = sum(lengths)
        head_tokens = predicted if sparse_head else real
        return (self.encoder_per_token * real + self.head_per_prediction * head_tokens
                + self.attention_per_square * sum(n * n for n in lengths))
