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
