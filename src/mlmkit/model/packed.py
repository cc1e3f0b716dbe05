"""The packed paths of the architectures whose own attention cannot isolate packed examples as
the collator lays them out: one `PackedPath` entry per architecture family in `PACKED_PATHS`
(which model types, how their attention receives packed rows, their patch), looked up by
`packed_path` and applied to a loaded model by `use_packed_path`. Each example of a packed row
(`rows.PackedRows`) is then computed alone; the start-up probe checks the path taken.

A new architecture's packed path is one entry, plus its patch where the model's own code reads
the mask (a hook object or a module-level function below).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mlmkit.batch.rows import PackedRows
from mlmkit.model.attention import band, check_dropout_kernel, register

# How an architecture's attention receives packed rows (`PackedPath.receives`):
BLOCK_MASK = "block_mask"            # the collator's block mask, as it is
ATTENTION = "attention"              # mlmkit's registered attention function (the boundaries)
VARLEN = "varlen"                    # the block mask; on CUDA mlmkit's attention function
BLOCK_MASK_3D = "block_mask_3d"      # the block mask as a (batch, query, key) mask
HANDOVER = "block_mask_handover"     # the block mask handed to the modules that take the mask
LONGFORMER_EXACT = "longformer_exact"  # handed to each layer's self-attention, computed exactly
RECEIVES = (BLOCK_MASK, ATTENTION, VARLEN, BLOCK_MASK_3D, HANDOVER, LONGFORMER_EXACT)


@dataclass(frozen=True)
class PackedPath:
    """One architecture family's packed path: the ``model_types`` it covers, how their attention
    ``receives`` packed rows (one of `RECEIVES`), and the ``patch`` applied to the model where its
    own code reads the mask (called with the model; idempotent).

    * `BLOCK_MASK`: the collator's block mask as it is (the patch, if any, prepares the model);
    * `ATTENTION` (unless the user named an ``--attn_implementation``): mlmkit's registered
      attention function (`attention.PACKED_ATTENTION`), which computes each example alone from
      its boundaries; padded batches run transformers' SDPA under the model's own mask;
    * `VARLEN`: the block mask, but on CUDA (``varlen``, unless the user named an attention)
      mlmkit's attention function: torch's variable-length flash kernel over the boundaries
      instead of a dense (R, 1, T, T) mask, which forces SDPA's masked kernel (their attention
      layers hand transformers' ``**kwargs`` -- ``cu_seq_lens_q/k``, ``max_length_q/k`` -- to the
      registry's function as they are);
    * `BLOCK_MASK_3D`: the block mask as the (batch, query, key) mask the model's own attention
      takes (`DebertaBlockMask`);
    * `HANDOVER`: the block mask taken off the input of a model that builds its mask from a 2-D
      one, and handed to the modules that take the built mask (`HandOver`);
    * `LONGFORMER_EXACT`: the block mask taken off the input and each layer's local attention
      computed exactly under it (`exact_longformer`).
    """
    model_types: tuple[str, ...]
    receives: str
    patch: Callable[[nn.Module], None] | None = None

    def __post_init__(self):
        if self.receives not in RECEIVES:
            raise ValueError(f"PackedPath: receives must be one of {RECEIVES}")

    def apply(self, model: nn.Module, attention: bool = True, varlen: bool = False) -> str | None:
        """Put ``model`` on this path; the path's name (`use_packed_path`)."""
        if self.receives in (ATTENTION, VARLEN):
            if not attention or (self.receives == VARLEN and not varlen):
                return None  # the collator's block mask (or the user's attention) as it is
            model.set_attn_implementation(register())
            if varlen and torch.cuda.is_available():  # attention dropout through the flash kernel?
                check_dropout_kernel(torch.device("cuda", torch.cuda.current_device()))
        if self.patch is not None:
            self.patch(model)
        return {BLOCK_MASK: None, VARLEN: ATTENTION}.get(self.receives, self.receives)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """The collator's packed (R, 1, T, T) mask as bool, True = may attend (SDPA's form is bool;
    eager's additive float: 0 = attend)."""
    return mask.bool() if mask.dtype == torch.bool else mask == 0


