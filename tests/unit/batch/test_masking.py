"""masking.py through the collator: padding and special tokens are never targets and random
replacements come from ordinary vocabulary (over many random batches and layouts); an example's
targets are a pure function of (seed, epoch, example index); whole-word masking for any tokenizer
that marks words (masking.word_start_scheme): WordPiece, byte-level BPE (RoBERTa-style) and
SentencePiece/Metaspace tokenizers, the last two trained here, offline, on the embedded corpus."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from helpers import (
    CLS,
    MASK,
    PAD,
    SEP,
    random_examples,
    split_batch,
    word_level_tokenizer,
)

from mlmkit.batch.collator import MaskedLMCollator
from mlmkit.batch.masking import VocabularyTables, word_start_scheme
from mlmkit.data.corpus import embedded_corpus


# ----------------------------------------------------------------------------------------------------
# targets: never padding or specials, the 80/10/10 rule, replacements from ordinary vocabulary
# ----------------------------------------------------------------------------------------------------
def test_masking_invariants_over_random_batches(tokenizer):
    rng = random.Random(1234)
    special = set(tokenizer.all_special_ids)
    configs = [
        dict(),
        dict(padding_side="left"),
        dict(pad_to_multiple_of=8),
        dict(padding="max_length", max_length=32, padding_side="left", pad_to_multiple_of=8),
        dict(max_length=24),
        dict(padding="packed", max_length=48),
        dict(padding="packed", max_length=32, pad_to_multiple_of=8, attn_implementation="eager"),
    ]
    collators = [MaskedLMCollator(tokenizer, seed=7, return_counts=True, **cfg) for cfg in configs]
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
            assert all(t not in special and 0 <= t < len(tokenizer) for t in ids[replaced].tolist())
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


def test_random_replacements_come_from_ordinary_vocabulary():
    # With 3 of 5 ids special, drawing from the whole vocabulary would hit a special id almost surely.
    word_level = word_level_tokenizer()
    collator = MaskedLMCollator(word_level, mlm_probability=0.5, mask_replace_prob=0.0, random_replace_prob=1.0)
    batch = collator([{"input_ids": [3, 4, 0, 1, 3, 4, 4, 3], "idx": i} for i in range(64)])
    targets = batch["labels"] != -100
    assert int(targets.sum()) > 100
    assert set(batch["input_ids"][targets].tolist()) == {3, 4}
    assert not targets[:, [2, 3]].any()  # the literal [PAD] and [UNK] are special: never targets


# ----------------------------------------------------------------------------------------------------
# reproducibility: (seed, epoch, idx) and nothing else
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


def test_masks_depend_only_on_seed_epoch_idx(tokenizer):
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
        collator = MaskedLMCollator(tokenizer, seed=11, mlm_probability=0.3, **cfg)
        collator.set_epoch(3)
        results.append(_per_idx(collator, examples, chunks))
    assert all(r == results[0] for r in results[1:])
    assert sum(sum(l != -100 for l in labels) for _, labels in results[0].values()) > 20

    def with_(seed, epoch):
        c = MaskedLMCollator(tokenizer, seed=seed, mlm_probability=0.3)
        c.set_epoch(epoch)
        return _per_idx(c, examples, [order])

    assert with_(11, 3) == results[0]
    # The same tokens under different idx get different masks (idx really keys the draws) ...
    c = MaskedLMCollator(tokenizer, seed=11, mlm_probability=0.3)
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
    c = MaskedLMCollator(tokenizer, seed=11, mlm_probability=0.3)
    c.set_epoch(3)
    c([[CLS, SEP]])
    assert _per_idx(pickle.loads(pickle.dumps(c)), examples, [order]) == results[0]


# ----------------------------------------------------------------------------------------------------
# whole-word masking: WordPiece, and BPE / SentencePiece tokenizers trained here
# ----------------------------------------------------------------------------------------------------
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..3, <mask> last


def _wrap(backend):
    """A RoBERTa-style fast tokenizer around a trained `tokenizers` backend: <s> text </s>."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    ids = {t: backend.token_to_id(t) for t in SPECIALS}
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   cls_token="<s>", sep_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")


