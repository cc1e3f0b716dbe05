"""Packing and the masked-only head change the cost, not what is computed: the same examples with
the same masked positions give the same loss padded-with-mask and packed, sparse and full head."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

from mlmkit.collator import MaskedLMCollator, model_inputs
from mlmkit.modeling import MaskedLMModule, position_offset

KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=160)


def tiny(kind, vocab, attn):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(vocab_size=vocab, **KW)
        return BertForMaskedLM._from_config(cfg, attn_implementation=attn).eval()
    cfg = RobertaConfig(vocab_size=vocab, pad_token_id=1, **KW)
    return RobertaForMaskedLM._from_config(cfg, attn_implementation=attn).eval()


def examples(tokenizer, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 60, (1,), generator=g))
        body = torch.randint(1000, 20000, (length - 2,), generator=g).tolist()
        out.append({"input_ids": [tokenizer.cls_token_id, *body, tokenizer.sep_token_id], "idx": i})
    return out


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_eval_loss_padded_packed_sparse_full_agree(tokenizer, kind, attn):
    model = tiny(kind, len(tokenizer), attn)
    offset = position_offset(model)
    exs = examples(tokenizer)
    common = dict(max_length=128, seed=3, attn_implementation=attn, position_offset=offset,
                  return_counts=True)
    padded = MaskedLMCollator(tokenizer, padding="longest", **common)(exs)
    packed = MaskedLMCollator(tokenizer, padding="packed", **common)(exs)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # really packed
    assert int(padded["num_masked_tokens"]) == int(packed["num_masked_tokens"]) > 20
    if kind == "roberta":  # RoBERTa also gets explicit positions in padded mode
        L = padded["attention_mask"].sum(1)
        padded["position_ids"] = (torch.arange(padded["input_ids"].shape[1])[None].expand(len(L), -1)
                                  .clamp(max=L[:, None] - 1) + offset)
    losses = {}
    with torch.no_grad():
        for sparse in (False, True):
            module = MaskedLMModule(model, sparse_prediction=sparse)
            for name, batch in (("padded", padded), ("packed", packed)):
                loss_sum, count = module(**model_inputs(batch))
                losses[(name, sparse)] = (loss_sum / count).item()
    ref = losses[("padded", False)]
    for key, value in losses.items():
        assert value == pytest.approx(ref, abs=1e-4), (key, losses)

    # withholding the mask (the ablation's contaminated arms) really changes what is computed
    with torch.no_grad():
        for batch in (padded, packed):
            real = batch["labels"] != -100
            masked = model(**model_inputs(batch)).logits[real]
            unmasked = model(**model_inputs(batch, mask_padding=False)).logits[real]
            assert (masked - unmasked).abs().max() > 1e-3
