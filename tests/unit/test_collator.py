"""collator.py: what a batch carries (model inputs, host-side counts), the input forms it accepts,
no targets with --mlm false, a given special_tokens_mask, and argument validation. Layouts and
attention masks: test_layout.py; which tokens become targets: test_masking.py."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import CLS, PAD, SEP
from mlmkit.collator import ISOLATION_KEYS, METADATA_KEYS, MaskedLMCollator, model_inputs


def test_metadata_keys_and_model_inputs(tokenizer):
    collator = MaskedLMCollator(tokenizer, mlm_probability=0.5, padding_side="left")
    batch = collator([[CLS, *range(2000, 2030), SEP], [CLS, 2000, SEP]])
    assert set(METADATA_KEYS) == {"num_real_tokens", "num_masked_tokens", "num_examples"}
    assert int(batch["num_real_tokens"]) == 35
    assert int(batch["num_masked_tokens"]) == int((batch["labels"] != -100).sum()) > 0
    assert int(batch["num_examples"]) == 2
    assert all(batch[k].dim() == 0 and batch[k].dtype == torch.long for k in METADATA_KEYS)

    kept = model_inputs(batch, mask_padding=True)
    assert set(kept) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert set(model_inputs(batch, mask_padding=False)) == {"input_ids", "labels"}
    assert set(ISOLATION_KEYS) >= {"attention_mask", "position_ids", "cu_seq_lens_q", "max_length_k"}


def test_mlm_false_leaves_ids_and_has_no_labels(tokenizer):
    exs = [[CLS, *range(2000, 2040), SEP], [CLS, 3000, SEP]]
    batch = MaskedLMCollator(tokenizer, mlm=False)(exs)
    assert (batch["labels"] == -100).all() and int(batch["num_masked_tokens"]) == 0
    assert batch["input_ids"][0].tolist() == exs[0]


def test_given_special_tokens_mask_is_respected(tokenizer):
    ex = [CLS, 2000, 2001, 2002, SEP]
    collator = MaskedLMCollator(tokenizer, mlm_probability=0.9)
    batch = collator([{"input_ids": ex, "special_tokens_mask": [1, 1, 0, 1, 1], "idx": i} for i in range(50)])
    targets = batch["labels"] != -100
    assert targets[:, 2].any()
    assert not targets[:, [0, 1, 3, 4]].any()


# ----------------------------------------------------------------------------------------------------
# input forms
# ----------------------------------------------------------------------------------------------------
def test_input_forms_give_identical_batches(tokenizer):
    a, b = [CLS, 2000, 2001, 2002, 2003, SEP], [CLS, 3000, SEP]
    collator = MaskedLMCollator(tokenizer, mlm_probability=0.5)
    reference = collator([a, b])
    forms = [
        [torch.tensor(a), torch.tensor(b)],
        [{"input_ids": a}, {"input_ids": torch.tensor(b)}],
        # already padded upstream (right and left): attention_mask 0 positions are dropped
        [{"input_ids": a, "attention_mask": [1] * 6}, {"input_ids": [*b, PAD, PAD], "attention_mask": [1, 1, 1, 0, 0]}],
        [{"input_ids": a}, {"input_ids": [PAD, *b], "attention_mask": torch.tensor([0, 1, 1, 1])}],
        [{"input_ids": a, "special_tokens_mask": [1, 0, 0, 0, 0, 1], "idx": 0}, {"input_ids": b, "idx": 1}],
    ]
    for form in forms:
        batch = collator(form)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batch[key], reference[key]), key
    # An explicit idx overrides the list position: swapping the list but keeping idx keeps the masks.
    swapped = collator([{"input_ids": b, "idx": 1}, {"input_ids": a, "idx": 0}])
    assert torch.equal(swapped["labels"][1, :6], reference["labels"][0])
    assert torch.equal(swapped["labels"][0, :3], reference["labels"][1, :3])


def test_bad_inputs_raise(tokenizer):
    collator = MaskedLMCollator(tokenizer)
    with pytest.raises(ValueError, match="no tokens"):
        collator([[CLS, SEP], []])
    with pytest.raises(ValueError, match="token ids"):
        collator([[CLS, len(tokenizer) + 5, SEP]])
    with pytest.raises(ValueError, match="non-empty list"):
        collator([])


# ----------------------------------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(mlm_probability=0.0), "mlm_probability"),
        (dict(mlm_probability=1.0), "mlm_probability"),
        (dict(mlm_probability=-0.2), "mlm_probability"),
        (dict(mlm_probability="0.15"), "mlm_probability"),
        (dict(mask_replace_prob=1.5), "mask_replace_prob"),
        (dict(mask_replace_prob=0.9, random_replace_prob=0.2), "mask_replace_prob + random_replace_prob"),
        (dict(padding="packed"), "max_length"),
        (dict(padding="max_length"), "max_length"),
        (dict(padding="bucket"), "padding"),
        (dict(max_length=0), "max_length"),
        (dict(pad_to_multiple_of=0), "pad_to_multiple_of"),
        (dict(attn_implementation="flash"), "attn_implementation"),
        (dict(position_offset=-1), "position_offset"),
        (dict(padding_side="middle"), "padding_side"),
        (dict(seed=1.5), "seed"),
    ],
)


def test_bad_arguments_raise_naming_the_argument(tokenizer, kwargs, arg):
    with pytest.raises(ValueError, match=re.escape(f"invalid {arg}=")):
        MaskedLMCollator(tokenizer, **kwargs)


def test_set_epoch_validates(tokenizer):
    with pytest.raises(ValueError, match="epoch"):
        MaskedLMCollator(tokenizer).set_epoch(-1)