class TakeBlockMask:
    """A forward pre-hook on the base model that takes a packed 4-D ``attention_mask`` off its
    input, replaces it by the packed rows' all-ones 2-D mask (`PackedRows.ones_mask`) and keeps
    it, bool (R, T, T), as ``mask`` until the next forward (None for a 2-D mask: padded rows)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    @classmethod
    def install(cls, base: nn.Module) -> "TakeBlockMask":
        base._mlmkit_handover = True
        take = cls()
        base.register_forward_pre_hook(take, with_kwargs=True)
        return take

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.mask = None
        if mask is not None and mask.dim() == 4:
            allowed = _allowed(mask[:, 0])  # (R, T, T)
            self.mask = allowed
            kwargs["attention_mask"] = PackedRows.ones_mask(allowed.shape[:2],
                                                            allowed.device)  # (R, T)
        return args, kwargs


class GiveBlockMask:
    """A forward pre-hook that hands the mask `TakeBlockMask` took to its module in place of the
    mask the module is given (its second argument), in ``form``: ``bool_3d`` (R, T, T), True =
    attend; ``additive_4d`` (R, 1, T, T), 0 / finfo.min in the dtype of the hidden states."""

    def __init__(self, take: TakeBlockMask, form: str):
        self.take, self.form = take, form

    def __call__(self, module, args, kwargs):
        allowed = self.take.mask
        if allowed is None:
            return args, kwargs
        if self.form == "bool_3d":
            mask = allowed
        else:  # additive_4d, in the dtype of the hidden states
            dtype = args[0].dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
                ~allowed, torch.finfo(dtype).min)[:, None]  # (R, 1, T, T)
        if len(args) > 1:
            args = (args[0], mask, *args[2:])
        else:
            kwargs["attention_mask"] = mask
        return args, kwargs


@dataclass(frozen=True)
class HandOver:
    """The patch of a model that builds its attention mask from a 2-D one (XLM, FlauBERT,
    LayoutLM): the packed block mask is taken off the model's input (`TakeBlockMask`) and handed
    to the base model's ``targets`` (an attribute: a module, or a list of them) in ``form``
    (`GiveBlockMask`). 2-D masks (padded batches) pass unchanged."""
    targets: str
    form: str

    def __call__(self, model: nn.Module) -> None:
        base = model.base_model
        if getattr(base, "_mlmkit_handover", False):
            return
        give = GiveBlockMask(TakeBlockMask.install(base), self.form)
        modules = getattr(base, self.targets)
        for target in modules if isinstance(modules, nn.ModuleList) else [modules]:
            target.register_forward_pre_hook(give, with_kwargs=True)


class ExactLongformerAttention:
    """One Longformer layer's self-attention ``forward``: for a packed row (the mask ``take``
    took), SDPA under the block mask AND the band of ``attn.one_sided_attn_window_size``, with
    the layer's own projections and scaling; the model's padding to a multiple of the window is
    one segment per position. Else (padded batches, global attention, ``output_attentions``)
    Longformer's own ``inner`` forward."""

    def __init__(self, attn: nn.Module, inner, take: TakeBlockMask):
        self.attn, self.inner, self.take = attn, inner, take

    def __call__(self, hidden_states, attention_mask=None, is_index_masked=None,
                 is_index_global_attn=None, is_global_attn=None, output_attentions=False):
        allowed = self.take.mask
        if allowed is None or is_global_attn or output_attentions:
            return self.inner(hidden_states, attention_mask=attention_mask,
                              is_index_masked=is_index_masked,
                              is_index_global_attn=is_index_global_attn,
                              is_global_attn=is_global_attn, output_attentions=output_attentions)
        attn = self.attn
        rows, width, dim = hidden_states.shape  # width: padded to a multiple of the window
        n = allowed.shape[-1]
        mask = torch.eye(width, dtype=torch.bool, device=allowed.device).repeat(rows, 1, 1)
        mask[:, :n, :n] = allowed  # (R, T', T')
        mask &= band(width, attn.one_sided_attn_window_size, allowed.device)
        query = self._heads(attn.query(hidden_states) / math.sqrt(attn.head_dim))
        out = torch.nn.functional.scaled_dot_product_attention(
            query, self._heads(attn.key(hidden_states)), self._heads(attn.value(hidden_states)),
            attn_mask=mask[:, None], dropout_p=attn.dropout if attn.training else 0.0, scale=1.0)
        return (out.transpose(1, 2).reshape(rows, width, dim),)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(R, T', D) -> (R, H, T', d)"""
        rows, width, _ = x.shape
        return x.view(rows, width, self.attn.num_heads, self.attn.head_dim).transpose(1, 2)


def exact_longformer(model: nn.Module) -> None:
    """Longformer's local attention is a band of ``attention_window // 2`` positions each side,
    computed in chunks that only mask keys: it cannot keep packed examples apart. For a packed
    row (the collator's block mask, taken off the input by `TakeBlockMask`), each layer's
    self-attention runs exactly instead (`ExactLongformerAttention`)."""
    base = model.base_model
    if getattr(base, "_mlmkit_handover", False):
        return
    take = TakeBlockMask.install(base)
    for layer in base.encoder.layer:
        attn = layer.attention.self
        attn.forward = ExactLongformerAttention(attn, attn.forward, take)


def _block_mask_3d(module, args, kwargs):
    """DeBERTa's pre-hook: a packed (R, 1, T, T) mask becomes bool (R, T, T)."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        kwargs["attention_mask"] = _allowed(mask[:, 0])  # (R, T, T)
    return args, kwargs


def _mask_diagonal(module, args, kwargs):
    """DeBERTa's embeddings' pre-hook: a 3-D mask becomes its diagonal (R, T)."""
    mask = kwargs.get("mask")
    if mask is not None and mask.dim() == 3:
        kwargs["mask"] = mask.diagonal(dim1=1, dim2=2)  # (R, T)
    return args, kwargs


def deberta_block_mask(model: nn.Module) -> None:
    """DeBERTa(-v2/v3) takes a 3-D (batch, query, key) mask in its encoder, but its embeddings
    multiply by the mask as if it were 2-D (a 3-D mask crashes there). The collator's packed
    (R, 1, T, T) mask (bool, or additive float for eager: 0 = attend) becomes a bool (R, T, T)
    mask, and the embeddings get its diagonal (every position of a packed row is in a segment,
    padding included: nothing to zero). Its relative positions are differences within the row,
    the same as within the example. 2-D masks pass unchanged."""
    deberta = model.base_model
    if getattr(deberta, "_mlmkit_block_mask", False):
        return
    deberta.register_forward_pre_hook(_block_mask_3d, with_kwargs=True)
    deberta.embeddings.register_forward_pre_hook(_mask_diagonal, with_kwargs=True)
    deberta._mlmkit_block_mask = True


class PerExampleTokenDropout:
    """ESM's embeddings ``forward`` with token dropout rescaled per example: ESM rescales a row's
    embeddings by its share of mask tokens (``0.88 / (1 - masked / row length)``), per row, not
    per example. In packed rows (boundaries in ``cu_seq_lens_q``, kept by `stash`, a pre-hook on
    the base model) the word embeddings are pre-scaled by ``(1 - row share) / (1 - example
    share)`` so that each example gets its own factor; the padding tail is a segment of its own
    (`PackedRows.segment_ids`)."""

    def __init__(self, embeddings: nn.Module):
        self.embeddings, self.inner, self.cu = embeddings, embeddings.forward, None

    def stash(self, module, args, kwargs):
        self.cu = kwargs.get("cu_seq_lens_q")

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None,
                 inputs_embeds=None):
        embeddings, cu, self.cu = self.embeddings, self.cu, None
        if cu is not None and input_ids is not None and inputs_embeds is None:
            n_rows, width = input_ids.shape
            masked = (input_ids == embeddings.mask_token_id).float()  # (R, T)
            lengths = attention_mask.sum(-1) if attention_mask is not None else width  # as ESM
            row_share = masked.sum(-1) / lengths  # (R,)
            seg = PackedRows.segment_ids(cu, n_rows, width).flatten()  # (R*T,) < R*T segments
            # per-segment sums of a fixed size (bincount's size is data-dependent: a host sync)
            flat = masked.flatten()  # (R*T,)
            sums = masked.new_zeros(2, n_rows * width + 1).index_add_(
                1, seg, torch.stack([flat, torch.ones_like(flat)]))
            share = (sums[0] / sums[1].clamp(min=1))[seg].view(n_rows, width)  # (R, T)
            factor = (1 - row_share)[:, None] / (1 - share)  # (R, T)
            inputs_embeds = embeddings.word_embeddings(input_ids) * factor[..., None].to(
                embeddings.word_embeddings.weight.dtype)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, inputs_embeds=inputs_embeds)