def _train(backend, corpus):
    from tokenizers import trainers
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIALS, show_progress=False,
                                  **({"initial_alphabet": _byte_alphabet()}
                                     if backend.pre_tokenizer.__class__.__name__ == "ByteLevel"
                                     else {}))
    backend.train_from_iterator(corpus, trainer=trainer)
    return _wrap(backend)


def _byte_alphabet():
    from tokenizers import pre_tokenizers
    return pre_tokenizers.ByteLevel.alphabet()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return embedded_corpus()


@pytest.fixture(scope="module")
def bpe(corpus):
    """Byte-level BPE as RoBERTa, GPT-2 and ModernBERT have it (a 1,000-piece vocabulary, so
    most words split into several pieces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return _train(backend, corpus)


@pytest.fixture(scope="module")
def sentencepiece(corpus):
    """SentencePiece-style (Metaspace '▁') as XLM-R, DeBERTa-v3 and T5 have it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return _train(backend, corpus)


@pytest.fixture(scope="module")
def wordpiece(tokenizer):
    """The embedded BERT tokenizer (WordPiece)."""
    return tokenizer


def test_word_scheme_is_read_from_the_tokenizer(bpe, sentencepiece, wordpiece):
    assert word_start_scheme(wordpiece) == ("continuation", "##")
    assert word_start_scheme(bpe) == ("start", "\u0120")
    assert word_start_scheme(sentencepiece) == ("start", "\u2581")
    assert word_start_scheme(word_level_tokenizer()) is None
    tables = VocabularyTables(bpe, whole_word=True)
    assert tables.starts_word[bpe.convert_tokens_to_ids("\u0120the")]
    assert not tables.starts_word[bpe.convert_tokens_to_ids("the")]
    assert tables.ends_word[bpe.convert_tokens_to_ids("\u010a")]  # '\n': a word follows it


def test_whole_word_masking_masks_all_subtokens_together(tokenizer, text_examples):
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in text_examples]
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

    wwm = MaskedLMCollator(tokenizer, whole_word_mask=True, mlm_probability=0.3)
    violations, masked_multi = word_violations(wwm)
    assert violations == 0
    assert masked_multi > 10
    # The check has teeth: token-level masking splits words.
    assert word_violations(MaskedLMCollator(tokenizer, mlm_probability=0.3))[0] > 0


def test_whole_word_mask_needs_a_tokenizer_that_marks_words():
    word_level = word_level_tokenizer()  # BPE / SentencePiece ones: below
    with pytest.raises(ValueError, match=r"marks no word boundaries.*WordPiece '##', byte-level"):
        MaskedLMCollator(word_level, whole_word_mask=True)
    MaskedLMCollator(word_level)  # fine without whole-word masking


def whitespace_words(text: str, offsets: list[tuple[int, int]], special: list[int]) -> list[list[int]]:
    """Token positions grouped by the whitespace-delimited word of ``text`` they lie in (the
    ground truth, from the tokenizer's character offsets); whitespace-only pieces belong to none."""
    word_of_char, word = [], -1
    for i, ch in enumerate(text):
        if not ch.isspace() and (i == 0 or text[i - 1].isspace()):
            word += 1
        word_of_char.append(None if ch.isspace() else word)
    groups: dict[int, list[int]] = {}
    for pos, ((a, b), sp) in enumerate(zip(offsets, special)):
        words = {word_of_char[c] for c in range(a, b) if word_of_char[c] is not None}
        if sp or not words:
            continue
        assert len(words) == 1, (text[a:b], "a piece spans two words")
        groups.setdefault(words.pop(), []).append(pos)
    return list(groups.values())


