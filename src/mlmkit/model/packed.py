"""The packed paths of the architectures whose own attention cannot isolate packed examples:
`use_packed_path` switches a loaded model onto mlmkit's registered attention function
(`mlmkit.model.attention`) and patches what else reads the mask (DeBERTa's relative positions,
Longformer's windows, ESM-2's token dropout), so each example of a packed row is computed alone.
"""

from __future__ import annotations

import torch
from torch import nn

from mlmkit.model.attention import band, check_dropout_kernel, register, segment_ids

# Architectures whose attention goes through transformers' registry but whose own mask code
# cannot isolate packed examples: they run mlmkit's registered attention function
# (`attention.py`), which computes each example of a packed row alone. ModernBERT's local layers
# window within the example there; ESM's embeddings see a 2-D mask only.
PACKED_ATTENTION_TYPES = ("modernbert", "esm")
# The BERT family: the collator's block mask isolates packed examples exactly, but on a GPU a
# dense (R, 1, T, T) mask forces SDPA's masked kernel and computes every padding position. On
# CUDA (``varlen``) they run mlmkit's registered attention function instead: torch's
# variable-length flash kernel over the boundaries (`attention.packed_attention_forward`; their
# attention layers hand transformers' ``**kwargs`` -- ``cu_seq_lens_q/k``, ``max_length_q/k``
# -- to the registry's function as they are).
VARLEN_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


# Architectures with attention code of their own that take a (batch, query, key) mask: the
# collator's packed block mask reaches them in that form (`_deberta_block_mask`); their relative
# positions are differences within the row, the same as within the example.
BLOCK_MASK_3D_TYPES = ("deberta", "deberta-v2")
# Architectures that build their attention mask from a 2-D one inside forward(): the 2-D mask
# they are given is all ones, and the packed block mask is handed to the module that takes the
# built mask, in the form it takes (`_handover_block_mask`): model type -> (the modules, the form).
BLOCK_MASK_HANDOVER = {
    "xlm": (lambda base: list(base.attentions), "bool_3d"),        # (R, T, T), True = attend
    "flaubert": (lambda base: list(base.attentions), "bool_3d"),
    "layoutlm": (lambda base: [base.encoder], "additive_4d"),      # (R, 1, T, T), 0 / finfo.min
}


def use_packed_path(model: nn.Module, attention: bool = True, varlen: bool = False) -> str | None:
    """Give ``model`` the project's exact packed path where its architecture needs one, and name
    it (None: the collator's packed layout as it is). The start-up probe then checks this path.

    * `PACKED_ATTENTION_TYPES` (with ``attention``: the user named no --attn_implementation):
      mlmkit's packed attention function (`attention.PACKED_ATTENTION`); padded batches run
      transformers' SDPA under the model's own mask, as before; with ``varlen`` (a CUDA run)
      also `VARLEN_TYPES` (the variable-length kernel instead of the dense block mask);
    * `BLOCK_MASK_3D_TYPES`: the packed block mask handed over as the 3-D mask they accept;
    * `BLOCK_MASK_HANDOVER`: the packed block mask handed to the modules that take the mask the
      model builds;
    * Longformer: its local attention computed exactly on packed rows (`_longformer_block_mask`).

    X-MOD runs one language adapter per batch: a model whose config lists one language gets it as
    the default; with several, the config's ``default_language`` must say which (else the probe
    reports transformers' error and the run is refused).
    """
    model_type = getattr(model.config, "model_type", None)
    languages = list(getattr(model.config, "languages", None) or ())
    if model_type == "xmod" and model.config.default_language is None and len(languages) == 1:
        model.set_default_language(languages[0])  # X-MOD needs a language; one is unambiguous
    if model_type == "longformer":
        _longformer_block_mask(model.base_model)
        return "longformer_exact"
    if model_type in BLOCK_MASK_HANDOVER:
        modules, form = BLOCK_MASK_HANDOVER[model_type]
        _handover_block_mask(model.base_model, modules(model.base_model), form)
        return "block_mask_handover"
    if model_type in BLOCK_MASK_3D_TYPES:
        _deberta_block_mask(model.base_model)
        return "block_mask_3d"
    if not attention or not (model_type in PACKED_ATTENTION_TYPES
                             or (varlen and model_type in VARLEN_TYPES)):
        return None
    model.set_attn_implementation(register())
    if varlen and torch.cuda.is_available():  # attention dropout through the flash kernel?
        check_dropout_kernel(torch.device("cuda", torch.cuda.current_device()))
    if model_type == "esm" and getattr(model.config, "token_dropout", False):
        _per_example_token_dropout(model.base_model)
    return "attention"


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """The collator's packed (R, 1, T, T) mask as bool, True = may attend (SDPA's form is bool;
    eager's additive float: 0 = attend)."""
    return mask.bool() if mask.dtype == torch.bool else mask == 0


