"""examples.py through the collator: keys the collator does not read pass through (per token: laid
out like the ids, padded rows and packed; per example: stacked), drop_keys, and an input
attention_mask with a 0 between an example's tokens (a custom mask) kept in padded rows, never a
target, refused in packed rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import CLS, SENTENCES, SEP, split_batch

from mlmkit.batch.collator import MaskedLMCollator


def _encoded(tokenizer, n=4):
    return [dict(tokenizer(s)) for s in SENTENCES[:n]]


@pytest.mark.parametrize("options", [dict(), dict(padding_side="left", pad_to_multiple_of=8),
                                     dict(padding="packed", max_length=64)],
                         ids=["right", "left", "packed"])
def test_per_token_keys_are_laid_out_like_the_ids(tokenizer, options):
    feats = _encoded(tokenizer)
    lengths = [len(f["input_ids"]) for f in feats]
    for f in feats:  # a float weight per token, and a token-classification label column
        f["weights"] = np.linspace(0.5, 1.0, len(f["input_ids"]), dtype=np.float32)
        f["word_labels"] = [t % 7 for t in f["input_ids"]]
    collator = MaskedLMCollator(tokenizer, mlm=False, **options)
    batch = collator(feats)
    assert batch["weights"].dtype == torch.float32 and batch["word_labels"].dtype == torch.long
    assert batch["weights"].shape == batch["word_labels"].shape == batch["input_ids"].shape
    real = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for f, part in zip(feats, split_batch(collator, batch, lengths)):
        assert batch["weights"][part["row"], part["slice"]].tolist() == f["weights"].tolist()
        assert batch["word_labels"][part["row"], part["slice"]].tolist() == f["word_labels"]
        real[part["row"], part["slice"]] = True
    assert (batch["weights"][~real] == 0).all()  # padding: 0, and -100 for a labels column
    assert (batch["word_labels"][~real] == -100).all()
    # Truncation cuts them with the ids.
    cut = MaskedLMCollator(tokenizer, mlm=False, max_length=5)(feats)
    assert cut["word_labels"].tolist() == [f["word_labels"][:5] for f in feats]


def test_per_example_keys_are_stacked_and_drop_keys_drops_them(tokenizer):
    feats = _encoded(tokenizer)
    for i, f in enumerate(feats):
        f.update(label=i % 2, score=float(i) / 2, vector=np.arange(3) + i, text=SENTENCES[i])
    batch = MaskedLMCollator(tokenizer)(feats)
    assert batch["label"].tolist() == [0, 1, 0, 1] and batch["label"].dtype == torch.long
    assert batch["score"].dtype == torch.float32 and batch["score"].tolist() == [0, 0.5, 1, 1.5]
    assert batch["vector"].shape == (4, 3) and batch["text"] == SENTENCES[:4]
    as_np = MaskedLMCollator(tokenizer, return_tensors="np")(feats)
    assert isinstance(as_np["label"], np.ndarray) and as_np["label"].shape == (4,)
    # Dropped: all of them, or the ones named.
    dropped = MaskedLMCollator(tokenizer, drop_keys=True)(feats)
    assert set(dropped) == {"input_ids", "attention_mask", "labels", "token_type_ids"}
    named = MaskedLMCollator(tokenizer, drop_keys=["text", "vector"])(feats)
    assert {"label", "score"} <= set(named) and not {"text", "vector"} & set(named)
    # The same examples masked the same whatever passes through.
    assert torch.equal(batch["labels"], dropped["labels"])
    # A key some examples have and others lack is named.
    feats[2].pop("score")
    with pytest.raises(ValueError, match="example 0 has score and example 2 has no"):
        MaskedLMCollator(tokenizer)(feats)
    with pytest.raises(ValueError, match="invalid drop_keys='label'"):
        MaskedLMCollator(tokenizer, drop_keys="label")


def test_input_labels_and_offsets_are_consumed_as_transformers_does(tokenizer):
    """transformers' collator replaces input labels with the MLM labels and pops the offsets."""
    feats = [dict(tokenizer(s, return_offsets_mapping=True)) for s in SENTENCES[:2]]
    for f in feats:
        f["labels"] = (1,)
    batch = MaskedLMCollator(tokenizer)(feats)
    assert "offset_mapping" not in batch and batch["labels"].shape == batch["input_ids"].shape


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_zero_inside_the_attention_mask_is_kept_and_never_a_target(tokenizer, side):
    feats = _encoded(tokenizer, 2)
    n = len(feats[0]["input_ids"])
    hidden = [2, 3]
    feats[0]["attention_mask"] = [0 if i in hidden else 1 for i in range(n)]
    collator = MaskedLMCollator(tokenizer, mlm_probability=1.0, padding_side=side)
    batch = collator(feats)
    row = batch["attention_mask"][0]
    start = batch["input_ids"].shape[1] - n if side == "left" else 0
    assert row[start:start + n].tolist() == feats[0]["attention_mask"]  # the user's mask, kept
    assert int(row.sum()) == n - 2
    labels = batch["labels"][0, start:start + n]
    assert (labels[hidden] == -100).all()  # hidden: never targets, even at rate 1
    ordinary = [i for i in range(1, n - 1) if i not in hidden]
    assert (labels[ordinary] != -100).all()
    # Zeros at an example's ends are upstream padding: dropped, the row laid out as without them.
    padded = {**feats[1], "input_ids": [*feats[1]["input_ids"], 0, 0],
              "attention_mask": [*feats[1]["attention_mask"], 0, 0],
              "token_type_ids": [*feats[1]["token_type_ids"], 0, 0]}
    plain = MaskedLMCollator(tokenizer)([feats[1]])
    assert all(torch.equal(v, MaskedLMCollator(tokenizer)([padded])[k]) for k, v in plain.items())
    with pytest.raises(ValueError, match="a 0 between its tokens .* packed rows build their own "
                                         "masks; use padding=\"longest\""):
        MaskedLMCollator(tokenizer, padding="packed", max_length=64)(feats)


def test_bad_extra_keys_are_named(tokenizer):
    with pytest.raises(ValueError, match="example 0 has a token_type_ids length != its input_ids"):
        MaskedLMCollator(tokenizer)([{"input_ids": [CLS, SEP], "token_type_ids": [0]}])
    with pytest.raises(ValueError, match="example 0 has an attention_mask whose shape"):
        MaskedLMCollator(tokenizer)([{"input_ids": [CLS, SEP], "attention_mask": [1]}])
