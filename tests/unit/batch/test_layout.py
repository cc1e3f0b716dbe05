"""layout.py: attention masks built from the examples' lengths (padded rows, left and right),
widths, packed rows (best-fit rows, positions restarting per example, the mask in each attention
implementation's form) -- and, on real tiny models, that packed rows and left padding compute
what each example alone computes, and that packing and the masked-only head change the cost,
not the loss."""

from __future__ import annotations

import pytest
import torch
from helpers import CLS, PAD, SEP, split_batch, tiny_model

from mlmkit.batch.collator import ISOLATION_KEYS, MaskedLMCollator, model_inputs
from mlmkit.batch.layout import pack_rows
from mlmkit.model.checks import position_offset
from mlmkit.model.loading import MaskedLMModule


# ----------------------------------------------------------------------------------------------------
# padded rows: the mask comes from the lengths
# ----------------------------------------------------------------------------------------------------
def test_attention_mask_right_and_left_padding(tokenizer):
    right = MaskedLMCollator(tokenizer, mlm=False)
    batch = right([[101, 2023, 102], [101, 102]])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["input_ids"].tolist() == [[101, 2023, 102], [101, 102, PAD]]
    assert batch["attention_mask"].dtype == torch.long and batch["input_ids"].dtype == torch.long
    assert "position_ids" not in batch

    left = MaskedLMCollator(tokenizer, mlm=False, padding_side="left")
    batch = left([[101, 2023, 102], [101, 102]])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["input_ids"].tolist() == [[101, 2023, 102], [PAD, 101, 102]]
    # Left padding numbers the real tokens from 0, as right padding would.
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_attention_mask_comes_from_lengths_not_pad_id(tokenizer):
    collator = MaskedLMCollator(tokenizer, mlm=False, return_counts=True)
    batch = collator([[CLS, PAD, PAD, SEP], [CLS, SEP]])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert int(batch["num_real_tokens"]) == 6


def test_pad_to_multiple_of_and_max_length_width(tokenizer):
    exs = [[CLS, 5000, SEP], [CLS, SEP]]
    assert MaskedLMCollator(tokenizer, pad_to_multiple_of=8)(exs)["input_ids"].shape == (2, 8)
    batch = MaskedLMCollator(tokenizer, padding="max_length", max_length=12, pad_to_multiple_of=8)(exs)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [3, 2]
    batch = MaskedLMCollator(tokenizer, padding="max_length", max_length=5)([[CLS, *range(2000, 2010), SEP]])
    assert batch["input_ids"].tolist() == [[CLS, 2000, 2001, 2002, 2003]]  # truncated to max_length


# ----------------------------------------------------------------------------------------------------
# packed rows
# ----------------------------------------------------------------------------------------------------
def test_pack_rows_best_fit_decreasing():
    rows = pack_rows([5, 3, 8, 2, 4, 1], capacity=10)
    assert rows == [[2, 3], [0, 4, 5], [1]]
    assert all(sum([5, 3, 8, 2, 4, 1][i] for i in r) <= 10 for r in rows)
    assert sorted(i for r in rows for i in r) == list(range(6))


def test_packed_layout_mask_and_positions(tokenizer, text_examples):
    lengths = [len(e) for e in text_examples]
    bool_c = MaskedLMCollator(tokenizer, padding="packed", max_length=32, position_offset=2)
    eager_c = MaskedLMCollator(tokenizer, padding="packed", max_length=32, position_offset=2, attn_implementation="eager")
    batch, eager = bool_c(text_examples), eager_c(text_examples)
    rows = pack_rows(lengths, 32)
    n_rows, width = batch["input_ids"].shape
    assert n_rows == len(rows) < len(text_examples)
    assert width == max(sum(lengths[i] for i in r) for r in rows) <= 32

    expected = torch.zeros(n_rows, width, width, dtype=torch.bool)
    for part in split_batch(bool_c, batch, lengths):
        r, sl = part["row"], part["slice"]
        expected[r, sl, sl] = True
        assert part["position_ids"].tolist() == list(range(2, 2 + sl.stop - sl.start))
    for r, row in enumerate(rows):
        used = sum(lengths[i] for i in row)
        expected[r, range(used, width), range(used, width)] = True  # padding attends to itself only
        assert (batch["position_ids"][r, used:] == 2).all()
    mask = batch["attention_mask"]
    assert mask.dtype == torch.bool and mask.shape == (n_rows, 1, width, width)
    assert torch.equal(mask[:, 0], expected)

    additive = eager["attention_mask"]
    assert additive.dtype == torch.float32 and additive.shape == mask.shape
    assert torch.equal(additive == 0, mask)
    assert (additive[~mask] == torch.finfo(torch.float32).min).all()
    # Same examples, same masks, whatever the mask form.
    assert torch.equal(eager["labels"], batch["labels"])

    # Packed labels equal padded labels example by example.
    padded_c = MaskedLMCollator(tokenizer)
    padded = split_batch(padded_c, padded_c(text_examples), lengths)
    for p, q in zip(split_batch(bool_c, batch, lengths), padded):
        assert torch.equal(p["labels"], q["labels"]) and torch.equal(p["ids"], q["ids"])

    rounded = MaskedLMCollator(tokenizer, padding="packed", max_length=32, pad_to_multiple_of=8)(text_examples)
    assert rounded["input_ids"].shape[1] % 8 == 0


