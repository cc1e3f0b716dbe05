"""modeling.py: the summed loss, the masked-only head of every known layout (same loss and
gradients as the full head), host-computed masked positions, position offsets, the embedded
model and tokenizer."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from mlmkit.config.parse import parse_config
from mlmkit.model.checks import embedded_model_path, position_offset
from mlmkit.model.loading import MaskedLMModule, mlm_head_layout


def tiny(kind: str, vocab: int = 100):
    return tiny_model(kind, vocab, pad_token_id=1 if kind == "roberta" else 0)


def batch(vocab=100, B=4, T=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    labels = torch.full((B, T), -100)
    pick = (torch.rand(B, T, generator=g) < 0.3) & mask.bool()
    labels[pick] = ids[pick]
    return ids, mask, labels


@pytest.mark.parametrize("model_type, overrides, layout", [
    ("bert", {}, "cls"), ("roberta", {}, "lm_head"), ("modernbert", {}, "modernbert"),
    ("distilbert", {}, "distilbert"), ("albert", {}, "predictions"), ("electra", {}, "electra"),
    ("deberta-v2", {}, "cls"), ("deberta-v2", {"legacy": False}, "deberta"),
    ("xlm", {}, "pred_layer"), ("flaubert", {}, "pred_layer"),
])


def test_masked_only_head_equals_the_full_head(model_type, overrides, layout, tokenizer):
    """Same loss and same gradients as the full head, for each head layout users train most."""
    model = tiny_model(model_type, len(tokenizer), tokenizer.pad_token_id, **overrides)
    assert mlm_head_layout(model) == layout
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (2, 12), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, 2:10:3] = ids[:, 2:10:3]
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels[1, 9:] = -100
    results = []
    for sparse in (True, False):
        module = MaskedLMModule(model, sparse_prediction=sparse)
        assert module.sparse_prediction is sparse
        model.zero_grad()
        loss, count = module(input_ids=ids, labels=labels, attention_mask=mask)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), count, grads))
    (sparse_loss, n1, g1), (full_loss, n2, g2) = results
    assert n1 == n2 == int((labels != -100).sum())
    torch.testing.assert_close(sparse_loss, full_loss, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:  # float noise only: within 1e-5 of the gradient's scale
        scale = float(g2[name].abs().max())
        assert float((g1[name] - g2[name]).abs().max()) <= 1e-5 * max(scale, 1e-3), name


def test_loss_is_a_sum_matching_hf_mean_times_count():
    model = tiny("bert")
    ids, mask, labels = batch()
    loss_sum, count = MaskedLMModule(model)(input_ids=ids, attention_mask=mask, labels=labels)
    hf_mean = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss_sum / count, hf_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("multiple", [None, 1, 64])
def test_host_computed_masked_positions_give_the_same_loss_and_gradients(multiple):
    from mlmkit.train.steps import add_masked_positions
    model = tiny("bert")
    ids, mask, labels = batch()
    module = MaskedLMModule(model)
    results = []
    for positions in (None, add_masked_positions({"labels": labels}, multiple)["masked_positions"]):
        model.zero_grad()
        loss_sum, count = module(input_ids=ids, attention_mask=mask, labels=labels,
                                 masked_positions=positions)
        loss_sum.backward()
        results.append((loss_sum.detach(), int(count),
                        {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}))
    (loss0, n0, g0), (loss1, n1, g1) = results
    assert n0 == n1 == int((labels != -100).sum())
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6)  # float noise
    if multiple == 64:  # padded with "no target" entries
        assert len(add_masked_positions({"labels": labels}, 64)["masked_positions"]) % 64 == 0


def test_unknown_head_layout_falls_back_to_full_head():
    model = tiny("bert")
    model.pred_layer = model.cls  # a layout mlmkit does not know (XLM's name)
    del model.cls
    assert MaskedLMModule(model, sparse_prediction=True).sparse_prediction is False


def test_position_offsets():
    assert position_offset(tiny("bert")) == 0
    assert position_offset(tiny("roberta")) == 2  # pad id 1 + 1


def test_embedded_model_is_a_real_pretrained_bert():
    from transformers import AutoConfig
    path = embedded_model_path()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "bert" and config.num_hidden_layers == 6 and config.hidden_size == 384
    assert (path / "model.safetensors").is_file() and (path / "vocab.txt").is_file()


def test_from_scratch_without_a_tokenizer_uses_the_embedded_one(tiny_bert_dir):
    from mlmkit.model.checks import load_tokenizer
    tokenizer = load_tokenizer(parse_config(["--config_name", tiny_bert_dir]))
    assert tokenizer.name_or_path == str(embedded_model_path()) and len(tokenizer) == 30522


# -- packed rows on the architectures mlmkit packs through its own paths ----------------------

ESM2 = {"position_embedding_type": "rotary", "token_dropout": True, "emb_layer_norm_before": False}
DEBERTA_V3 = {"relative_attention": True, "position_biased_input": False, "legacy": False,
              "pos_att_type": ["p2c", "c2p"], "position_buckets": 256, "max_relative_positions": -1,
              "norm_rel_ebd": "layer_norm", "share_att_key": True}
PATH_OF = {"modernbert": "attention", "esm": "attention", "deberta": "block_mask_3d",
           "deberta-v2": "block_mask_3d", "xlm": "block_mask_handover",
           "flaubert": "block_mask_handover", "layoutlm": "block_mask_handover",
           "longformer": "longformer_exact"}
PACKED_PATHS = [("modernbert", {}), ("esm", {}), ("esm", ESM2), ("deberta", {}),
                ("deberta", {"relative_attention": True}), ("deberta-v2", {}),
                ("deberta-v2", DEBERTA_V3), ("xlm", {}), ("flaubert", {}), ("layoutlm", {}),
                ("xmod", {}), ("longformer", {}), ("longformer", {"attention_window": 16})]


def packed_and_padded(model, tokenizer, examples, sparse: bool):
    """{padding: (mean eval loss, masked tokens, batch)} for the same examples and masks (the
    masks follow each example's idx), padded and packed, as the recipe lays them out."""
    from mlmkit.batch.collator import MaskedLMCollator, model_inputs
    from mlmkit.model.loading import attn_implementation
    module = MaskedLMModule(model, sparse_prediction=sparse)
    items = [{"input_ids": e, "idx": i} for i, e in enumerate(examples)]
    out = {}
    for padding in ("longest", "packed"):
        collator = MaskedLMCollator(tokenizer, mlm_probability=0.3, padding=padding,
                                    max_length=160, seed=3, position_offset=position_offset(model),
                                    attn_implementation=attn_implementation(model))
        batch = model_inputs(collator(items))
        with torch.no_grad():
            loss, count = module(**batch)
        out[padding] = (float(loss) / int(count), int(count), batch)
    return out


def eval_examples(tokenizer, text_examples):
    from mlmkit.model.probe import probe_examples
    return probe_examples(tokenizer, 128) + text_examples  # the long one reaches past windows


@pytest.mark.parametrize("model_type, overrides", PACKED_PATHS)
@pytest.mark.parametrize("sparse", [True, False])
def test_packed_eval_loss_equals_padded(model_type, overrides, sparse, tokenizer, text_examples):
    """fp32, the same examples and masks: packed rows give the padded eval loss within 1e-4,
    on the path training takes (`use_packed_path`, as load_model picks it)."""
    from mlmkit.model.packed import use_packed_path
    overrides = {**overrides, "mask_token_id": tokenizer.mask_token_id} \
        if model_type == "esm" else overrides
    model = tiny_model(model_type, len(tokenizer), tokenizer.pad_token_id, **overrides)
    assert use_packed_path(model) == PATH_OF.get(model_type)  # None: the collator's layout as is
    examples = eval_examples(tokenizer, text_examples)
    out = packed_and_padded(model, tokenizer, examples, sparse)
    (padded, n_padded, _), (packed, n_packed, batch) = out["longest"], out["packed"]
    assert batch["input_ids"].shape[0] < len(examples)  # rows really hold several examples
    assert n_packed == n_padded > 0
    assert abs(packed - padded) <= 1e-4, (packed, padded)


def test_esm_token_dropout_is_rescaled_per_example(tokenizer, text_examples):
    """ESM-2's token dropout scales a row by its share of mask tokens: without mlmkit's per-example
    rescaling, packed rows move the loss (5e-5 on this tiny pre-LN model: layer norms absorb most
    of a row's scale); with it, packed equals padded to float noise."""
    from mlmkit.model.attention import register
    from mlmkit.model.packed import use_packed_path
    examples = eval_examples(tokenizer, text_examples)
    diffs = []
    for rescale in (False, True):
        model = tiny_model("esm", len(tokenizer), tokenizer.pad_token_id,
                           mask_token_id=tokenizer.mask_token_id, **ESM2)
        if rescale:
            use_packed_path(model)
        else:
            model.set_attn_implementation(register())  # the attention alone
        out = packed_and_padded(model, tokenizer, examples, True)
        diffs.append(abs(out["packed"][0] - out["longest"][0]))
    assert diffs[0] > 1e-5 and diffs[1] < 1e-6, diffs


def test_flash_path_only_takes_head_sizes_the_kernel_runs():
    """The flash kernel (CUDA) requires heads of a multiple of 8 up to 256 and pads none: other
    BERT-family models (TinyBERT: 312 / 12 = 26) stay on the block-mask path; CPU never takes it."""
    from mlmkit.model.attention import flash_head_dim, varlen_available
    assert [flash_head_dim(d) for d in (32, 64, 128, 256)] == [True] * 4
    assert [flash_head_dim(d) for d in (26, 36, 264, 512)] == [False] * 4
    assert not varlen_available(torch.zeros(4, 2, 64, dtype=torch.bfloat16))  # CPU


def test_packed_attention_windows_within_the_example():
    """The block mask of mlmkit's attention: same example, and within the sliding window."""
    from mlmkit.model.attention import block_mask
    cu = torch.tensor([0, 3, 8, 10, 16, 20], dtype=torch.int32)  # 2 rows of 10
    full = block_mask(cu, 2, 10)[:, 0]
    assert full[0, 0, 2] and not full[0, 2, 3] and full[0, 3, 7] and not full[0, 7, 8]
    assert full[1, 0, 5] and not full[1, 5, 6]  # row 1: segments [10, 16), [16, 20)
    windowed = block_mask(cu, 2, 10, window=2)[:, 0]
    assert windowed[0, 3, 5] and not windowed[0, 3, 6] and not windowed[0, 2, 3]
    assert torch.equal(windowed, full & windowed)


def test_load_model_picks_the_packed_attention_unless_one_is_named(tmp_path, tokenizer):
    from helpers import tiny_config_dir

    from mlmkit.model.loading import attn_implementation, load_model
    folder = tiny_config_dir(tmp_path / "mb", "modernbert", tokenizer)
    picked = load_model(parse_config(["--config_name", folder]), tokenizer)
    named = load_model(parse_config(["--config_name", folder, "--attn_implementation", "sdpa"]),
                       tokenizer)
    assert attn_implementation(picked) == "mlmkit_packed"
    assert attn_implementation(named) == "sdpa"