def tokenizer_words(encoding) -> list[list[int]]:
    """Token positions grouped by the tokenizer's own (tokenization-time) word ids."""
    groups: dict[int, list[int]] = {}
    for pos, word in enumerate(encoding.word_ids()):
        if word is not None:
            groups.setdefault(word, []).append(pos)
    return list(groups.values())


@pytest.mark.parametrize("name", ["bpe", "sentencepiece", "wordpiece"])
def test_whole_words_are_masked_together_whatever_the_padding(request, corpus, name):
    tok = request.getfixturevalue(name)
    texts = [t for t in corpus[:400] if 20 <= len(t.split()) <= 60][:24]
    enc = [tok(t, return_offsets_mapping=True, return_special_tokens_mask=True) for t in texts]
    examples = [{"input_ids": e["input_ids"], "idx": i} for i, e in enumerate(enc)]
    lengths = [len(e["input_ids"]) for e in enc]
    if name == "wordpiece":  # BERT's words split punctuation off: the tokenizer's word ids
        words = [tokenizer_words(e) for e in enc]
    else:  # a word is what lies between whitespace (fairseq's convention)
        words = [whitespace_words(t, e["offset_mapping"], e["special_tokens_mask"])
                 for t, e in zip(texts, enc)]
    assert sum(len(w) > 1 for ws in words for w in ws) >= 50, "too few multi-piece words"

    def targets(collator) -> list[list[bool]]:
        batch = collator(examples)
        return [(part["labels"] != -100).tolist()
                for part in split_batch(collator, batch, lengths)]

    common = dict(whole_word_mask=True, mlm_probability=0.3, seed=5, max_length=512)
    per_mode = {padding: targets(MaskedLMCollator(tok, padding=padding, **common))
                for padding in ("longest", "max_length", "packed")}
    # the same targets in every layout, and the same as each example masked alone
    assert per_mode["longest"] == per_mode["max_length"] == per_mode["packed"]
    alone = MaskedLMCollator(tok, **common)
    for i, ex in enumerate(examples):
        _, labels = alone.mask_example(ex["input_ids"], None, i)
        assert (labels != -100).tolist() == per_mode["longest"][i]

    violations = whole_multi = 0
    for flags, ws, e in zip(per_mode["longest"], words, enc):
        assert not any(f for f, sp in zip(flags, e["special_tokens_mask"]) if sp)  # never <s> </s>
        for w in ws:
            picked = {flags[p] for p in w}
            violations += len(picked) > 1
            whole_multi += len(w) > 1 and picked == {True}
    assert violations == 0
    assert whole_multi >= 5  # multi-piece words were chosen, every piece of them
    # The check has teeth: token-level masking splits words.
    token_level = targets(MaskedLMCollator(tok, **{**common, "whole_word_mask": False}))
    assert sum(len({f[p] for p in w}) > 1 for f, ws in zip(token_level, words) for w in ws) > 0


def test_bpe_word_starts_after_specials_and_newlines(bpe):
    """RoBERTa's first word has no 'Ġ', nor has a word at the start of a line: both start words
    (after <s> / after 'Ċ'), so neither joins the piece before it."""
    ids = bpe("alpha beta\ngamma delta")["input_ids"]
    tokens = bpe.convert_ids_to_tokens(ids)
    collator = MaskedLMCollator(bpe, whole_word_mask=True)
    special = collator.tables.is_special[torch.tensor(ids)]
    word_of, counts = collator.masker._word_index(torch.tensor(ids), special, [len(ids)])
    groups: dict[int, list[str]] = {}
    for t, w in zip(tokens, word_of.tolist()):
        groups.setdefault(w, []).append(t)
    joined = ["".join(g).replace("\u0120", " ").strip() for g in groups.values()]
    assert joined == ["<s>", "alpha", "beta", "\u010a", "gamma", "delta", "</s>"], tokens
    assert counts == [7]