def test_packed_truncates_long_examples(tokenizer):
    collator = MaskedLMCollator(tokenizer, padding="packed", max_length=8, mlm=False,
                                return_counts=True)
    batch = collator([[CLS, *range(2000, 2020), SEP], [CLS, 5, SEP]])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [CLS, *range(2000, 2007)]
    assert int(batch["num_real_tokens"]) == 11


def test_packed_flash_kwargs(tokenizer, text_examples):
    lengths = [len(e) for e in text_examples]
    collator = MaskedLMCollator(tokenizer, padding="packed", max_length=32, attn_implementation="flash_attention_2")
    batch = collator(text_examples)
    n_rows, width = batch["input_ids"].shape
    # The 2-D mask must be all ones, else transformers' flash path unpads and ignores cu_seq_lens.
    assert torch.equal(batch["attention_mask"], torch.ones(n_rows, width, dtype=torch.long))
    boundaries = {0}
    for part in split_batch(collator, batch, lengths):
        boundaries |= {part["row"] * width + part["slice"].start, part["row"] * width + part["slice"].stop}
    boundaries |= {r * width for r in range(n_rows + 1)}
    cu = batch["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and cu.tolist() == sorted(boundaries)
    assert torch.equal(cu, batch["cu_seq_lens_k"])
    assert batch["max_length_q"] == batch["max_length_k"] == int((cu[1:] - cu[:-1]).max())
    assert not set(model_inputs(batch, mask_padding=False)) & set(ISOLATION_KEYS)


# ----------------------------------------------------------------------------------------------------
# real models: packed rows isolate their examples, left padding is right padding
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_match_examples_run_alone(tokenizer, text_examples, family, attn):
    lengths = [len(e) for e in text_examples]
    if family == "bert":
        model, offset, mlm = tiny_model("bert", len(tokenizer), attn_implementation=attn), 0, True
    else:
        # RoBERTa numbers positions from padding_idx + 1 = 2 and derives them from ids != 1 when run
        # alone; mlm=False keeps a random replacement from ever being id 1 there.
        model, offset, mlm = tiny_model("roberta", len(tokenizer), pad_token_id=1,
                                        attn_implementation=attn), 2, False
    collator = MaskedLMCollator(
        tokenizer, padding="packed", max_length=40, attn_implementation=attn, position_offset=offset, mlm=mlm
    )
    batch = collator(text_examples)
    parts = split_batch(collator, batch, lengths)
    assert batch["input_ids"].shape[0] < len(text_examples), "rows must hold several examples"
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits  # (R, T, V)
        naive = model(**model_inputs(batch, mask_padding=False)).logits  # (R, T, V)
        worst_leak = 0.0
        for part in parts:
            alone = model(input_ids=part["ids"][None]).logits[0]  # (L, V)
            torch.testing.assert_close(packed[part["row"], part["slice"]], alone, atol=1e-4, rtol=0)
            worst_leak = max(worst_leak, float((naive[part["row"], part["slice"]] - alone).abs().max()))
    assert torch.isfinite(packed).all()
    # Without the isolation keys, examples sharing a row see each other.
    assert worst_leak > 1e-3


def test_left_padding_matches_right_padding_in_model(tokenizer, text_examples):
    model = tiny_model("bert", len(tokenizer), attn_implementation="sdpa")
    lengths = [len(e) for e in text_examples]
    right = MaskedLMCollator(tokenizer, padding_side="right")
    left = MaskedLMCollator(tokenizer, padding_side="left")
    with torch.no_grad():
        r_batch, l_batch = right(text_examples), left(text_examples)
        r_logits = model(**model_inputs(r_batch)).logits
        l_logits = model(**model_inputs(l_batch)).logits
        unmasked = model(**model_inputs(r_batch, mask_padding=False)).logits
    leak = 0.0
    for p, q in zip(split_batch(right, r_batch, lengths), split_batch(left, l_batch, lengths)):
        torch.testing.assert_close(r_logits[p["row"], p["slice"]], l_logits[q["row"], q["slice"]], atol=1e-4, rtol=0)
        leak = max(leak, float((unmasked[p["row"], p["slice"]] - r_logits[p["row"], p["slice"]]).abs().max()))
    assert leak > 1e-3  # the unmasked arm attends to padding


# ----------------------------------------------------------------------------------------------------
# packing and the masked-only head change the cost, not what is computed
# ----------------------------------------------------------------------------------------------------
def synthetic_examples(tokenizer, n=24, seed=0):
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
    """The same examples with the same masked positions give the same loss padded-with-mask and
    packed, through the masked-only and the full head."""
    model = tiny_model(kind, len(tokenizer), pad_token_id=1 if kind == "roberta" else 0,
                       attn_implementation=attn)
    offset = position_offset(model)
    exs = synthetic_examples(tokenizer)
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
