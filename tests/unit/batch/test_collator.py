"""collator.py: what a batch carries (model inputs, host-side counts), the input forms it accepts,
no targets with --mlm false, a given special_tokens_mask, and argument validation. Layouts and
attention masks: test_layout.py; which tokens become targets: test_masking.py."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLS, MASK, PAD, SENTENCES, SEP, save_tiny_model, split_batch
from readme_commands import collator_examples

from mlmkit.batch.collator import (
    ISOLATION_KEYS,
    METADATA_KEYS,
    MaskedLMCollator,
    model_inputs,
)
from mlmkit.config.validation import validate_config


def test_metadata_keys_and_model_inputs(tokenizer):
    collator = MaskedLMCollator(tokenizer, mlm_probability=0.5, padding_side="left",
                                return_counts=True)
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
    batch = MaskedLMCollator(tokenizer, mlm=False, return_counts=True)(exs)
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

    def collator(form):  # a fresh collator each time: rows without idx take new masks every call
        return MaskedLMCollator(tokenizer, mlm_probability=0.5)(form)

    reference = collator([a, b])
    forms = [
        [torch.tensor(a), torch.tensor(b)],
        [{"input_ids": a}, {"input_ids": torch.tensor(b)}],
        # already padded upstream (right and left): attention_mask 0 positions are dropped
        [{"input_ids": a, "attention_mask": [1] * 6}, {"input_ids": [*b, PAD, PAD], "attention_mask": [1, 1, 1, 0, 0]}],
        [{"input_ids": a}, {"input_ids": [PAD, *b], "attention_mask": torch.tensor([0, 1, 1, 1])}],
    ]
    for form in forms:
        batch = collator(form)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batch[key], reference[key]), key
    # With idx the masks follow idx: swapping the list but keeping idx keeps the masks.
    keyed = MaskedLMCollator(tokenizer, mlm_probability=0.5)
    reference = keyed([{"input_ids": a, "special_tokens_mask": [1, 0, 0, 0, 0, 1], "idx": 0},
                       {"input_ids": b, "idx": 1}])
    swapped = keyed([{"input_ids": b, "idx": 1}, {"input_ids": a, "idx": 0}])
    assert torch.equal(swapped["labels"][1, :6], reference["labels"][0])
    assert torch.equal(swapped["labels"][0, :3], reference["labels"][1, :3])


@pytest.mark.parametrize("padding", ["longest", "packed"])
def test_numpy_batches_in_the_constructor_or_per_call(tokenizer, padding):
    """return_tensors="np" (or ``collator(features, "np")``, Hugging Face's signature): the same
    batch as NumPy arrays, keyed masks unchanged."""
    import numpy as np
    rows = [{"input_ids": [CLS, 2000 + i, 2001, 2002, SEP][: 3 + i], "idx": i} for i in range(3)]
    options = dict(mlm_probability=0.5, padding=padding, max_length=16, seed=3)
    pt = MaskedLMCollator(tokenizer, **options)(rows)
    for np_batch in (MaskedLMCollator(tokenizer, return_tensors="np", **options)(rows),
                     MaskedLMCollator(tokenizer, **options)(rows, "np")):
        assert set(np_batch) == set(pt)
        for key, value in pt.items():
            if isinstance(value, torch.Tensor):
                assert isinstance(np_batch[key], np.ndarray), key
                assert np.array_equal(np_batch[key], value.numpy()), key
    assert isinstance(MaskedLMCollator(tokenizer, return_tensors="np", **options)(rows, "pt")
                      ["input_ids"], torch.Tensor)


def test_seed_none_draws_from_torchs_global_generator(tokenizer):
    """seed=None masks as transformers does: torch.manual_seed (a Trainer's seed) decides them,
    not the example's idx; an int keeps the keyed masks, whatever the global generator."""
    rows = [{"input_ids": [CLS, *range(2000, 2060), SEP], "idx": 4}]
    unkeyed = MaskedLMCollator(tokenizer, mlm_probability=0.5, seed=None)
    torch.manual_seed(7)
    first = unkeyed(rows)["labels"]
    torch.manual_seed(7)
    assert torch.equal(unkeyed([{**rows[0], "idx": 5}])["labels"], first)  # idx plays no part
    torch.manual_seed(8)
    assert not torch.equal(unkeyed(rows)["labels"], first)
    keyed = MaskedLMCollator(tokenizer, mlm_probability=0.5)
    torch.manual_seed(7)
    a = keyed(rows)["labels"]
    torch.manual_seed(8)
    assert torch.equal(keyed(rows)["labels"], a)


def test_the_whole_probability_range(tokenizer):
    """mlm_probability 0: no targets; 1: every real token that is not special, never padding."""
    rows = [[CLS, 2000, 2001, 2002, SEP], [CLS, 2003, SEP]]
    none = MaskedLMCollator(tokenizer, mlm_probability=0.0)(rows)
    assert (none["labels"] == -100).all() and torch.equal(none["input_ids"][0], torch.tensor(rows[0]))
    every = MaskedLMCollator(tokenizer, mlm_probability=1.0)(rows)
    targets = every["labels"] != -100
    assert targets.tolist() == [[False, True, True, True, False], [False, True, False, False, False]]
    assert every["labels"][0, 1:4].tolist() == [2000, 2001, 2002]


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
        (dict(mlm_probability=1.5), "mlm_probability"),
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


# ----------------------------------------------------------------------------------------------------
# the collator as a library: Hugging Face's names, datasets' rows, batches a forward takes as they are
# ----------------------------------------------------------------------------------------------------
MODEL_KEYS = {"input_ids", "attention_mask", "labels", "token_type_ids", "position_ids"}


def test_hugging_face_names_and_return_tensors(tokenizer):
    import inspect

    from transformers import DataCollatorForLanguageModeling

    hf = set(inspect.signature(DataCollatorForLanguageModeling.__init__).parameters) - {"self"}
    ours = set(inspect.signature(MaskedLMCollator.__init__).parameters)
    assert hf <= ours, f"names of DataCollatorForLanguageModeling missing: {hf - ours}"
    collator = MaskedLMCollator(tokenizer=tokenizer, mlm=True, whole_word_mask=False, mlm_probability=0.15,
                                mask_replace_prob=0.8, random_replace_prob=0.1, pad_to_multiple_of=8,
                                return_tensors="pt", seed=0)
    assert collator([[CLS, 2000, SEP]])["input_ids"].shape == (1, 8)
    for other in ("tf", "jax", None):
        with pytest.raises(ValueError, match=r'invalid return_tensors=.*use "pt" .* or "np"'):
            MaskedLMCollator(tokenizer, return_tensors=other)
    with pytest.raises(ValueError, match=r"invalid return_tensors='tf'"):
        collator([[CLS, 2000, SEP]], "tf")
    with pytest.raises(ValueError, match=r"invalid seed='0'; use an int .* or None"):
        MaskedLMCollator(tokenizer, seed="0")
    with pytest.raises(ValueError, match=r"invalid return_counts="):
        MaskedLMCollator(tokenizer, return_counts="yes")


def test_counts_only_on_request(tokenizer):
    """By default a batch holds what a model's forward takes, nothing else; the recipe's collators
    (from_config: training, and eval through it) ask for the counts its loop reads."""
    from mlmkit.batch.collator import drop_targets
    from mlmkit.config.fields import MLMConfig
    from mlmkit.train.evaluation import eval_collator

    exs = [[CLS, *range(2000, 2030), SEP], [CLS, 2000, SEP]]
    for options in (dict(), dict(padding_side="left"), dict(padding="packed", max_length=64)):
        batch = MaskedLMCollator(tokenizer, mlm_probability=0.5, **options)(exs)
        assert set(batch) <= MODEL_KEYS and not set(batch) & set(METADATA_KEYS)
        assert set(model_inputs(batch)) == set(batch)
        drop_targets(batch)  # a dummy needs no counts
        assert (batch["labels"] == -100).all()
        counted = MaskedLMCollator(tokenizer, mlm_probability=0.5, return_counts=True, **options)(exs)
        assert int(counted["num_real_tokens"]) == 35 and int(counted["num_examples"]) == 2
        assert int(counted["num_masked_tokens"]) == int((counted["labels"] != -100).sum()) > 0
        assert torch.equal(counted["labels"], MaskedLMCollator(tokenizer, mlm_probability=0.5, **options)(exs)["labels"])
        drop_targets(counted)  # a dummy counts nothing: no masked or real tokens, no examples
        assert [int(counted[key]) for key in METADATA_KEYS] == [0, 0, 0]

    cfg = validate_config(MLMConfig())
    for collator in (MaskedLMCollator.from_config(tokenizer, cfg, position_offset=0, padding="longest"),
                     eval_collator(tokenizer, cfg)):
        assert collator.return_counts
        assert set(METADATA_KEYS) <= set(collator([{"input_ids": exs[0], "idx": 0}]))


def _pairs(tokenizer):
    """Sentence pairs as BERT encodes them: token_type_ids 0 then 1."""
    return [dict(tokenizer(a, b)) for a, b in zip(SENTENCES[::2], SENTENCES[1::2])]


def test_token_type_ids_are_laid_out_like_input_ids(tokenizer):
    pairs = _pairs(tokenizer)
    lengths = [len(p["input_ids"]) for p in pairs]
    assert all(1 in p["token_type_ids"] for p in pairs)
    for options in (dict(), dict(padding_side="left", pad_to_multiple_of=8),
                    dict(padding="packed", max_length=64)):
        collator = MaskedLMCollator(tokenizer, mlm=False, **options)
        batch = collator(pairs)
        types = batch["token_type_ids"]
        assert types.shape == batch["input_ids"].shape and types.dtype == torch.long
        real = torch.zeros(types.shape, dtype=torch.bool)
        for p, part in zip(pairs, split_batch(collator, batch, lengths)):
            assert types[part["row"], part["slice"]].tolist() == p["token_type_ids"]
            assert part["ids"].tolist() == p["input_ids"]
            real[part["row"], part["slice"]] = True
        assert (types[~real] == 0).all()  # padding: type 0
    # Upstream padding (attention_mask 0) is dropped from the types too; truncation cuts them.
    padded = [{**p, "input_ids": [*p["input_ids"], PAD, PAD], "attention_mask": [*p["attention_mask"], 0, 0],
               "token_type_ids": [*p["token_type_ids"], 0, 0]} for p in pairs]
    reference = MaskedLMCollator(tokenizer, mlm=False)(pairs)
    assert torch.equal(MaskedLMCollator(tokenizer, mlm=False)(padded)["token_type_ids"], reference["token_type_ids"])
    cut = MaskedLMCollator(tokenizer, mlm=False, max_length=10)(pairs)
    assert torch.equal(cut["token_type_ids"], reference["token_type_ids"][:, :10])
    # Without types in the examples, none in the batch; some with and some without is an error.
    assert "token_type_ids" not in MaskedLMCollator(tokenizer)([{"input_ids": p["input_ids"]} for p in pairs])
    with pytest.raises(ValueError, match=r"example 0 has token_type_ids and example 1 has no; give every"):
        MaskedLMCollator(tokenizer)([pairs[0], {"input_ids": pairs[1]["input_ids"]}])
    with pytest.raises(ValueError, match="token_type_ids length != its input_ids length"):
        MaskedLMCollator(tokenizer)([{"input_ids": [CLS, SEP], "token_type_ids": [0]}])


def test_rows_of_a_datasets_dataset_in_every_format(tokenizer):
    """Rows as `datasets` gives them (python lists, torch tensors, numpy arrays), with and without
    idx, collate to the same batch; a column the collator does not read passes through unless
    drop_keys names it."""
    from datasets import Dataset

    encoded = tokenizer(SENTENCES, return_special_tokens_mask=True)
    columns = {k: encoded[k] for k in ("input_ids", "token_type_ids", "attention_mask", "special_tokens_mask")}
    plain = Dataset.from_dict({**columns, "text": SENTENCES})
    keyed = plain.add_column("idx", list(range(len(SENTENCES))))
    for dataset in (plain, keyed):
        batches = []
        for fmt in (None, "torch", "numpy"):
            rows = dataset.with_format(fmt, columns=[c for c in dataset.column_names if c != "text"]) \
                if fmt else dataset
            for options in (dict(), dict(padding="packed", max_length=64)):
                collator = MaskedLMCollator(tokenizer, mlm_probability=0.3, drop_keys=["text"],
                                            **options)
                batches.append(collator([rows[i] for i in range(len(rows))]))
        for a, b in zip(batches, batches[2:]):  # lists vs torch, torch vs numpy; per padding
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert set(batches[0]) == {"input_ids", "attention_mask", "labels", "token_type_ids"}
    # Kept, the strings pass through as a list (padded); a packed row has no place for them.
    assert MaskedLMCollator(tokenizer)([plain[i] for i in range(3)])["text"] == SENTENCES[:3]
    with pytest.raises(ValueError, match=r"per-example key 'text' has no place in it; drop it "
                                         r"\(drop_keys=\['text'\]\)"):
        MaskedLMCollator(tokenizer, padding="packed", max_length=64)([plain[i] for i in range(3)])


def test_inputs_are_not_mutated(tokenizer):
    import copy

    import numpy as np

    pairs = _pairs(tokenizer)
    forms = [
        [p["input_ids"] for p in pairs],
        [torch.tensor(p["input_ids"]) for p in pairs],
        [{**p, "special_tokens_mask": tokenizer.get_special_tokens_mask(p["input_ids"], already_has_special_tokens=True)}
         for p in pairs],
        [{k: torch.tensor(v) for k, v in p.items()} for p in pairs],
        [{k: np.array(v) for k, v in p.items()} for p in pairs],
        [{**p, "idx": i} for i, p in enumerate(pairs)],
    ]
    collators = [MaskedLMCollator(tokenizer, mlm_probability=0.9),
                 MaskedLMCollator(tokenizer, mlm_probability=0.9, whole_word_mask=True, max_length=12),
                 MaskedLMCollator(tokenizer, mlm_probability=0.9, padding="packed", max_length=64)]

    def same(a, b) -> bool:
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (torch.Tensor, np.ndarray)):
            return type(a) is type(b) and a.dtype == b.dtype and (a == b).all()
        return a == b

    for form in forms:
        before = copy.deepcopy(form)
        for collator in collators:
            batch = collator(form)
            assert int((batch["labels"] != -100).sum()) > 10  # something was masked ...
            assert all(same(x, y) for x, y in zip(form, before))  # ... in the batch, not the input


def test_whole_word_masking_with_added_tokens(tokenizer_path):
    """Tokens added to the tokenizer are words of their own; an added special token is never a
    target, nor a random replacement."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)  # a fresh one: tokens are added to it
    tokenizer.add_tokens(["mlmkitword", "anotherword"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<ent>"]})
    ent, new = tokenizer.convert_tokens_to_ids("<ent>"), set(tokenizer.convert_tokens_to_ids(["mlmkitword", "anotherword"]))
    ids = tokenizer("the mlmkitword met <ent> anotherword unbelievably often")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert ent in ids and new <= set(ids) and max(ids) >= 30522
    collator = MaskedLMCollator(tokenizer, whole_word_mask=True, mlm_probability=0.5, random_replace_prob=0.5,
                                mask_replace_prob=0.3)
    batch = collator([{"input_ids": ids, "idx": i} for i in range(200)])
    targets = batch["labels"] != -100
    word = [p for p, t in enumerate(tokens) if t in ("un", "##bel", "##ie", "##va", "##bly")]
    assert len(word) == 5
    assert all(len(set(row[word].tolist())) == 1 for row in targets)  # the pieces go together
    for p, t in enumerate(tokens):
        rate = targets[:, p].float().mean().item()
        if t in ("[CLS]", "[SEP]", "<ent>"):
            assert rate == 0, t
        else:
            assert 0.35 < rate < 0.65, (t, rate)  # every word drawn alone at 0.5, added ones too
    replaced = batch["input_ids"][targets & (batch["input_ids"] != batch["labels"])]
    assert ent not in replaced.tolist() and MASK in replaced.tolist()
    assert all(i not in tokenizer.all_special_ids or i == MASK for i in replaced.tolist())

# ----------------------------------------------------------------------------------------------------
# in transformers' Trainer, DataLoader workers and the README's examples
# ----------------------------------------------------------------------------------------------------
# MaskedLMCollator as a library, used the way a user would: in transformers' Trainer with its
# defaults (a tokenized `datasets.Dataset` without idx), in DataLoaders with worker processes, and
# as the README's examples show it.
#
# What it proves: the model gets the attention mask and only keys its forward declares (padded and
# packed); masks of rows without idx change from batch to batch and are not a function of the batch
# slot, yet come back with the same seed; DataLoader workers draw their own masks, reproducibly from
# the DataLoader's generator, while rows with idx get the same masks with workers as in one process.


def test_the_package_exports_the_collator():
    import mlmkit
    assert mlmkit.MaskedLMCollator is MaskedLMCollator  # `from mlmkit import MaskedLMCollator`


@pytest.fixture(scope="module")
def dataset(tokenizer):
    """256 paragraphs of the embedded corpus as a user tokenizes them: input_ids, token_type_ids
    and attention_mask, no idx; at least 16 words each (so every slot has early positions), cut
    at 32 tokens (the tiny model's steps cost what its 30,522-way head does)."""
    from datasets import Dataset

    from mlmkit.data.corpus import embedded_corpus

    texts = [t for t in embedded_corpus() if len(t.split()) >= 16][:256]
    return Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32),
        batched=True, remove_columns=["text"])


