"""Tiny models of every architecture in transformers' masked-LM mapping, for the isolation tests.

    python tests/architectures.py      # prints the README's per-architecture table

`tiny_model(model_type, vocab_size)` builds a randomly initialised model of 2 layers, width 32
(None when the architecture cannot be built that small from its config alone); `table_rows`
runs the start-up probe (`mlmkit.probe`) on each and renders one markdown row per architecture.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

# Attributes shrunk when a config has them (names differ between architectures).
TINY = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "embedding_size": 32, "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64,
    "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
    "num_key_value_heads": 2, "emb_dim": 32, "n_layer": 2, "n_head": 2,
    "max_position_embeddings": 512, "decoder_layers": 2, "decoder_attention_heads": 2,
    "decoder_ffn_dim": 64, "entity_vocab_size": 16, "entity_emb_size": 32,  # BART family, LUKE
    "d_latents": 32, "num_latents": 8, "num_blocks": 1, "num_self_attends_per_block": 1,
    "num_self_attention_heads": 2, "num_cross_attention_heads": 1,  # Perceiver
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dropout": 0.0,
    "attention_dropout": 0.0, "embedding_dropout": 0.0, "mlp_dropout": 0.0,
}


def masked_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def tiny_model(model_type: str, vocab_size: int, pad_token_id: int = 0, **overrides):
    """A tiny random ``*ForMaskedLM`` of ``model_type`` in eval mode, or None if it cannot be
    built from its config alone (multimodal configs, missing optional packages...)."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    try:
        config = AutoConfig.for_model(model_type)
        sub = getattr(config, "text_config", None)  # composite configs: shrink the text part
        for cfg in (config, sub) if sub is not None else (config,):
            for key, value in TINY.items():
                if hasattr(cfg, key):
                    setattr(cfg, key, value)
            if hasattr(cfg, "vocab_size"):
                cfg.vocab_size = vocab_size
            if hasattr(cfg, "pad_token_id"):
                cfg.pad_token_id = pad_token_id
            if getattr(cfg, "layer_types", None):  # one entry per layer (ModernBERT, ...)
                cfg.layer_types = cfg.layer_types[:cfg.num_hidden_layers]
        for key, value in overrides.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForMaskedLM.from_config(config)
    except Exception:
        return None
    return model.float().eval()


def probe(model_type: str, tokenizer):
    """(model, IsolationResult) of a tiny ``model_type``, or (None, None)."""
    from mlmkit.modeling import MaskedLMModule, attn_implementation, position_offset
    from mlmkit.probe import probe_isolation

    model = tiny_model(model_type, len(tokenizer), tokenizer.pad_token_id)
    if model is None:
        return None, None
    module = MaskedLMModule(model)
    result = probe_isolation(model, tokenizer, attn_implementation=attn_implementation(model),
                             position_offset=position_offset(model), max_length=128,
                             head_logits=module.head_logits if module.sparse_prediction else None)
    return model, result


def row(model_type: str, result) -> str:
    def cell(ok: bool, leak, error) -> str:
        if error:
            return "no (crashes)"
        return "yes" if ok else f"no (leaks {leak:.2g})"
    return (f"| {model_type} | {result.attn_implementation} | "
            f"{cell(result.padded_isolated, result.padded_leak, result.padded_error)} | "
            f"{cell(result.packed_isolated, result.packed_leak, result.packed_error)} | "
            f"{'yes' if result.sparse_head else 'no'} |")


def table_rows(tokenizer) -> list[str]:
    rows = []
    for model_type in masked_lm_types():
        _, result = probe(model_type, tokenizer)
        if result is not None:
            rows.append(row(model_type, result))
    return rows


if __name__ == "__main__":
    from transformers import AutoTokenizer

    from mlmkit.modeling import embedded_model_path
    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    print("| architecture | attention | padded isolated | packed isolated | masked-only head |")
    print("|---|---|---|---|---|")
    print("\n".join(table_rows(tok)))
