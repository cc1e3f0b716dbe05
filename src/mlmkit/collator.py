"""Batch collation for masked-language-model training: padding, packing, attention masks, MLM masking.

`MaskedLMCollator` turns a list of tokenized examples into a batch of tensors that a Hugging Face
masked-LM model can consume, and keeps the project's collation contracts (see DESIGN.md):

* **Every batch carries an attention mask built from the examples' lengths**, never from
  ``input_ids == pad_token_id`` (the pad id can also be a real token, e.g. a literal ``[PAD]`` in the
  text, or a tokenizer whose pad id doubles as an ordinary id).
* **Padding and special tokens are never MLM targets**; random replacement tokens are drawn only
  from ordinary (non-special) vocabulary ids; ``labels`` is -100 everywhere except masked positions,
  where it holds the original id.
* **Masking is reproducible**: which positions of an example are masked, and what they are replaced
  with, is a pure function of ``(seed, epoch, idx)`` -- independent of the batch the example lands
  in, its position there, the padding width or side, and the padding mode (padded or packed). The
  single place masking happens is `MaskedLMCollator.mask_example`.
* **Packed rows isolate their examples**: each example attends only to itself and restarts its
  position ids (plus ``position_offset``, which is ``padding_idx + 1`` for RoBERTa-family models), so
  per-example outputs equal the example run alone.
* **Padding is attended only through `model_inputs(batch, mask_padding=False)`**, the one definition
  of the padding ablation's unmasked arm.

Input examples
--------------
Each item of the list passed to ``__call__`` is one of

* a list of ints, or a 1-D integer tensor: the token ids of one example;
* a dict with ``input_ids`` and optionally ``attention_mask``, ``special_tokens_mask`` and ``idx``.

``idx`` is the example's index in its dataset; it keys the reproducible masking. When it is absent
the example's position in the list is used instead -- reproducible only if the same examples always
arrive in the same order, so datasets should carry an ``idx`` column. A dict's ``attention_mask``
(from a tokenizer that already padded the example) marks real tokens: positions where it is 0 are
*dropped* from the example before anything else (they are padding, not content). A dict's
``special_tokens_mask`` is OR-ed with the tokenizer's special-id table, so a special id is never a
target even if the given mask forgets it. When ``max_length`` is set, examples longer than it are
truncated to their first ``max_length`` tokens (which may cut off a trailing ``[SEP]``; tokenize with
``truncation=True`` upstream to keep it).

Output batches
--------------
``padding="longest"`` / ``"max_length"`` (B examples, T columns)::

    input_ids       (B, T) long   masked ids, pad_token_id in padding
    attention_mask  (B, T) long   1 on the example's tokens, 0 on padding
    labels          (B, T) long   original id at masked positions, -100 elsewhere
    position_ids    (B, T) long   only with left padding: offset + 0..L-1 over the real tokens, so that
                                  absolute-position models see the same positions as with right padding

T is the longest example (``"longest"``) or ``max_length`` (``"max_length"``), rounded up to
``pad_to_multiple_of``. Padding goes on ``padding_side`` (default: ``tokenizer.padding_side``).

``padding="packed"`` (requires ``max_length``): the examples are placed by best-fit-decreasing
bin packing (`pack_rows`) into R rows holding at most ``max_length`` tokens each; R varies from batch
to batch (at most B). T is the longest row rounded up to ``pad_to_multiple_of``::

    input_ids       (R, T) long
    labels          (R, T) long
    position_ids    (R, T) long   offset + 0..L-1 restarting at every example; offset in padding
    attention_mask  sdpa:             (R, 1, T, T) bool, True = query may attend to key; block-diagonal,
                                      and each padding position attends to itself only (an all-False
                                      row would make SDPA return NaN; these outputs carry no labels)
                    eager / flex:     (R, 1, T, T) float32 additive, 0.0 = attend, finfo.min = blocked
                                      (transformers adds a 4-D mask to the scores as-is, so a bool mask
                                      would be read as +0/+1 and block nothing)
                    flash_attention_*: (R, T) long of ONES, plus ``cu_seq_lens_q``/``cu_seq_lens_k``
                                      (int32, boundaries over the R*T flattened positions, each row's
                                      padding tail being its own segment) and ``max_length_q``/
                                      ``max_length_k`` (python ints), the names transformers'
                                      `DataCollatorWithFlattening` uses. The 2-D mask must be all ones:
                                      flash's padding path (any 0 in it) ignores cu_seq_lens and would
                                      let the examples of a row see each other. Untested here (no GPU).

Every mode also emits the metadata keys in `METADATA_KEYS` (0-d long tensors) that the training loop
pops before calling the model -- `model_inputs` does that:

    num_real_tokens    non-padding positions in the batch (sum of example lengths)
    num_masked_tokens  positions with a label (labels != -100)
    num_examples       examples in the batch (== B in padded modes; packed batches have R <= B rows)
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# Keys that describe the batch for the training loop (token-weighted loss, throughput metrics) and
# must not reach the model's forward().
METADATA_KEYS: tuple[str, ...] = ("num_real_tokens", "num_masked_tokens", "num_examples")

# Keys that keep padding unattended and packed examples apart. Dropping them is the padding
# ablation's unmasked arm: padded rows attend to padding, packed rows become one naive
# concatenation whose examples see each other, with the model's default positions 0..T-1.
ISOLATION_KEYS: tuple[str, ...] = (
    "attention_mask",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
)

PADDING_MODES = ("longest", "max_length", "packed")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
_FLASH = ("flash_attention_2", "flash_attention_3")
_ADDITIVE_MASK = ("eager", "flex_attention")

_MASK64 = (1 << 64) - 1


def model_inputs(batch: Mapping[str, Any], mask_padding: bool = True) -> dict[str, Any]:
    """The keyword arguments to pass to the model for ``batch``.

    Drops `METADATA_KEYS`. With ``mask_padding=False`` also drops `ISOLATION_KEYS` -- the attention
    mask, position ids and flash boundaries -- which is the ONE definition of the padding ablation's
    unmasked arm: padded rows attend to their padding (what happens when the LM example hands the
    model no ``attention_mask``) and packed rows become naive concatenations.
    """
    drop = set(METADATA_KEYS)
    if not mask_padding:
        drop.update(ISOLATION_KEYS)
    return {k: v for k, v in batch.items() if k not in drop}


def drop_targets(batch: dict[str, Any]) -> dict[str, Any]:
    """Make ``batch`` a dummy: no labels, no masked tokens; the forward still runs.

    A process that has run out of examples (the short last batch of an epoch, the eval tail) runs
    one of these so that every process makes the same forward calls (ZeRO-3 gathers parameters
    collectively), while it adds nothing to the global token-weighted loss. In place; returns it.
    """
    batch["labels"].fill_(-100)
    batch["num_masked_tokens"].zero_()
    return batch


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


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: rows of example positions, each summing to <= capacity.

    Examples are taken longest first (ties by position, so the layout is deterministic) and each goes
    into the open row with the least remaining space that still fits it, or a new row. Within a row,
    examples are laid out contiguously in the returned order. Loops over examples and rows only.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row capacity {capacity}")
        best = -1
        for r, space in enumerate(free):
            if n <= space and (best < 0 or space < free[best]):
                best = r
        if best < 0:
            rows.append([i])
            free.append(capacity - n)
        else:
            rows[best].append(i)
            free[best] -= n
    return rows


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple:
        return n
    return -(-n // multiple) * multiple


class MaskedLMCollator:
    """Pads or packs examples, builds attention masks from lengths, and applies reproducible MLM masking.

    Args:
        tokenizer: a Hugging Face tokenizer; supplies ``pad_token_id``, ``mask_token_id``,
            ``all_special_ids``, ``len(tokenizer)`` (the ordinary vocabulary) and ``padding_side``.
        mlm: mask tokens for MLM. ``False`` gives labels of all -100 (used by probes).
        mlm_probability: probability that a token (or word, with ``whole_word_mask``) is a target.
        mask_replace_prob: fraction of targets replaced by the mask token.
        random_replace_prob: fraction of targets replaced by a random ordinary token; the remaining
            ``1 - mask_replace_prob - random_replace_prob`` are left unchanged (HF's 80/10/10).
        whole_word_mask: select whole words with probability ``mlm_probability`` (WordPiece ``##``
            continuations follow their word); the mask/random/keep choice is still per token, as in HF.
        padding: ``"longest"``, ``"max_length"`` or ``"packed"`` (see the module docstring).
        max_length: truncation length; the row length for ``"max_length"`` and ``"packed"``.
        pad_to_multiple_of: round the time dimension T up to a multiple of this.
        seed: masking seed; with the epoch (`set_epoch`) and the example index it fixes the masks.
        attn_implementation: the model's attention backend; decides the packed mask's form.
        position_offset: first position id of every example (``padding_idx + 1`` for RoBERTa-family
            models, 0 otherwise); used wherever this collator emits ``position_ids``.
        padding_side: ``"right"`` or ``"left"``; ``None`` takes ``tokenizer.padding_side``.

    Raises:
        ValueError: on any invalid argument, naming it and the fix.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        mlm: bool = True,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        whole_word_mask: bool = False,
        padding: str = "longest",
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
        attn_implementation: str = "sdpa",
        position_offset: int = 0,
        padding_side: str | None = None,
    ) -> None:
        def fail(arg: str, value: Any, fix: str) -> None:
            raise ValueError(f"MaskedLMCollator: invalid {arg}={value!r}; {fix}")

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not isinstance(mlm, bool):
            fail("mlm", mlm, "pass True or False")
        if isinstance(mlm_probability, bool) or not isinstance(mlm_probability, (int, float)) or not (
            0.0 < mlm_probability < 1.0
        ):
            fail("mlm_probability", mlm_probability, "it must be a number in (0, 1), e.g. 0.15")
        for name, p in (("mask_replace_prob", mask_replace_prob), ("random_replace_prob", random_replace_prob)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0):
                fail(name, p, "it must be a number in [0, 1]")
        if mask_replace_prob + random_replace_prob > 1.0 + 1e-9:
            fail(
                "mask_replace_prob + random_replace_prob",
                mask_replace_prob + random_replace_prob,
                "the two fractions of the targets must sum to at most 1 (e.g. 0.8 and 0.1)",
            )
        if padding not in PADDING_MODES:
            fail("padding", padding, f"use one of {PADDING_MODES}")
        if max_length is not None and (not is_int(max_length) or max_length < 1):
            fail("max_length", max_length, "use a positive int or None")
        if padding in ("max_length", "packed") and max_length is None:
            fail("max_length", max_length, f'padding="{padding}" needs max_length (the row length), e.g. 512')
        if pad_to_multiple_of is not None and (not is_int(pad_to_multiple_of) or pad_to_multiple_of < 1):
            fail("pad_to_multiple_of", pad_to_multiple_of, "use a positive int (e.g. 8) or None")
        if not is_int(seed):
            fail("seed", seed, "use an int")
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            fail("attn_implementation", attn_implementation, f"use one of {ATTN_IMPLEMENTATIONS}")
        if not is_int(position_offset) or position_offset < 0:
            fail("position_offset", position_offset, "use 0, or padding_idx + 1 (2) for RoBERTa-family models")
        padding_side = tokenizer.padding_side if padding_side is None else padding_side
        if padding_side not in ("left", "right"):
            fail("padding_side", padding_side, 'use "left" or "right"')
        if tokenizer.pad_token_id is None:
            fail("tokenizer.pad_token_id", None, "give the tokenizer a pad token (e.g. tokenizer.pad_token = ...)")
        if mlm and tokenizer.mask_token_id is None:
            fail("tokenizer.mask_token_id", None, "MLM needs a tokenizer with a mask token, or pass mlm=False")

        self.tokenizer = tokenizer
        self.mlm = mlm
        self.mlm_probability = float(mlm_probability)
        self.mask_replace_prob = float(mask_replace_prob)
        self.random_replace_prob = float(random_replace_prob)
        self.whole_word_mask = bool(whole_word_mask)
        self.padding = padding
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.attn_implementation = attn_implementation
        self.position_offset = position_offset
        self.padding_side = padding_side
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.mask_token_id = tokenizer.mask_token_id
        self.epoch = 0

        # Lookup tables over the vocabulary, built once so that per-batch work is pure indexing.
        vocab_size = len(tokenizer)
        special_ids = sorted({int(i) for i in tokenizer.all_special_ids})
        table_size = max([vocab_size, *(i + 1 for i in special_ids)])
        self._is_special = torch.zeros(table_size, dtype=torch.bool)  # (V,)
        self._is_special[special_ids] = True
        # Random replacements come from ordinary ids only: ids < len(tokenizer) that are not special.
        self._replacement_ids = torch.nonzero(~self._is_special[:vocab_size]).flatten()  # (V_ordinary,)
        self._is_continuation: torch.Tensor | None = None
        if self.whole_word_mask:
            tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
            cont = torch.zeros(table_size, dtype=torch.bool)  # (V,)
            cont[:vocab_size] = torch.tensor([isinstance(t, str) and t.startswith("##") for t in tokens])
            if not bool(cont.any()):
                fail(
                    "whole_word_mask",
                    True,
                    "whole-word masking needs a WordPiece tokenizer (one with '##' continuation tokens); "
                    "pass whole_word_mask=False for this tokenizer",
                )
            self._is_continuation = cont
        self._generator: torch.Generator | None = None

    # A torch.Generator is rebuilt lazily, so the collator pickles into DataLoader worker processes.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_generator"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose masks the next batches get (masks are a function of seed, epoch, idx)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"MaskedLMCollator.set_epoch: invalid epoch={epoch!r}; use an int >= 0")
        self.epoch = epoch

    # ------------------------------------------------------------------------------------------------
    # Masking: the single place it happens, for every padding mode.
    # ------------------------------------------------------------------------------------------------
    def mask_example(
        self, input_ids: torch.Tensor, special_mask: torch.Tensor | None, idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask one unpadded example; returns ``(masked_ids, labels)``, both ``(L,)`` long.

        Same code path as batches (`_mask_flat` with one example), so a batch's examples get
        exactly what this returns for each of them.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long)  # (L,)
        special = self._is_special[ids]  # (L,)
        if special_mask is not None:
            special = special | torch.as_tensor(special_mask).to(torch.bool)
        return self._mask_flat(ids, special, [ids.numel()], [idx])

    def _mask_flat(
        self, ids: torch.Tensor, special: torch.Tensor, lengths: list[int], idxs: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask examples given concatenated: ids/special (N,), N = sum(lengths); returns (masked, labels) (N,).

        Only the random draws loop over examples: each example seeds the generator with
        `example_seed` (seed, epoch, idx) and draws for its own tokens (and words), so its result
        cannot depend on the other examples, the batch layout or the padding. The selection and
        replacement logic then runs once over the whole batch. No minimum number of targets is
        forced: a short example can get none (the loss is token weighted, so it then adds no terms).
        """
        if not self.mlm:
            return ids.clone(), torch.full_like(ids, -100)
        if self.whole_word_mask:
            assert self._is_continuation is not None
            lens = torch.tensor(lengths, dtype=torch.long)  # (E,)
            first = torch.cumsum(lens, 0) - lens  # (E,) offset of each example's first token
            # A word starts at any non-continuation token, at a special token and right after one
            # (so a stray '##' piece after [CLS] does not join the [CLS] "word"), and every example
            # starts a word (so words never span two examples).
            starts = ~self._is_continuation[ids] | special  # (N,)
            starts[1:] |= special[:-1]
            starts[first] = True
            word_of = torch.cumsum(starts.to(torch.long), 0) - 1  # (N,) global word index per token
            words = torch.zeros(len(lengths), dtype=torch.long).index_add_(
                0, torch.repeat_interleave(torch.arange(len(lengths)), lens), starts.to(torch.long)
            ).tolist()  # words per example
        else:
            words = lengths

        if self._generator is None:
            self._generator = torch.Generator()
        gen = self._generator
        select_u, action_u, picks = [], [], []
        for n, w, idx in zip(lengths, words, idxs):
            gen.manual_seed(example_seed(self.seed, self.epoch, idx))
            u = torch.rand(w + n, generator=gen)  # (W + L,): one draw per unit (token or word), then per token
            select_u.append(u[:w])
            action_u.append(u[w:])
            picks.append(torch.randint(len(self._replacement_ids), (n,), generator=gen))  # (L,)
        select_u_t = torch.cat(select_u)  # (W_total,) or (N,)
        action = torch.cat(action_u)  # (N,)
        pick = torch.cat(picks)  # (N,)

        if self.whole_word_mask:
            select_u_t = select_u_t[word_of]  # (N,) every token takes its word's draw
        selected = (select_u_t < self.mlm_probability) & ~special  # (N,)
        # One uniform per token splits the targets three ways: [0, m) -> mask token,
        # [m, m + r) -> random ordinary token, the rest unchanged (HF's 80/10/10 semantics).
        to_mask = selected & (action < self.mask_replace_prob)
        to_random = selected & ~to_mask & (action < self.mask_replace_prob + self.random_replace_prob)

        labels = torch.where(selected, ids, -100)  # (N,)
        masked = torch.where(to_mask, self.mask_token_id, ids)
        masked = torch.where(to_random, self._replacement_ids[pick], masked)  # (N,)
        return masked, labels

    # ------------------------------------------------------------------------------------------------
    # Input normalisation
    # ------------------------------------------------------------------------------------------------
    def _parse(self, examples: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        """Concatenate the examples: ids (N,), special (N,) bool, lengths [E], idxs [E]."""
        if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Sequence) or not examples:
            raise ValueError(
                "MaskedLMCollator: expected a non-empty list of examples (lists of ids, 1-D tensors or dicts "
                f"with 'input_ids'), got {type(examples).__name__}"
            )
        limit = self.max_length
        chunks: list[Any] = []  # python lists or 1-D tensors, one per example, already trimmed/truncated
        given_special: list[tuple[int, torch.Tensor]] = []  # (example position, mask) where a dict gave one
        lengths: list[int] = []
        idxs: list[int] = []
        all_lists = True
        for pos, ex in enumerate(examples):
            idx = pos  # documented default: the position in the list
            special = None
            if isinstance(ex, Mapping):
                if "input_ids" not in ex:
                    raise ValueError(f"MaskedLMCollator: example {pos} is a dict without 'input_ids'")
                ids: Any = ex["input_ids"]
                if ex.get("idx") is not None:
                    raw = ex["idx"]
                    idx = int(raw.item()) if isinstance(raw, torch.Tensor) else operator.index(raw)
                if ex.get("special_tokens_mask") is not None:
                    special = torch.as_tensor(ex["special_tokens_mask"]).to(torch.bool)
                if ex.get("attention_mask") is not None:
                    # Positions with attention 0 are padding an upstream tokenizer added: drop them.
                    keep = torch.as_tensor(ex["attention_mask"]).to(torch.bool)
                    ids = torch.as_tensor(ids, dtype=torch.long)
                    if keep.shape != ids.shape:
                        raise ValueError(f"MaskedLMCollator: example {pos}: attention_mask shape != input_ids shape")
                    ids = ids[keep]
                    if special is not None:
                        if special.shape != keep.shape:
                            raise ValueError(
                                f"MaskedLMCollator: example {pos}: special_tokens_mask shape != input_ids shape"
                            )
                        special = special[keep]
            else:
                ids = ex
            if not isinstance(ids, list):
                ids = torch.as_tensor(ids, dtype=torch.long)
                if ids.dim() != 1:
                    raise ValueError(
                        f"MaskedLMCollator: example {pos} must be 1-D token ids, got shape {tuple(ids.shape)}"
                    )
                all_lists = False
            n = len(ids)
            if special is not None and special.shape != (n,):
                raise ValueError(f"MaskedLMCollator: example {pos}: special_tokens_mask shape != input_ids shape")
            if n == 0:
                raise ValueError(f"MaskedLMCollator: example {pos} (idx {idx}) has no tokens; filter empty examples out")
            if limit is not None and n > limit:
                ids, n = ids[:limit], limit
                special = special[:limit] if special is not None else None
            if special is not None:
                given_special.append((pos, special))
            chunks.append(ids)
            lengths.append(n)
            idxs.append(idx)

        if all_lists:  # the common case (plain lists of ids): one tensor construction for the batch
            flat = torch.tensor([t for chunk in chunks for t in chunk], dtype=torch.long)  # (N,)
        else:
            flat = torch.cat([torch.as_tensor(c, dtype=torch.long) for c in chunks])  # (N,)
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= len(self._is_special):
            raise ValueError(
                f"MaskedLMCollator: token ids must lie in [0, {len(self._is_special)}) for this tokenizer, "
                f"got range [{lo}, {hi}]; was the data tokenized with a different tokenizer?"
            )
        special_flat = self._is_special[flat]  # (N,) one table lookup for the batch
        if given_special:
            offsets = [0]
            for n in lengths:
                offsets.append(offsets[-1] + n)
            for pos, mask in given_special:  # OR: a special id stays special even if the given mask says not
                special_flat[offsets[pos] : offsets[pos + 1]] |= mask
        return flat, special_flat, lengths, idxs

    # ------------------------------------------------------------------------------------------------
    # Collation
    # ------------------------------------------------------------------------------------------------
    def __call__(self, examples: Sequence[Any], rows: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
        """Collate ``examples``. In packed mode ``rows`` (lists of positions into ``examples``) may give
        the row layout, e.g. one planned by the sampler over a larger buffer; by default the batch
        is packed on its own with `pack_rows`."""
        if rows is not None and self.padding != "packed":
            raise ValueError('MaskedLMCollator: rows= is only meaningful with padding="packed"')
        ids, special, lengths, idxs = self._parse(examples)  # (N,), (N,)
        masked, labels = self._mask_flat(ids, special, lengths, idxs)  # (N,), (N,)
        lens = torch.tensor(lengths, dtype=torch.long)  # (E,)
        example_of = torch.repeat_interleave(torch.arange(len(lengths)), lens)  # (N,) example of each token
        within = torch.arange(ids.numel()) - (torch.cumsum(lens, 0) - lens)[example_of]  # (N,) 0..L-1 per example
        if self.padding == "packed":
            batch = self._packed(masked, labels, lengths, example_of, within, rows)
        else:
            batch = self._padded(masked, labels, lengths, example_of, within)
        batch["num_real_tokens"] = torch.tensor(ids.numel(), dtype=torch.long)
        batch["num_masked_tokens"] = (labels != -100).sum()
        batch["num_examples"] = torch.tensor(len(lengths), dtype=torch.long)
        return batch

    def _padded(
        self,
        masked: torch.Tensor,
        labels: torch.Tensor,
        lengths: list[int],
        example_of: torch.Tensor,
        within: torch.Tensor,
    ) -> dict[str, Any]:
        n_rows = len(lengths)
        width = self.max_length if self.padding == "max_length" else max(lengths)
        width = _round_up(width, self.pad_to_multiple_of)
        left = self.padding_side == "left"
        lens = torch.tensor(lengths, dtype=torch.long)  # (B,)
        start = (width - lens) if left else torch.zeros_like(lens)  # (B,) first column of each example
        col = start[example_of] + within  # (N,) column of every token
        # One allocation per tensor, then one scatter of all tokens.
        input_ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)  # (B, T)
        label_t = torch.full((n_rows, width), -100, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((n_rows, width), dtype=torch.long)  # (B, T)
        input_ids[example_of, col] = masked
        label_t[example_of, col] = labels
        attention_mask[example_of, col] = 1  # from the lengths, never from ids == pad id
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_t}
        if left:
            # Absolute-position models would otherwise number the real tokens from the pad count.
            pos = (torch.arange(width)[None, :] - start[:, None]).clamp_(min=0)  # (B, T)
            batch["position_ids"] = pos + self.position_offset
        return batch

    def _packed(
        self,
        masked: torch.Tensor,
        labels: torch.Tensor,
        lengths: list[int],
        example_of: torch.Tensor,
        within: torch.Tensor,
        rows: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, Any]:
        assert self.max_length is not None
        if rows is None:
            rows = pack_rows(lengths, self.max_length)
        elif sorted(i for row in rows for i in row) != list(range(len(lengths))) or any(
            sum(lengths[i] for i in row) > self.max_length for row in rows
        ):
            raise ValueError("MaskedLMCollator: rows must place every example exactly once, "
                             f"each row holding at most max_length={self.max_length} tokens")
        n_rows = len(rows)
        row_of = [0] * len(lengths)  # row of each example
        start_of = [0] * len(lengths)  # first column of each example in its row
        used = []  # tokens in each row
        for r, row in enumerate(rows):
            col = 0
            for i in row:
                row_of[i], start_of[i] = r, col
                col += lengths[i]
            used.append(col)
        width = _round_up(max(used), self.pad_to_multiple_of)
        tok_row = torch.tensor(row_of)[example_of]  # (N,)
        tok_col = torch.tensor(start_of)[example_of] + within  # (N,)

        input_ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)  # (R, T)
        label_t = torch.full((n_rows, width), -100, dtype=torch.long)  # (R, T)
        position_ids = torch.full((n_rows, width), self.position_offset, dtype=torch.long)  # (R, T)
        input_ids[tok_row, tok_col] = masked
        label_t[tok_row, tok_col] = labels
        position_ids[tok_row, tok_col] = within + self.position_offset  # restarts at every example
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": label_t, "position_ids": position_ids}

        if self.attn_implementation in _FLASH:
            # Flash varlen reads boundaries from cu_seq_lens over the R*T flattened positions; the 2-D
            # mask must be all ones or transformers takes its unpadding path and ignores them. Each
            # row's padding tail is one more segment (attending only to itself; no labels).
            bounds = {0, n_rows * width}
            for i, n in enumerate(lengths):
                bounds.add(row_of[i] * width + start_of[i] + n)
            for r in range(n_rows):
                bounds.add(r * width)
            cu_list = sorted(bounds)
            cu = torch.tensor(cu_list, dtype=torch.int32)  # (S + 1,)
            batch["attention_mask"] = torch.ones((n_rows, width), dtype=torch.long)  # (R, T)
            batch["cu_seq_lens_q"] = cu
            batch["cu_seq_lens_k"] = cu.clone()
            batch["max_length_q"] = batch["max_length_k"] = max(b - a for a, b in zip(cu_list[:-1], cu_list[1:]))
            return batch

        # Segment id of every position: the example for real tokens, and a distinct negative number
        # for every padding position, so that a padding query "matches" only itself (an all-False
        # row would make SDPA return NaN; these outputs carry no labels).
        segment = (-1 - torch.arange(width)).repeat(n_rows, 1)  # (R, T)
        segment[tok_row, tok_col] = example_of
        allowed = segment[:, :, None] == segment[:, None, :]  # (R, T, T) block-diagonal + padding diagonal
        allowed = allowed[:, None]  # (R, 1, T, T): one mask shared by all heads
        if self.attn_implementation in _ADDITIVE_MASK:
            additive = torch.zeros(allowed.shape, dtype=torch.float32)  # (R, 1, T, T)
            additive.masked_fill_(~allowed, torch.finfo(torch.float32).min)
            batch["attention_mask"] = additive
        else:
            batch["attention_mask"] = allowed
        return batch


__all__ = [
    "ISOLATION_KEYS",
    "METADATA_KEYS",
    "MaskedLMCollator",
    "drop_targets",
    "example_seed",
    "model_inputs",
    "pack_rows",
]