def per_example_token_dropout(model: nn.Module) -> None:
    """ESM-2 (``token_dropout`` in its config): `PerExampleTokenDropout` replaces the embeddings'
    forward."""
    if not getattr(model.config, "token_dropout", False):
        return
    esm = model.base_model
    embeddings = esm.embeddings
    if getattr(embeddings, "_mlmkit_per_example", False):
        return
    embeddings._mlmkit_per_example = True
    rescale = PerExampleTokenDropout(embeddings)
    esm.register_forward_pre_hook(rescale.stash, with_kwargs=True)
    embeddings.forward = rescale


def default_language(model: nn.Module) -> None:
    """X-MOD runs one language adapter per batch: a model whose config lists one language gets
    it as the default; with several, the config's ``default_language`` must say which (else the
    probe reports transformers' error and the run is refused)."""
    languages = list(getattr(model.config, "languages", None) or ())
    if model.config.default_language is None and len(languages) == 1:
        model.set_default_language(languages[0])  # X-MOD needs a language; one is unambiguous


# One entry per architecture family; a model type in none of them takes the collator's packed
# layout as it is (and the probe decides whether it isolates).
PACKED_PATHS = (
    # The BERT family: the collator's block mask isolates packed examples exactly; on CUDA the
    # variable-length kernel instead of the dense mask.
    PackedPath(("bert", "roberta", "xlm-roberta", "camembert", "electra"), VARLEN),
    # ModernBERT's local layers build a sliding-window mask of their own, which a block mask
    # would widen to the whole example: mlmkit's attention function windows within the example.
    PackedPath(("modernbert",), ATTENTION),
    # ESM's embeddings see a 2-D mask only; ESM-2's token dropout is rescaled per example.
    PackedPath(("esm",), ATTENTION, per_example_token_dropout),
    PackedPath(("deberta", "deberta-v2"), BLOCK_MASK_3D, deberta_block_mask),
    PackedPath(("xlm", "flaubert"), HANDOVER, HandOver("attentions", "bool_3d")),
    PackedPath(("layoutlm",), HANDOVER, HandOver("encoder", "additive_4d")),
    PackedPath(("longformer",), LONGFORMER_EXACT, exact_longformer),
    PackedPath(("xmod",), BLOCK_MASK, default_language),
)


def packed_path(model_type: str | None) -> PackedPath | None:
    """The `PACKED_PATHS` entry covering ``model_type``, or None."""
    return next((entry for entry in PACKED_PATHS if model_type in entry.model_types), None)


def use_packed_path(model: nn.Module, attention: bool = True, varlen: bool = False) -> str | None:
    """Give ``model`` its architecture's packed path (`packed_path`) and name it: ``attention``
    (mlmkit's attention function), ``block_mask_3d``, ``block_mask_handover``,
    ``longformer_exact``, or None (the collator's packed layout as it is). ``attention``: the
    user named no --attn_implementation; ``varlen``: a CUDA run. The start-up probe then checks
    this path."""
    entry = packed_path(getattr(model.config, "model_type", None))
    return entry.apply(model, attention=attention, varlen=varlen) if entry else None