# ----------------------------------------------------------------------------------------------------
# keyed masks are pinned; examples without idx get their own keys (masking.unkeyed_seed)
# ----------------------------------------------------------------------------------------------------
PINNED_TEXTS = ["The unbelievably transformational tokenization of multilingual paragraphs.",
                "Hyperparameters were tuned with gradient accumulation and warmup.", "A short one.",
                "Quixotic lexicographers reorganised the encyclopaedia's appendices."]


def _keyed_digest(tok, **options) -> str:
    """SHA-256 (16 hex digits) of the masked ids and labels of keyed batches, two epochs."""
    import hashlib
    examples = [tok(t)["input_ids"] for t in PINNED_TEXTS]
    h = hashlib.sha256()
    for epoch in (0, 2):
        collator = MaskedLMCollator(tok, **options)
        collator.set_epoch(epoch)
        for rep in range(3):
            batch = collator([{"input_ids": e, "idx": 1000 * rep + i} for i, e in enumerate(examples)])
            h.update(batch["input_ids"].numpy().tobytes())
            h.update(batch["labels"].numpy().tobytes())
    return h.hexdigest()[:16]


def test_keyed_masks_are_pinned(wordpiece):
    """The masks of examples that carry idx are those the recipe has always drawn (the digests were
    taken before examples without idx got keys of their own): the recipe's runs and the ablation's
    arms stay paired with runs made before, bit for bit."""
    from mlmkit.batch.masking import example_seed
    assert [example_seed(s, e, i) for s, e, i in [(0, 0, 0), (42, 3, 12345), (7, 1, 1 << 40)]] == [
        2558736989570252433, 3370120541614625827, 6508300594384234650]
    pinned = [
        (dict(seed=0), "942f2b6920085fd8"),
        (dict(seed=5, mlm_probability=0.4), "8d597a839d9a884a"),
        (dict(seed=3, whole_word_mask=True, mlm_probability=0.3), "2e9d6712e927773d"),
        (dict(seed=1, mlm_probability=0.5, mask_replace_prob=0.5, random_replace_prob=0.3),
         "6f354edf697446ea"),
    ]
    for options, digest in pinned:
        assert _keyed_digest(wordpiece, **options) == digest, options


def test_unkeyed_seed_is_its_own_chain():
    from mlmkit.batch.masking import example_seed, unkeyed_seed
    keys = {unkeyed_seed(0, e, w, c, p) for e in range(2) for w in range(3) for c in range(4)
            for p in range(8)}
    assert len(keys) == 2 * 3 * 4 * 8  # every part of the key counts
    assert all(0 <= k < 2 ** 63 for k in keys)
    assert not keys & {example_seed(0, e, i) for e in range(2) for i in range(1000)}
    assert unkeyed_seed(1, 0, 0, 0, 0) != unkeyed_seed(0, 0, 0, 0, 0)
    assert unkeyed_seed(3, 1, 2, 3, 4) == unkeyed_seed(3, 1, 2, 3, 4)


def test_unkeyed_examples_get_new_masks_every_call_reproducibly(wordpiece):
    examples = [wordpiece(t)["input_ids"] for t in PINNED_TEXTS]

    def run(seed: int) -> list[torch.Tensor]:
        collator = MaskedLMCollator(wordpiece, seed=seed, mlm_probability=0.3)
        return [collator(examples)["labels"] for _ in range(4)]

    first = run(0)
    assert all(not torch.equal(a, b) for a, b in zip(first, first[1:]))  # a new draw every call
    assert all(torch.equal(a, b) for a, b in zip(first, run(0)))  # the same seed: the same draws
    assert not any(torch.equal(a, b) for a, b in zip(first, run(1)))
    # The same tokens in two positions of one batch are masked independently.
    same = MaskedLMCollator(wordpiece, seed=0, mlm_probability=0.3)([examples[0]] * 8)["labels"]
    assert len({tuple(row.tolist()) for row in same}) > 1


