"""Whole-word masking for any tokenizer that marks words (masking.word_start_scheme): WordPiece,
byte-level BPE (RoBERTa-style) and SentencePiece/Metaspace tokenizers, the last two trained here,
offline, on the embedded corpus. Plus the eval masking rate (--eval_mlm_probability)."""

from __future__ import annotations

import pytest
import torch

from mlmkit.collator import MaskedLMCollator
from mlmkit.data import embedded_corpus
from mlmkit.masking import VocabularyTables, word_start_scheme
from test_collator import _word_level_tokenizer, split_batch

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
def wordpiece():
    from transformers import AutoTokenizer

    from mlmkit.modeling import embedded_model_path
    return AutoTokenizer.from_pretrained(embedded_model_path())


def test_word_scheme_is_read_from_the_tokenizer(bpe, sentencepiece, wordpiece):
    assert word_start_scheme(wordpiece) == ("continuation", "##")
    assert word_start_scheme(bpe) == ("start", "\u0120")
    assert word_start_scheme(sentencepiece) == ("start", "\u2581")
    assert word_start_scheme(_word_level_tokenizer()) is None
    tables = VocabularyTables(bpe, whole_word=True)
    assert tables.starts_word[bpe.convert_tokens_to_ids("\u0120the")]
    assert not tables.starts_word[bpe.convert_tokens_to_ids("the")]
    assert tables.ends_word[bpe.convert_tokens_to_ids("\u010a")]  # '\n': a word follows it


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


def test_eval_masking_rate_is_independent_of_training(wordpiece):
    from mlmkit.config import MLMConfig
    from mlmkit.evaluation import eval_collator

    cfg = MLMConfig(mlm_probability=0.3).validate()
    train = MaskedLMCollator.from_config(wordpiece, cfg, position_offset=0, padding="longest")
    assert train.masker.mlm_probability == 0.3
    assert eval_collator(wordpiece, cfg).masker.mlm_probability == 0.15  # the default
    cfg = MLMConfig(mlm_probability=0.3, eval_mlm_probability=0.2).validate()
    assert eval_collator(wordpiece, cfg).masker.mlm_probability == 0.2


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
    from mlmkit.masking import example_seed
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
    from mlmkit.masking import example_seed, unkeyed_seed
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