def _take_block_mask(base: nn.Module) -> dict:
    """A hook on ``base`` that takes a packed 4-D ``attention_mask`` off its input, replaces it by
    a 2-D all-ones mask (every position of a packed row is in a segment, padding included) and
    keeps it, bool (R, T, T), under ``"mask"`` of the returned dict until the next forward."""
    base._mlmkit_handover = True
    state: dict = {}

    def take(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        state.pop("mask", None)
        if mask is not None and mask.dim() == 4:
            allowed = _allowed(mask[:, 0])  # (R, T, T)
            state["mask"] = allowed
            kwargs["attention_mask"] = torch.ones(allowed.shape[:2], dtype=torch.long,
                                                  device=allowed.device)  # (R, T)
        return args, kwargs

    base.register_forward_pre_hook(take, with_kwargs=True)
    return state


def _longformer_block_mask(base: nn.Module) -> None:
    """Longformer's local attention is a band of ``attention_window // 2`` positions each side,
    computed in chunks that only mask keys: it cannot keep packed examples apart. For a packed
    row (the collator's block mask, taken off the input by `_take_block_mask`), each layer's
    self-attention runs exactly instead: SDPA under the block mask AND the band, with the layer's
    own projections and scaling. The model's padding to a multiple of the window is one segment
    per position. Padded batches, global attention (``attention_mask`` 2) and
    ``output_attentions`` run Longformer's own code."""
    if getattr(base, "_mlmkit_handover", False):
        return
    state = _take_block_mask(base)
    for layer in base.encoder.layer:
        attn = layer.attention.self
        attn.forward = _exact_longformer(attn, attn.forward, state)


def _exact_longformer(attn: nn.Module, inner, state: dict):
    import math


    def forward(hidden_states, attention_mask=None, is_index_masked=None,
                is_index_global_attn=None, is_global_attn=None, output_attentions=False):
        allowed = state.get("mask")
        if allowed is None or is_global_attn or output_attentions:
            return inner(hidden_states, attention_mask=attention_mask,
                         is_index_masked=is_index_masked,
                         is_index_global_attn=is_index_global_attn,
                         is_global_attn=is_global_attn, output_attentions=output_attentions)
        rows, width, dim = hidden_states.shape  # width: padded to a multiple of the window
        n = allowed.shape[-1]
        mask = torch.eye(width, dtype=torch.bool, device=allowed.device).repeat(rows, 1, 1)
        mask[:, :n, :n] = allowed  # (R, T', T')
        mask &= band(width, attn.one_sided_attn_window_size, allowed.device)

        def heads(x):  # (R, T', D) -> (R, H, T', d)
            return x.view(rows, width, attn.num_heads, attn.head_dim).transpose(1, 2)
        query = heads(attn.query(hidden_states) / math.sqrt(attn.head_dim))
        out = torch.nn.functional.scaled_dot_product_attention(
            query, heads(attn.key(hidden_states)), heads(attn.value(hidden_states)),
            attn_mask=mask[:, None], dropout_p=attn.dropout if attn.training else 0.0, scale=1.0)
        return (out.transpose(1, 2).reshape(rows, width, dim),)
    return forward


def _handover_block_mask(base: nn.Module, targets: list[nn.Module], form: str) -> None:
    """For a model that builds its attention mask from a 2-D one (XLM, FlauBERT, LayoutLM): a
    packed 4-D ``attention_mask`` is taken off the model's input (which gets a 2-D all-ones mask:
    every position of a packed row belongs to a segment, padding included) and handed to each of
    ``targets`` in place of the mask it is given (its second argument), in ``form``. 2-D masks
    (padded batches) pass unchanged."""
    if getattr(base, "_mlmkit_handover", False):
        return
    state = _take_block_mask(base)

    def give(module, args, kwargs):
        allowed = state.get("mask")
        if allowed is None:
            return args, kwargs
        if form == "bool_3d":
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

    for target in targets:
        target.register_forward_pre_hook(give, with_kwargs=True)


def _deberta_block_mask(deberta: nn.Module) -> None:
    """DeBERTa(-v2/v3) takes a 3-D (batch, query, key) mask in its encoder, but its embeddings
    multiply by the mask as if it were 2-D (a 3-D mask crashes there). The collator's packed
    (R, 1, T, T) mask (bool, or additive float for eager: 0 = attend) becomes a bool (R, T, T)
    mask, and the embeddings get its diagonal (every position of a packed row is its own
    segment's, padding included: nothing to zero). 2-D masks pass unchanged."""
    if getattr(deberta, "_mlmkit_block_mask", False):
        return

    def to_3d(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            kwargs["attention_mask"] = _allowed(mask[:, 0])  # (R, T, T)
        return args, kwargs

    def diagonal(module, args, kwargs):
        mask = kwargs.get("mask")
        if mask is not None and mask.dim() == 3:
            kwargs["mask"] = mask.diagonal(dim1=1, dim2=2)  # (R, T)
        return args, kwargs

    deberta.register_forward_pre_hook(to_3d, with_kwargs=True)
    deberta.embeddings.register_forward_pre_hook(diagonal, with_kwargs=True)
    deberta._mlmkit_block_mask = True


def _per_example_token_dropout(esm: nn.Module) -> None:
    """ESM's token dropout rescales a row's embeddings by its share of mask tokens
    (``0.88 / (1 - masked / row length)``): per row, not per example. In packed rows (flash form:
    boundaries in ``cu_seq_lens_q``) the word embeddings are pre-scaled by
    ``(1 - row share) / (1 - example share)`` so that each example gets its own factor."""
    embeddings = esm.embeddings
    if getattr(embeddings, "_mlmkit_per_example", False):
        return
    embeddings._mlmkit_per_example = True
    inner = embeddings.forward
    state: dict = {}

    def stash(module, args, kwargs):
        state["cu"] = kwargs.get("cu_seq_lens_q")

    def forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None):
        cu = state.pop("cu", None)
        if cu is not None and input_ids is not None and inputs_embeds is None:
            n_rows, width = input_ids.shape
            masked = (input_ids == embeddings.mask_token_id).float()  # (R, T)
            lengths = attention_mask.sum(-1) if attention_mask is not None else width  # as ESM
            row_share = masked.sum(-1) / lengths  # (R,)
            seg = segment_ids(cu, n_rows, width).flatten()  # (R*T,) at most R*T segments
            # per-segment sums of a fixed size (bincount's size is data-dependent: a host sync)
            flat = masked.flatten()  # (R*T,)
            sums = masked.new_zeros(2, n_rows * width + 1).index_add_(
                1, seg, torch.stack([flat, torch.ones_like(flat)]))
            share = (sums[0] / sums[1].clamp(min=1))[seg].view(n_rows, width)  # (R, T)
            factor = (1 - row_share)[:, None] / (1 - share)  # (R, T)
            inputs_embeds = embeddings.word_embeddings(input_ids) * factor[..., None].to(
                embeddings.word_embeddings.weight.dtype)
        return inner(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, inputs_embeds=inputs_embeds)

    esm.register_forward_pre_hook(stash, with_kwargs=True)
    embeddings.forward = forward
