"""mlmkit's own attention function for packed rows, registered in transformers' attention registry.

Models whose attention goes through transformers' registry (``ALL_ATTENTION_FUNCTIONS``) but whose
own mask code cannot isolate packed examples -- ModernBERT (its local layers build a
sliding-window mask of their own, which a block-diagonal mask would widen to the whole example)
and ESM (its embeddings multiply by a 2-D mask) -- run this function instead, under the name
`PACKED_ATTENTION` (their `packed.PackedPath` entries; the project chooses it, not the user).

Packed rows reach it as the flash-attention form (`rows.PackedRows.flash_inputs`: a 2-D all-ones
``attention_mask`` and the boundaries ``cu_seq_lens_q/k``, in the row convention `PackedRows`
states), which transformers hands every attention call in ``**kwargs``. The function computes
each example's attention alone:

* on CUDA in half precision, with `torch.nn.attention.varlen.varlen_attn` where this torch has it
  (with attention dropout in training: the flash op under it, `check_dropout_kernel`):
  no padding computed, sliding windows through ``window_size``; the boundaries may repeat their
  last entry (zero-length segments: `steps.StaticShapes` pads them to a fixed length for
  compiled steps) and ``max_length_q/k`` may be an upper bound (the row width) -- both checked on
  a GPU by ``benchmarks/gpu_checks.py varlen`` against the block mask;
* elsewhere (CPU, fp32, dropout in training), exactly with SDPA under the block mask built from
  the boundaries, AND the model's sliding window (``|i - j| <= window``) -- the path the tests and
  the start-up probe run on CPU.

Padded batches (no boundaries) go to transformers' own SDPA function with the mask the model
built (transformers builds it in SDPA form: `packed_mask`, registered under the same name).

On CUDA the BERT family runs this function too (its `packed.PackedPath` entry receives packed
rows ``varlen``): its packed rows then skip the dense (R, 1, T, T) block mask, which forces
SDPA's masked kernel.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from mlmkit.batch.rows import PackedRows
from mlmkit.config.choices import PACKED_ATTENTION

__all__ = ["PACKED_ATTENTION", "band", "block_mask", "packed_attention_forward", "packed_mask",
           "register"]


def band(width: int, window: int, device=None) -> torch.Tensor:
    """(T, T) bool: positions within ``window`` of each other (a bidirectional sliding window,
    bounds inclusive)."""
    pos = torch.arange(width, device=device)
    return (pos[:, None] - pos[None, :]).abs() <= window


def block_mask(cu_seq_lens: torch.Tensor, n_rows: int, width: int,
               window: int | None = None) -> torch.Tensor:
    """(R, 1, T, T) bool, True = may attend: same segment, and within ``window`` positions of
    each other when given (a bidirectional sliding window, bounds inclusive)."""
    seg = PackedRows.segment_ids(cu_seq_lens, n_rows, width)  # (R, T)
    allowed = seg[:, :, None] == seg[:, None, :]  # (R, T, T)
    if window is not None:
        allowed &= band(width, window, seg.device)  # (T, T) broadcast
    return allowed[:, None]


class _MaskCache:
    """The block masks of the current forward: every layer gets the same boundaries tensor, so
    each (boundaries, window) mask is built once per forward, not once per layer (eager only:
    a compiled forward builds it in the graph, where the cache's Python checks would break it)."""

    def __init__(self):
        self.cu: torch.Tensor | None = None
        self.masks: dict = {}

    def get(self, cu: torch.Tensor, n_rows: int, width: int, window: int | None) -> torch.Tensor:
        if self.cu is not cu or self.version != cu._version:
            self.cu, self.version, self.masks = cu, cu._version, {}
        key = (n_rows, width, window)
        if key not in self.masks:
            self.masks[key] = block_mask(cu, n_rows, width, window)
        return self.masks[key]


_CACHE = _MaskCache()


try:  # torch's variable-length flash attention (CUDA), where this torch has it
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
    # its keyword arguments: ``scale`` and ``window_size`` arrived after its first release
    VARLEN_KEYWORDS = frozenset(inspect.signature(_varlen_attn).parameters)
except ImportError:
    _varlen_attn, VARLEN_KEYWORDS = None, frozenset()


# Attention dropout in training (BERT's attention_probs_dropout_prob): ``varlen_attn`` has no
# dropout, so the same flash kernel is called through the op under it,
# ``aten._flash_attention_forward`` (differentiable; dropout from the CUDA generator, as SDPA's
# flash path). `check_dropout_kernel` tries it once on the device before training relies on it.
_DROPOUT_KERNEL: dict = {"ok": None}


def check_dropout_kernel(device) -> bool:
    """Whether the flash kernel with dropout runs forward and backward on ``device`` (CUDA, bf16);
    tried once. Where it does not, training with attention dropout takes the block-mask path."""
    if _DROPOUT_KERNEL["ok"] is None:
        try:
            q = torch.randn(8, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
            cu = torch.tensor([0, 3, 8, 8], device=device, dtype=torch.int32)  # an empty segment
            out = _flash_varlen(q, q, q, cu, cu, 8, 8, 0.1, None, None)
            out.float().sum().backward()
            _DROPOUT_KERNEL["ok"] = bool(q.grad is not None)
        except Exception as err:  # an older torch: the block-mask path, said once
            import warnings
            warnings.warn(f"mlmkit: flash attention with dropout is unavailable ({err}); packed "
                          "rows with attention dropout use SDPA under the block mask")
            _DROPOUT_KERNEL["ok"] = False
    return _DROPOUT_KERNEL["ok"]


def _flash_varlen(query, key, value, cu_q, cu_k, max_q: int, max_k: int, dropout: float,
                  scale: float | None, half: int | None) -> torch.Tensor:
    """(N, H, D) x3 -> (N, H, D): the flash kernel over the boundaries, with dropout."""
    window = {} if half is None else {"window_size_left": half, "window_size_right": half}
    return torch.ops.aten._flash_attention_forward(
        query, key, value, cu_q, cu_k, max_q, max_k, dropout, False, False, scale=scale,
        **window)[0]


def flash_head_dim(dim: int) -> bool:
    """Whether the flash kernel takes heads of ``dim``: a multiple of 8, at most 256 (it does not
    pad them; e.g. TinyBERT's 312 / 12 = 26 does not fit and takes the block-mask path)."""
    return dim % 8 == 0 and dim <= 256


def varlen_available(query: torch.Tensor) -> bool:
    """Whether the CUDA variable-length kernel can run these inputs."""
    return (_varlen_attn is not None and query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16) and flash_head_dim(query.shape[-1]))


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, cu_seq_lens_q=None,
                             cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """An attention function of transformers' registry: query/key/value (R, H, T, D) ->
    ((R, T, H, D), None). ``sliding_window`` is in the form transformers passes it (ModernBERT:
    the half window + 1, flash's convention): a position sees those within ``sliding_window - 1``.
    """
    if cu_seq_lens_q is None:  # padded batch: the model's own (SDPA-form) mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    n_rows, heads, width, dim = query.shape
    half = sliding_window - 1 if sliding_window is not None else None
    keywords = VARLEN_KEYWORDS
    flash = varlen_available(query) and key.shape[1] == heads and (
        (dropout == 0.0 and (half is None or "window_size" in keywords))
        or (dropout > 0.0 and _DROPOUT_KERNEL["ok"]))
    if flash:
        flat = [t.transpose(1, 2).reshape(n_rows * width, heads, dim) for t in (query, key, value)]
        cu_q = cu_seq_lens_q.to(torch.int32)
        cu_k = (cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q).to(torch.int32)
        max_q, max_k = int(max_length_q or width), int(max_length_k or max_length_q or width)
        if dropout > 0.0:
            out = _flash_varlen(*flat, cu_q, cu_k, max_q, max_k, dropout, scaling, half)
            return out.view(n_rows, width, heads, dim), None
        more = {"scale": scaling} if "scale" in keywords else {}
        if scaling is not None and "scale" not in keywords:  # the kernel's default: dim ** -0.5
            flat[0] = flat[0] * (scaling * dim ** 0.5)
        if half is not None:
            more["window_size"] = (half, half)
        out = _varlen_attn(*flat, cu_q, cu_k, max_q, max_k, **more)
        return out.view(n_rows, width, heads, dim), None
    if torch.compiler.is_compiling():  # one graph: no Python-side cache (identity, version)
        mask = block_mask(cu_seq_lens_q, n_rows, width, half)  # (R, 1, T, T)
    else:
        mask = _CACHE.get(cu_seq_lens_q, n_rows, width, half)  # (R, 1, T, T)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=key.shape[1] != heads)
    return out.transpose(1, 2).contiguous(), None  # (R, T, H, D)


def packed_mask(*args, allow_is_bidirectional_skip: bool = False, **kwargs):
    """transformers' SDPA mask builder, never skipping the mask of a 2-D mask without zeros:
    that skip asks ``padding_mask.all()`` on the host, a host-device synchronisation in every
    forward on a GPU (packed rows carry an all-ones 2-D mask here, which
    `packed_attention_forward` does not read when the boundaries are given)."""
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, allow_is_bidirectional_skip=False, **kwargs)


def register() -> str:
    """Register `packed_attention_forward` (and `packed_mask`, SDPA's mask builder, for padded
    batches) under `PACKED_ATTENTION`; idempotent. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, packed_mask)
    return PACKED_ATTENTION