def tiny_bert(tiny_bert_dir):
    from transformers import AutoConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(AutoConfig.from_pretrained(tiny_bert_dir))


def declared(model) -> set[str]:
    """The keyword arguments model.forward declares by name (not those of its **kwargs)."""
    return {name for name, p in inspect.signature(model.forward).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def train(tokenizer, dataset, tiny_bert_dir, output_dir, **options):
    """A few Trainer steps with the Trainer's defaults; returns (trainer, model, what the model
    received at every forward)."""
    from transformers import Trainer, TrainingArguments

    model = tiny_bert(tiny_bert_dir)
    received = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: received.append(
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}),
        with_kwargs=True)
    collator = MaskedLMCollator(tokenizer, mlm_probability=0.15, seed=0, **options)
    args = TrainingArguments(output_dir=str(output_dir), report_to="none", use_cpu=True, max_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    return trainer, model, received


@pytest.mark.parametrize("options", [dict(), dict(padding="packed", max_length=128)],
                         ids=["padded", "packed"])
def test_trainer_gets_the_mask_and_only_declared_keys(tokenizer, dataset, tiny_bert_dir, tmp_path,
                                                      options):
    assert "idx" not in dataset.column_names
    trainer, model, received = train(tokenizer, dataset, tiny_bert_dir, tmp_path / "a", **options)
    assert trainer.state.global_step == 3 and len(received) == 3
    names = declared(model)
    for kwargs in received:
        # num_items_in_batch is the Trainer's own loss argument (typed in the forward's **kwargs)
        assert set(kwargs) - {"num_items_in_batch"} <= names, set(kwargs) - names
        assert not set(kwargs) & set(METADATA_KEYS)
        assert {"input_ids", "attention_mask", "labels", "token_type_ids"} <= set(kwargs)
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if options:  # packed: positions restart at every example, which attends only to itself
            assert mask.dtype == torch.bool and mask.shape == (len(ids), 1, ids.shape[1], ids.shape[1])
            segment = torch.cumsum(kwargs["position_ids"] == 0, dim=1)  # (R, T) padding: its own
            assert torch.equal(mask[:, 0], segment[:, :, None] == segment[:, None, :])
        else:
            assert mask.shape == ids.shape and (mask.sum(1) > 0).all()
        assert 0 < int((kwargs["labels"] != -100).sum()) < int((ids != 0).sum())
    if options:
        rows = {len(kwargs["input_ids"]) for kwargs in received}
        assert max(rows) < 8  # 8 examples per batch, packed into fewer rows
    # The same seed, the same masks: a second run receives exactly the same batches.
    _, _, again = train(tokenizer, dataset, tiny_bert_dir, tmp_path / "b", **options)
    for first, second in zip(received, again):
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(first[key], second[key]), key


def test_masks_are_not_a_function_of_the_batch_slot(tokenizer, dataset, tiny_bert_dir, tmp_path):
    """200 batches of the Trainer's own train DataLoader (shuffled, no idx): how often position p
    of slot s is masked is the overall rate, for every slot and position; a collator that keyed
    masks by the slot gives 0 or 1 there."""
    from transformers import Trainer, TrainingArguments

    collator = MaskedLMCollator(tokenizer, mlm_probability=0.15, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    trainer = Trainer(model=tiny_bert(tiny_bert_dir), args=args, train_dataset=dataset,
                      data_collator=collator)
    special = torch.zeros(len(tokenizer), dtype=torch.bool)
    special[tokenizer.all_special_ids] = True
    width, slots = 16, 8
    masked = torch.zeros(slots, width)
    eligible = torch.zeros(slots, width)
    batches = 0
    while batches < 200:
        for batch in trainer.get_train_dataloader():
            if batches == 200:
                break
            labels, ids = batch["labels"][:, :width], batch["input_ids"][:, :width]
            original = torch.where(labels != -100, labels, ids)
            ok = (batch["attention_mask"][:, :width] == 1) & ~special[original]
            eligible[:len(ok)] += ok
            masked[:len(ok)] += ok & (labels != -100)
            batches += 1
    rate = masked.sum() / eligible.sum()
    enough = eligible >= 150
    assert enough[:, 1:15].all()  # every slot, positions 1..14: 150+ ordinary tokens each
    per_cell = masked[enough] / eligible[enough]
    assert (per_cell - rate).abs().max() < 0.1, per_cell  # within a few points (sd ~0.03)
    per_slot = masked.sum(1) / eligible.sum(1)
    assert (per_slot - rate).abs().max() < 0.03, per_slot
    assert abs(rate - 0.15) < 0.01
    # The same examples collated twice in a row are masked differently (as in transformers).
    rows = [dataset[i] for i in range(8)]
    first, second = collator(rows), collator(rows)
    assert torch.equal(first["input_ids"] != 0, second["input_ids"] != 0)
    assert not torch.equal(first["labels"], second["labels"])


def loader_labels(tokenizer, rows, *, num_workers: int, generator_seed: int, epochs: int = 2,
                  **options) -> list[list[torch.Tensor]]:
    """Labels of every batch, epoch by epoch, of a DataLoader over ``rows`` (batches of 4)."""
    collator = MaskedLMCollator(tokenizer, mlm_probability=0.3, seed=0, **options)
    loader = torch.utils.data.DataLoader(
        rows, batch_size=4, num_workers=num_workers, collate_fn=collator,
        generator=torch.Generator().manual_seed(generator_seed))
    return [[batch["labels"] for batch in loader] for _ in range(epochs)]


def same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return all(torch.equal(x, y) for ea, eb in zip(a, b) for x, y in zip(ea, eb))


def test_dataloader_workers_draw_their_own_masks_reproducibly(tokenizer, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    ids = tokenizer("Every worker draws its own masks, and a seeded loader draws them again, "
                    "epoch after epoch.")["input_ids"]
    rows = [{"input_ids": ids} for _ in range(16)]  # the same tokens everywhere, no idx
    runs = [loader_labels(tokenizer, rows, num_workers=2, generator_seed=s) for s in (0, 0, 1)]
    first = runs[0]
    batches = [b for epoch in first for b in epoch]
    assert len(batches) == 8
    # Batches 0 and 1 are the first call of worker 0 and of worker 1; 0 and 2 worker 0's first
    # two; epoch 1's workers are new ones. All masks differ.
    assert len({tuple(b.flatten().tolist()) for b in batches}) == len(batches)
    assert same(first, runs[1])  # the same generator seed: the same masks
    assert not any(torch.equal(x, y) for x, y in zip(batches, [b for e in runs[2] for b in e]))
    # In one process too, every batch differs, and a new collator draws the same again.
    single = loader_labels(tokenizer, rows, num_workers=0, generator_seed=0)
    assert len({tuple(b.flatten().tolist()) for e in single for b in e}) == len(batches)
    assert same(single, loader_labels(tokenizer, rows, num_workers=0, generator_seed=5))


@pytest.mark.parametrize("options", [dict(), dict(padding="packed", max_length=64)],
                         ids=["padded", "packed"])
def test_rows_with_idx_get_the_same_masks_with_workers_as_in_one_process(tokenizer, monkeypatch,
                                                                          options):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    ids = tokenizer("Rows that carry idx keep their masks wherever they are collated.")["input_ids"]
    rows = [{"input_ids": ids, "idx": i} for i in range(16)]
    one = loader_labels(tokenizer, rows, num_workers=0, generator_seed=0, epochs=1, **options)
    workers = loader_labels(tokenizer, rows, num_workers=2, generator_seed=1, epochs=2, **options)
    assert same(one, workers[:1]) and same(one, workers[1:])  # set_epoch, not workers, moves them
    assert len({tuple(b.flatten().tolist()) for b in one[0]}) == 4  # idx keys the draws


def test_readme_examples_run_as_written(tokenizer_path, tmp_path, monkeypatch):
    """The README's collator examples (Trainer, DataLoader loop with packed rows and workers, and
    paired masks under the Trainer), with only MODEL changed as the README's CPU note says."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    script = collator_examples(save_tiny_model(tmp_path / "tiny", tokenizer_path))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(script, "README.md (MaskedLMCollator as a library)", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 3
    assert namespace["paired"].calls > 0 and torch.isfinite(namespace["loss"])
    assert namespace["step"] == 2 and namespace["packed"].padding == "packed"


class EveryTargetMasked(MaskedLMCollator):
    """NeoBERT-style: every target the mask token, through transformers' override point."""

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
        labels = inputs.clone()
        targets = ~special_tokens_mask & (torch.rand(inputs.shape) < self.masker.mlm_probability)
        labels[~targets] = -100
        return torch.where(targets, self.tokenizer.mask_token_id, inputs), labels


@pytest.mark.parametrize("padding", ["longest", "packed"])
def test_a_subclass_overriding_torch_mask_tokens_gets_its_masks_used(tokenizer, padding):
    rows = [[CLS, *range(2000, 2012), SEP], [CLS, 2100, 2101, SEP], [CLS, 2200, SEP]]
    collator = EveryTargetMasked(tokenizer, mlm_probability=1.0, padding=padding, max_length=32,
                                 return_counts=True)
    batch = collator(rows)
    ids, labels = batch["input_ids"], batch["labels"]
    targets = labels != -100
    assert int(targets.sum()) == 12 + 2 + 1  # every real, non-special token, nothing else
    assert (ids[targets] == MASK).all() and not (ids[~targets] == MASK).any()
    assert sorted(labels[targets].tolist()) == sorted([*range(2000, 2012), 2100, 2101, 2200])
    assert int(batch["num_masked_tokens"]) == 15 and int(batch["num_real_tokens"]) == 21
    # the default implementation, called as transformers' users call it
    plain = MaskedLMCollator(tokenizer, mlm_probability=1.0)
    padded = torch.tensor([[CLS, 2000, 2001, SEP, PAD]])
    masked, labels = plain.torch_mask_tokens(padded)
    assert labels.tolist() == [[-100, 2000, 2001, -100, -100]]
    assert masked[0, 0] == CLS and masked[0, 4] == PAD


SWAP_SCRIPT = Path(__file__).resolve().parents[3] / "examples" / "trainer_swap.py"
SWAP_IMPORT = "from transformers import DataCollatorForLanguageModeling"


@pytest.mark.parametrize("collator_class", ["transformers", "mlmkit"])
def test_a_trainer_script_written_for_transformers_runs_with_the_collator_swapped_in(
        tokenizer_path, tmp_path, monkeypatch, collator_class):
    """examples/trainer_swap.py (NumPy features, a label column kept, seed=None, a subclass
    overriding torch_mask_tokens, a NumPy batch per call) as written for transformers' collator,
    and with only its import swapped for MaskedLMCollator, as its docstring and docs/collator.md
    say; MODEL set to a tiny BERT, the one change the docs tell CPU users to make."""
    script = SWAP_SCRIPT.read_text()
    assert script.count(SWAP_IMPORT) == 1
    swap = "from mlmkit import MaskedLMCollator as DataCollatorForLanguageModeling"
    assert swap in script and swap in (SWAP_SCRIPT.parents[1] / "docs" / "collator.md").read_text()
    if collator_class == "mlmkit":
        script = script.replace(SWAP_IMPORT, swap)
    model = save_tiny_model(tmp_path / "tiny", tokenizer_path)
    script, n = re.subn(r"^MODEL = .*$", f"MODEL = {model!r}", script, flags=re.M)
    assert n == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(script, str(SWAP_SCRIPT), "exec"), namespace)
    assert namespace["trainer"].state.global_step == 3
    assert isinstance(namespace["collator"], MaskedLMCollator) == (collator_class == "mlmkit")
    if collator_class == "mlmkit":  # the override's masks are the batch's, and the label passes
        batch = namespace["batch"]
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "label"}


# ----------------------------------------------------------------------------------------------------
# transformers' own collator tests (tests/trainer/test_data_collator.py), re-expressed
# ----------------------------------------------------------------------------------------------------
def test_arguments_by_position_in_transformers_order(tokenizer):
    import dataclasses

    from transformers import DataCollatorForLanguageModeling

    hf = [f.name for f in dataclasses.fields(DataCollatorForLanguageModeling)]
    ours = list(inspect.signature(MaskedLMCollator.__init__).parameters)[1:len(hf) + 1]
    assert ours == hf
    collator = MaskedLMCollator(tokenizer, True, True, 0.3, 1.0, 0.0, 8, "np", 5)
    assert (collator.mlm, collator.whole_word_mask, collator.mlm_probability) == (True, True, 0.3)
    assert (collator.mask_replace_prob, collator.random_replace_prob) == (1.0, 0.0)
    assert (collator.pad_to_multiple_of, collator.return_tensors, collator.seed) == (8, "np", 5)
    collator.mlm_probability = 0.5  # settable, as on transformers' dataclass
    assert collator.masker.mlm_probability == 0.5
    with pytest.raises(TypeError):  # mlmkit's own options are keyword-only
        MaskedLMCollator(tokenizer, True, False, 0.15, 0.8, 0.1, None, "pt", 0, False)


@pytest.mark.parametrize("as_dicts", [True, False], ids=["dicts", "lists"])
def test_no_pad_and_pad(tokenizer, as_dicts):
    ids = list(range(1000, 1010))
    no_pad, pad = [ids, ids], [ids[:5], ids]
    if as_dicts:
        no_pad, pad = ([{"input_ids": x} for x in f] for f in (no_pad, pad))
    for mlm in (False, True):
        for multiple, width in ((None, 10), (8, 16)):
            collator = MaskedLMCollator(tokenizer, mlm=mlm, pad_to_multiple_of=multiple,
                                        mlm_probability=0.5)
            for features in (no_pad, pad):
                batch = collator(features)
                assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
                masked = batch["input_ids"] == MASK
                assert masked.any() == mlm
                assert (batch["labels"][masked] != -100).all()  # a mask token is a target
                assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    without_pad = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    without_pad.pad_token = None
    with pytest.raises(ValueError, match="give the tokenizer a pad token"):
        MaskedLMCollator(without_pad, mlm=False)


@pytest.mark.parametrize("key", ["next_sentence_label", "sentence_order_label"])
def test_sentence_pair_labels_pass_through(tokenizer, key):
    features = [{"input_ids": torch.tensor([CLS, 1000, SEP, 1001, SEP]),
                 "token_type_ids": torch.tensor([0, 0, 0, 1, 1]), key: i} for i in range(2)]
    for multiple, width in ((None, 5), (8, 8)):
        batch = MaskedLMCollator(tokenizer, pad_to_multiple_of=multiple)(features)
        assert batch["input_ids"].shape == batch["token_type_ids"].shape == (2, width)
        assert batch["labels"].shape == (2, width) and batch[key].tolist() == [0, 1]


def test_language_modelling_collator_immutability(tokenizer):
    import copy

    base = [{"input_ids": tuple(range(1000, 1010)), "labels": (1,)},
            {"input_ids": tuple(range(1000, 1005)), "labels": (1,)}]
    for make in (list, torch.tensor, np.array):
        features = [{"input_ids": make(f["input_ids"]), "labels": make(f["labels"])} for f in base]
        original = copy.deepcopy(features)
        for collator in (MaskedLMCollator(tokenizer, mlm=False),
                         MaskedLMCollator(tokenizer, pad_to_multiple_of=8),
                         MaskedLMCollator(tokenizer, whole_word_mask=True),
                         MaskedLMCollator(tokenizer, span_masking=True)):
            collator(features)
            for f, o in zip(features, original):
                assert all(np.array_equal(np.asarray(f[k]), np.asarray(o[k])) for k in o)
