"""MLM masking: which tokens become targets, and what they are replaced with.

The contracts that live here (and nowhere else):

* **Padding and special tokens are never targets.** Masking runs on the examples' own tokens
  only (padding does not exist yet: `layout.py` adds it afterwards), and every special id of the
  tokenizer is excluded through a lookup table; random replacements are drawn from ordinary
  (non-special) vocabulary ids only. Labels are -100 everywhere except at targets.
* **Masking is reproducible**: the targets of an example and their replacements are a pure
  function of ``(seed, epoch, idx)`` (`example_seed`), independent of the batch the example lands
  in, its position there, the padding and the padding mode, the number of processes.
  An example given without ``idx`` (a library user's batch) is keyed by where it is collated
  instead (`unkeyed_seed`: seed, epoch, the DataLoader worker, the collator's call count, the
  position in the batch): reproducible from the seed, and new masks every batch.

Whole-word masking works for any tokenizer whose vocabulary marks word boundaries, found by
`word_start_scheme`: WordPiece (BERT: ``##`` continues a word), byte-level BPE (RoBERTa, GPT-2,
ModernBERT: ``Ġ``, the byte-level image of a space, starts one) and SentencePiece / Metaspace
(XLM-R, DeBERTa-v3, T5, ALBERT: ``▁`` starts one). For the last two a word is what lies between
whitespace, as in fairseq's ``--mask-whole-words``: punctuation written against a word is masked
with it. The tables are per vocabulary id (`VocabularyTables`), so no tokenization-time word ids
are needed and the masks stay a function of the ids alone.

`Masker.mask` is the one masking function; `MaskedLMCollator` calls it for every batch and
`MaskedLMCollator.mask_example` for a single example.
"""

from __future__ import annotations

from typing import Any

import torch

_MASK64 = (1 << 64) - 1
METASPACE = "\u2581"  # '▁', SentencePiece's word-start mark


def _byte_level_whitespace() -> frozenset[str]:
    """The characters that byte-level BPE (GPT-2's ``bytes_to_unicode``) writes for the
    whitespace bytes \\t \\n \\v \\f \\r and space: 'ĉ Ċ ċ Č č Ġ'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]  # mapped to 256, 257, ... in order
    return frozenset(chr(256 + others.index(b)) for b in (9, 10, 11, 12, 13, 32))


BYTE_LEVEL_WHITESPACE = _byte_level_whitespace()  # 'Ġ' (U+0120) is the space


def _component_types(component: Any) -> list[dict]:
    """The JSON descriptions of a tokenizers pre-tokenizer or decoder, Sequences flattened."""
    import json
    if component is None:
        return []
    try:
        data = json.loads(component.__getstate__())
    except Exception:  # noqa: BLE001 - an exotic component: no information
        return []
    stack, found = [data], []
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack += item.get("pretokenizers", []) + item.get("decoders", [])
    return found


def word_start_scheme(tokenizer: Any) -> tuple[str, str] | None:
    """How ``tokenizer``'s vocabulary marks words, or None when it does not (word-level or
    character tokenizers, unknown schemes).

    ``("continuation", prefix)``: pieces starting with ``prefix`` continue the word before them
    (WordPiece, ``##``). ``("start", mark)``: pieces starting with ``mark`` begin a word (byte-level
    BPE ``Ġ``, SentencePiece ``▁``). Read from the fast tokenizer's model, pre-tokenizer and decoder;
    for a tokenizer without one (a slow tokenizer), from its vocabulary.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = backend.model
        kind = type(model).__name__
        prefix = getattr(model, "continuing_subword_prefix", None)
        if kind == "WordPiece" or (kind == "BPE" and prefix):
            return ("continuation", prefix or "##")
        if kind == "BPE" and getattr(model, "end_of_word_suffix", None):
            return None  # words marked at their end (</w>): not supported
        parts = _component_types(backend.pre_tokenizer) + _component_types(backend.decoder)
        types = {p.get("type") for p in parts}
        if "ByteLevel" in types:
            return ("start", "\u0120")
        for part in parts:
            if part.get("type") == "Metaspace":
                return ("start", part.get("replacement") or METASPACE)
        if kind in ("WordLevel",) or types:
            return None
    vocab = list(tokenizer.get_vocab())  # a slow tokenizer: what its pieces look like
    if any(t.startswith("##") for t in vocab):
        return ("continuation", "##")
    for mark in ("\u0120", METASPACE):
        if sum(t.startswith(mark) for t in vocab) > 0.1 * max(len(vocab), 1):
            return ("start", mark)
    return None