def test_keyed_neighbours_of_unkeyed_examples_keep_their_masks(wordpiece):
    """A batch may mix examples with and without idx: the keyed ones get exactly the masks they
    get alone, whatever the call count; the unkeyed ones their own."""
    examples = [wordpiece(t)["input_ids"] for t in PINNED_TEXTS]
    collator = MaskedLMCollator(wordpiece, seed=4, mlm_probability=0.4)
    collator.set_epoch(1)
    for call in range(3):
        items = [{"input_ids": e, "idx": 10 + i} if i % 2 else {"input_ids": e}
                 for i, e in enumerate(examples)]
        batch = collator(items)
        parts = split_batch(collator, batch, [len(e) for e in examples])
        for i, (e, part) in enumerate(zip(examples, parts)):
            if i % 2:
                masked, labels = collator.mask_example(e, None, 10 + i)
                assert torch.equal(part["labels"], labels) and torch.equal(part["ids"], masked)
    assert collator.calls == 3


# ----------------------------------------------------------------------------------------------------
# span masking (SpanBERT): contiguous whole-word spans, the same budget, keyed, isolated when packed
# ----------------------------------------------------------------------------------------------------
def _words_and_runs(tables, ids, labels):
    """(words, the lengths in words of the runs of consecutive target words) of one example."""
    starts = tables.starts_word[ids].tolist()
    words, runs, run = [], [], 0
    for i, start in enumerate(starts):
        if start or i == 0:
            words.append([])
        words[-1].append(i)
    for word in words:
        hit = [labels[i] != -100 for i in word]
        assert all(hit) or not any(hit), "a span splits a word"
        if hit[0]:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    return words, runs + ([run] if run else [])


def test_span_masking_masks_contiguous_word_spans_to_the_same_budget(tokenizer):
    texts = [t for t in embedded_corpus() if len(t) > 400][:120]
    examples = [{"input_ids": ids, "idx": i} for i, ids in
                enumerate(tokenizer(texts, truncation=True, max_length=128)["input_ids"])]
    collator = MaskedLMCollator(tokenizer, span_masking=True, seed=3)
    plain = MaskedLMCollator(tokenizer, whole_word_mask=True, seed=3)
    runs, plain_runs, targets, real = [], [], 0, 0
    for ex in examples:
        ids = torch.tensor(ex["input_ids"])
        labels = collator.mask_example(ids, None, ex["idx"])[1].tolist()
        runs += _words_and_runs(collator.tables, ids, labels)[1]
        plain_runs += _words_and_runs(collator.tables, ids,
                                      plain.mask_example(ids, None, ex["idx"])[1].tolist())[1]
        targets += sum(x != -100 for x in labels)
        real += len(ids) - 2
    assert sum(runs) / len(runs) > 2.5 > 1.5 > sum(plain_runs) / len(plain_runs)
    assert 0.14 < targets / real < 0.17  # the budget: 15% of the real tokens
    # Keyed: an example's spans are the same in any batch, position or layout, padded or packed
    # (spans never cross into a neighbour in a packed row).
    ref = {ex["idx"]: collator.mask_example(torch.tensor(ex["input_ids"]), None, ex["idx"])
           for ex in examples[:24]}
    for options in (dict(), dict(padding="packed", max_length=256)):
        batched = MaskedLMCollator(tokenizer, span_masking=True, seed=3, **options)
        batch_examples = examples[:24][::-1]
        lengths = [len(ex["input_ids"]) for ex in batch_examples]
        batch = batched(batch_examples)
        for ex, part in zip(batch_examples, split_batch(batched, batch, lengths)):
            assert torch.equal(part["ids"], ref[ex["idx"]][0])
            assert torch.equal(part["labels"], ref[ex["idx"]][1])
    # Rates 0 and 1: no target, every real token.
    ids = torch.tensor(examples[0]["input_ids"])
    for rate, expected in ((0.0, 0), (1.0, len(ids) - 2)):
        one = MaskedLMCollator(tokenizer, span_masking=True, mlm_probability=rate)
        assert int((one.mask_example(ids, None, 0)[1] != -100).sum()) == expected