def _splitmix64(x: int) -> int:
    """One round of the SplitMix64 finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def example_seed(seed: int, epoch: int, idx: int) -> int:
    """The generator seed for one example's masking: a hash of (seed, epoch, idx) in [0, 2**63).

    Chained hashing (rather than e.g. ``seed * P + epoch * Q + idx``) keeps distinct triples from
    colliding and neighbouring idx values from getting correlated streams.
    """
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (epoch & _MASK64))
    h = _splitmix64(h ^ (idx & _MASK64))
    return h & ((1 << 63) - 1)  # torch.Generator.manual_seed accepts it on every platform


# Separates the unkeyed chain from `example_seed`'s (an arbitrary odd 64-bit constant).
_UNKEYED_TAG = 0x6D6C6D6B69745F75


def unkeyed_seed(seed: int, epoch: int, worker: int, call: int, position: int) -> int:
    """The generator seed for an example that carries no index: a hash of (seed, epoch, worker,
    call, position) in [0, 2**63).

    ``worker`` identifies the process that collates (0: the main process; in a DataLoader worker,
    1 + the worker's seed, which the DataLoader draws from the main process's seeded RNG for every
    new set of workers), ``call`` counts that process's calls of the collator, ``position`` is the
    example's place in the batch. So every batch of a run gets fresh masks, and the run's masks
    come back with the same seeds. The chain starts with its own tag, apart from `example_seed`.
    """
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ _UNKEYED_TAG)
    for part in (epoch, worker, call, position):
        h = _splitmix64(h ^ (part & _MASK64))
    return h & ((1 << 63) - 1)


class VocabularyTables:
    """Lookup tables over the tokenizer's ids, built once so that per-batch work is indexing.

    ``is_special`` (V,) bool: every id in ``tokenizer.all_special_ids``; ``replacement_ids``: the
    ordinary ids (< len(tokenizer), not special) that random replacement draws from. For
    whole-word masking (`word_start_scheme`): ``starts_word`` (V,) bool, the pieces that begin a
    word (not ``##`` pieces; pieces starting with ``Ġ``/``▁`` or another whitespace image), and
    ``ends_word`` (V,) bool, the pieces after which a new word begins (byte-level pieces ending in
    whitespace, e.g. ``Ċ`` before a word at the start of a line); both None without it.

    Raises:
        ValueError: ``whole_word`` with a tokenizer whose vocabulary marks no words.
    """

    def __init__(self, tokenizer: Any, whole_word: bool = False):
        vocab_size = len(tokenizer)
        special_ids = sorted({int(i) for i in tokenizer.all_special_ids})
        table_size = max([vocab_size, *(i + 1 for i in special_ids)])
        self.is_special = torch.zeros(table_size, dtype=torch.bool)  # (V,)
        self.is_special[special_ids] = True
        self.replacement_ids = torch.nonzero(~self.is_special[:vocab_size]).flatten()  # (V_ord,)
        self.starts_word: torch.Tensor | None = None
        self.ends_word: torch.Tensor | None = None
        self.word_scheme: tuple[str, str] | None = None
        if whole_word:
            scheme = word_start_scheme(tokenizer)
            if scheme is None:
                raise ValueError(
                    f"MaskedLMCollator: invalid whole_word_mask=True; {type(tokenizer).__name__} "
                    "marks no word boundaries that mlmkit knows (WordPiece '##', byte-level BPE "
                    "'Ġ', SentencePiece '▁'); pass whole_word_mask=False")
            self.word_scheme = scheme
            how, mark = scheme
            tokens = [t if isinstance(t, str) else "" for t in
                      tokenizer.convert_ids_to_tokens(list(range(vocab_size)))]
            space = BYTE_LEVEL_WHITESPACE if mark == "\u0120" else frozenset(mark)
            if how == "continuation":
                starts = [not t.startswith(mark) for t in tokens]
                ends = [False] * vocab_size
            else:
                starts = [not t or t[0] in space for t in tokens]
                ends = [bool(t) and t[-1] in space for t in tokens]
            self.starts_word = torch.ones(table_size, dtype=torch.bool)  # (V,) added ids: words
            self.starts_word[:vocab_size] = torch.tensor(starts, dtype=torch.bool)
            self.ends_word = torch.zeros(table_size, dtype=torch.bool)  # (V,)
            self.ends_word[:vocab_size] = torch.tensor(ends, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.is_special)


SPAN_P = 0.2  # SpanBERT's geometric span lengths (mean 3.8 words with the cap)
SPAN_MAX_WORDS = 10


def span_words(sizes: list[int], rate: float, gen: torch.Generator | None) -> list[int]:
    """SpanBERT's span selection for one example: the indices of the chosen words.

    ``sizes`` are the example's words' real tokens (0 for a special token's word: never chosen).
    The target budget is ``rate`` of the real tokens, rounded at random so that its mean is
    exact; spans of geometric length (``SPAN_P``, at most ``SPAN_MAX_WORDS`` words) start at a
    uniformly drawn word and are taken word by word until the budget is reached (the last span
    cut there; a word is never split). When the drawn spans overlap so much that they fall short
    (high rates), the rest is filled in a drawn order. All draws come from ``gen`` (the
    example's keyed generator, or torch's global one)."""
    w, total = len(sizes), sum(sizes)
    budget = int(rate * total + float(torch.rand(1, generator=gen)))
    if budget <= 0:
        return []
    tries = 2 * budget + 8
    u = 1.0 - torch.rand(tries, generator=gen)  # (0, 1]
    spans = (1 + torch.floor(torch.log(u) / torch.log(torch.tensor(1.0 - SPAN_P)))).clamp_(
        max=SPAN_MAX_WORDS).to(torch.long).tolist()
    starts = torch.randint(w, (tries,), generator=gen).tolist()
    fill = torch.randperm(w, generator=gen).tolist()
    taken, chosen, covered = [False] * w, [], 0
    order = [range(s, min(s + n, w)) for s, n in zip(starts, spans)] + [fill]
    for run in order:
        for j in run:
            if not taken[j] and sizes[j] > 0:
                taken[j] = True
                chosen.append(j)
                covered += sizes[j]
                if covered >= budget:
                    return chosen
    return chosen


class Masker:
    """Reproducible MLM masking of concatenated examples (HF's 80/10/10 semantics by default).

    Args are those of `MaskedLMCollator` (validated there): ``mlm_probability`` selects targets
    (whole words with ``whole_word_mask``); of the targets, ``mask_replace_prob`` become the mask
    token, ``random_replace_prob`` a random ordinary token, the rest stay unchanged. ``seed``
    None draws from torch's global generator instead of the keyed streams (transformers'
    ``seed=None``: reproducible only through ``torch.manual_seed`` and the batch order).
    ``span_masking`` selects contiguous spans of whole words instead (`span_words`).
    """

    def __init__(self, tables: VocabularyTables, *, mask_token_id: int, mlm_probability: float,
                 mask_replace_prob: float, random_replace_prob: float, whole_word_mask: bool,
                 seed: int | None, span_masking: bool = False):
        self.tables = tables
        self.mask_token_id = mask_token_id
        self.mlm_probability = float(mlm_probability)
        self.mask_replace_prob = float(mask_replace_prob)
        self.random_replace_prob = float(random_replace_prob)
        self.whole_word_mask = bool(whole_word_mask)
        self.span_masking = bool(span_masking)
        self.seed = seed
        self._generator: torch.Generator | None = None  # built lazily: the Masker pickles

    def __getstate__(self) -> dict[str, Any]:  # into DataLoader worker processes
        return {**self.__dict__, "_generator": None}

    def _word_index(self, ids: torch.Tensor, special: torch.Tensor,
                    lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
        """(N,) the word of every token, and the number of words per example."""
        lens = torch.tensor(lengths, dtype=torch.long)  # (E,)
        first = torch.cumsum(lens, 0) - lens  # (E,) offset of each example's first token
        # A word starts at a word-starting piece (`VocabularyTables`), after a piece that ends in
        # whitespace, at a special token and right after one (so a stray '##' piece, or RoBERTa's
        # first word, which has no 'Ġ', does not join the <s> "word"), and every example starts a
        # word (so words never span two examples).
        starts = self.tables.starts_word[ids] | special  # (N,)
        starts[1:] |= special[:-1] | self.tables.ends_word[ids[:-1]]
        starts[first] = True
        word_of = torch.cumsum(starts.to(torch.long), 0) - 1  # (N,) global word index per token
        example_of = torch.repeat_interleave(torch.arange(len(lengths)), lens)  # (N,)
        words = torch.zeros(len(lengths), dtype=torch.long).index_add_(
            0, example_of, starts.to(torch.long)).tolist()  # words per example
        return word_of, words

    def mask(self, ids: torch.Tensor, special: torch.Tensor, lengths: list[int],
             idxs: list[int | None], epoch: int,
             stream: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask examples given concatenated, ids/special (N,) with N = sum(lengths); returns
        ``(masked_ids, labels)``, both (N,).

        Only the random draws loop over examples: each example seeds the generator with
        `example_seed` (seed, epoch, idx) and draws for its own tokens (and words), so its
        result cannot depend on the other examples, the batch layout or the padding. An example
        whose idx is None takes `unkeyed_seed` (seed, epoch, *stream, its position), ``stream``
        being ``(worker, call)`` of the collator that calls (see `unkeyed_seed`). Selection
        and replacement then run once over the whole batch. No minimum number of targets is
        forced: a short example can get none (the loss is token weighted, so it adds no terms).
        """
        words = self.whole_word_mask or self.span_masking
        if words:
            word_of, units = self._word_index(ids, special, lengths)
        else:
            units = lengths
        if self.span_masking:  # (W_total,) the real (non-special) tokens of every word
            word_sizes = torch.zeros(sum(units), dtype=torch.long).index_add_(
                0, word_of, (~special).to(torch.long))
            first_word = 0
        if self._generator is None and self.seed is not None:
            self._generator = torch.Generator()
        gen, n_replacements = self._generator, len(self.tables.replacement_ids)
        select_u, action_u, picks = [], [], []
        for pos, (n, w, idx) in enumerate(zip(lengths, units, idxs)):
            if gen is not None:  # seed None: torch's global generator, as transformers draws
                gen.manual_seed(example_seed(self.seed, epoch, idx) if idx is not None
                                else unkeyed_seed(self.seed, epoch, *stream, pos))
            u = torch.rand(w + n, generator=gen)  # (W + L,): one draw per unit, then per token
            select_u.append(u[:w])
            action_u.append(u[w:])
            picks.append(torch.randint(n_replacements, (n,), generator=gen))  # (L,)
            if self.span_masking:  # the unit draws become the chosen words: 0 chosen, 1 not
                sizes = word_sizes[first_word:first_word + w].tolist()
                chosen = span_words(sizes, self.mlm_probability, gen)
                chosen_t = torch.tensor(chosen, dtype=torch.long)
                select_u[-1] = torch.ones(w).index_fill_(0, chosen_t, 0.0)
                first_word += w
        select = torch.cat(select_u)  # (W_total,) or (N,)
        action = torch.cat(action_u)  # (N,)
        pick = torch.cat(picks)  # (N,)
        if words:
            select = select[word_of]  # (N,) every token takes its word's draw
        selected = (select < self.mlm_probability) & ~special  # (N,) never a special token
        # One uniform per token splits the targets three ways: [0, m) -> mask token,
        # [m, m + r) -> random ordinary token, the rest unchanged.
        to_mask = selected & (action < self.mask_replace_prob)
        to_random = selected & ~to_mask & (
            action < self.mask_replace_prob + self.random_replace_prob)
        labels = torch.where(selected, ids, -100)  # (N,)
        masked = torch.where(to_mask, self.mask_token_id, ids)
        masked = torch.where(to_random, self.tables.replacement_ids[pick], masked)  # (N,)
        return masked, labels
