"""`MaskedLMCollator`: examples in, a batch a Hugging Face masked-LM model can consume out.

It orchestrates three steps, each owned by one module (see docs/design.md):

1. `examples.ExampleParser`: input normalisation -- lists of ids, 1-D tensors or arrays, or dicts
   (rows of a `datasets.Dataset`) with ``input_ids`` and optionally ``attention_mask`` (zeros at
   an example's ends are upstream padding, dropped; a zero between its tokens is the user's own
   mask, kept in padded rows), ``special_tokens_mask``, ``idx`` (the example's index in its
   dataset, which keys the reproducible masking) and any other key, passed through (per-token
   keys such as ``token_type_ids`` laid out like the ids, per-example keys stacked) unless
   ``drop_keys`` drops it. Examples longer than ``max_length`` are truncated.
2. `masking.Masker.mask`: targets and replacements (pads and specials never targets). An example
   with ``idx`` gets the masks of (seed, epoch, idx) wherever and however often it is collated
   (what pairs the ablation's arms); one without gets new masks at every call, reproducible from
   the seed (`masking.unkeyed_seed`: the epoch, the DataLoader worker, this collator's call
   count in that process and the example's position in the batch).
3. `layout.Layout`: padding or packing, position ids and the attention mask.

Output batches
--------------
``padding="longest"`` / ``"max_length"`` (B examples, T columns)::

    input_ids       (B, T) long   masked ids, pad_token_id in padding
    attention_mask  (B, T) long   1 on the example's tokens, 0 on padding
    labels          (B, T) long   original id at masked positions, -100 elsewhere
    position_ids    (B, T) long   only with left padding: offset + 0..L-1 over the real tokens
    <per-token key> (B, T)        e.g. token_type_ids: laid out like the ids, 0 in padding (-100
                                  for a key ending in "labels")
    <per-example>   (B, ...)      e.g. a label column: stacked (a list where values don't stack)

A zero inside an example's own ``attention_mask`` stays 0 in its row: a custom mask.
T is the longest example (``"longest"``) or ``max_length``, rounded up to ``pad_to_multiple_of``.

``padding="packed"`` (needs ``max_length``): R <= B rows of at most ``max_length`` tokens,
T the longest row rounded up to ``pad_to_multiple_of``::

    input_ids, labels  (R, T) long
    position_ids       (R, T) long   offset + 0..L-1 restarting at every example
    <per-token key>    (R, T)        laid out like the ids (per-example keys and custom masks are
                                     refused: a row holds several examples)
    attention_mask     sdpa:          (R, 1, T, T) bool, block-diagonal (True = may attend)
                       eager / flex:  (R, 1, T, T) float32 additive (0 = attend, finfo.min = not)
                       flash_attention_*, mlmkit_packed (attention.py):
                                      (R, T) ones, with cu_seq_lens_q/k (int32) and
                                      max_length_q/k (ints): the boundaries of the examples
                                      and padding tails (`rows.PackedRows`)

With ``return_counts=True`` (the recipe's collators, `MaskedLMCollator.from_config`) every batch
also carries the `METADATA_KEYS` (0-d long tensors) that `model_inputs` drops:
``num_real_tokens`` (sum of example lengths), ``num_masked_tokens`` (labels != -100) and
``num_examples``. By default they are left out, so that a batch goes to a model's forward as it
is (the Trainer passes every key of the batch).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from mlmkit.batch.examples import ExampleParser, Examples, stack_per_example
from mlmkit.batch.layout import Layout
from mlmkit.batch.masking import Masker, VocabularyTables
from mlmkit.config.choices import ATTN_IMPLEMENTATIONS, PACKED_ATTENTION, PADDING_MODES

# Keys that describe the batch for the training loop and must not reach the model's forward().
METADATA_KEYS: tuple[str, ...] = ("num_real_tokens", "num_masked_tokens", "num_examples")
# Keys that keep padding unattended and packed examples apart; dropping them is the ablation's
# unmasked arm (padded rows attend to padding, packed rows become naive concatenations).
ISOLATION_KEYS: tuple[str, ...] = ("attention_mask", "position_ids", "cu_seq_lens_q",
                                   "cu_seq_lens_k", "max_length_q", "max_length_k")


def model_inputs(batch: Mapping[str, Any], mask_padding: bool = True) -> dict[str, Any]:
    """The keyword arguments for the model: ``batch`` without `METADATA_KEYS`, and with
    ``mask_padding=False`` also without `ISOLATION_KEYS` -- the ONE definition of the padding
    ablation's unmasked arm (what happens when the LM example hands the model no mask)."""
    drop = set(METADATA_KEYS) if mask_padding else {*METADATA_KEYS, *ISOLATION_KEYS}
    return {k: v for k, v in batch.items() if k not in drop}


def drop_targets(batch: dict[str, Any]) -> dict[str, Any]:
    """Make ``batch`` a dummy (no labels, no masked tokens; the forward still runs), in place.

    A process that has run out of examples runs one, so that every process makes the same
    forward calls (ZeRO-3 gathers parameters collectively) while adding nothing to the loss, and
    nothing to the counts (`METADATA_KEYS`: no real tokens, masked tokens or examples).
    """
    batch["labels"].fill_(-100)
    for key in METADATA_KEYS:  # present in a batch collated with return_counts=True
        if key in batch:
            batch[key].zero_()
    return batch


def _fail(arg: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"MaskedLMCollator: invalid {arg}={value!r}; {fix}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_prob(p: Any, lo_open: bool = False, hi_open: bool = False) -> bool:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        return False
    return (0.0 < p if lo_open else 0.0 <= p) and (p < 1.0 if hi_open else p <= 1.0)


RETURN_TENSORS = ("pt", "np")


def _check_return_tensors(value: Any) -> None:
    if value not in RETURN_TENSORS:
        raise _fail("return_tensors", value, 'use "pt" (PyTorch tensors) or "np" (NumPy arrays)')


def validate_options(tokenizer: Any, o: dict[str, Any]) -> None:
    """Every check of the collator's arguments, in one place; ValueError naming the fix."""
    if not isinstance(o["mlm"], bool):
        raise _fail("mlm", o["mlm"], "pass True or False")
    if not _is_prob(o["mlm_probability"]):
        raise _fail("mlm_probability", o["mlm_probability"], "it must be a number in [0, 1], e.g. 0.15")
    for name in ("mask_replace_prob", "random_replace_prob"):
        if not _is_prob(o[name]):
            raise _fail(name, o[name], "it must be a number in [0, 1]")
    total = o["mask_replace_prob"] + o["random_replace_prob"]
    if total > 1.0 + 1e-9:
        raise _fail("mask_replace_prob + random_replace_prob", total,
                    "the two fractions of the targets must sum to at most 1 (e.g. 0.8 and 0.1)")
    if o["padding"] not in PADDING_MODES:
        raise _fail("padding", o["padding"], f"use one of {PADDING_MODES}")
    max_length = o["max_length"]
    if max_length is not None and (not _is_int(max_length) or max_length < 1):
        raise _fail("max_length", max_length, "use a positive int or None")
    if o["padding"] in ("max_length", "packed") and max_length is None:
        raise _fail("max_length", max_length,
                    f'padding="{o["padding"]}" needs max_length (the row length), e.g. 512')
    multiple = o["pad_to_multiple_of"]
    if multiple is not None and (not _is_int(multiple) or multiple < 1):
        raise _fail("pad_to_multiple_of", multiple, "use a positive int (e.g. 8) or None")
    if o["seed"] is not None and not _is_int(o["seed"]):
        raise _fail("seed", o["seed"], "use an int (keyed, reproducible masks; the default is 0) "
                    "or None (torch's global generator, as transformers)")
    _check_return_tensors(o["return_tensors"])
    for name in ("return_counts", "whole_word_mask", "span_masking"):
        if not isinstance(o[name], bool):
            raise _fail(name, o[name], "pass True or False")
    drop = o["drop_keys"]
    if not isinstance(drop, bool) and (isinstance(drop, (str, bytes)) or not isinstance(
            drop, Collection) or not all(isinstance(k, str) for k in drop)):
        raise _fail("drop_keys", drop, 'pass True (every extra key), False, or key names, '
                    'e.g. ["label"]')
    if o["attn_implementation"] not in (*ATTN_IMPLEMENTATIONS, PACKED_ATTENTION):
        raise _fail("attn_implementation", o["attn_implementation"],
                    f"use one of {(*ATTN_IMPLEMENTATIONS, PACKED_ATTENTION)}")
    if not _is_int(o["position_offset"]) or o["position_offset"] < 0:
        raise _fail("position_offset", o["position_offset"],
                    "use 0, or padding_idx + 1 (2) for RoBERTa-family models")
    if o["padding_side"] not in ("left", "right"):
        raise _fail("padding_side", o["padding_side"], 'use "left" or "right"')
    if tokenizer.pad_token_id is None:
        raise _fail("tokenizer.pad_token_id", None,
                    "give the tokenizer a pad token (e.g. tokenizer.pad_token = ...)")
    if o["mlm"] and tokenizer.mask_token_id is None:
        raise _fail("tokenizer.mask_token_id", None,
                    "MLM needs a tokenizer with a mask token, or pass mlm=False")


class MaskedLMCollator:
    """Pads or packs examples, builds attention masks from lengths, applies reproducible masking.

    A drop-in for transformers' ``DataCollatorForLanguageModeling`` in a ``Trainer`` or a
    ``DataLoader``: its arguments, in its order, may be given by position (``tokenizer, mlm,
    whole_word_mask, mlm_probability, mask_replace_prob, random_replace_prob,
    pad_to_multiple_of, return_tensors, seed``); mlmkit's own are keyword-only. docs/collator.md,
    "What differs from DataCollatorForLanguageModeling", lists every difference.

    Args:
        tokenizer: a Hugging Face tokenizer (pad and mask ids, special ids, vocabulary size,
            padding side).
        mlm: mask tokens for MLM; ``False`` gives labels of all -100 (used by probes; no causal
            labels as in Hugging Face's collator).
        mlm_probability: probability that a token (or word, with ``whole_word_mask``) is a target,
            in [0, 1]: 0 gives no targets, 1 makes every real, non-special token one.
        mask_replace_prob / random_replace_prob: fractions of the targets replaced by the mask
            token / a random ordinary token; the rest are left unchanged (HF's 80/10/10).
        whole_word_mask: select whole words (all pieces of a word together; words from the
            tokenizer's WordPiece ``##``, byte-level ``Ġ`` or SentencePiece ``▁`` marks, see
            `masking.word_start_scheme`).
        span_masking: select contiguous spans of whole words (SpanBERT): span lengths in words
            geometric (p = 0.2, at most 10), spans drawn until ``mlm_probability`` of the
            example's tokens are targets; the 80/10/10 replacement and the keyed masks as usual.
        padding: ``"longest"``, ``"max_length"`` or ``"packed"`` (see the module docstring).
        max_length: truncation length; the row length for ``"max_length"`` and ``"packed"``.
        pad_to_multiple_of: round the time dimension T up to a multiple of this.
        drop_keys: keys of dict examples not to pass through: True for every key the collator
            does not read itself but ``token_type_ids`` (a model input), or a collection of
            names. By default they pass through
            (`examples` module docstring: per-token keys laid out like the ids, per-example keys
            stacked), as transformers' collator passes them.
        seed: masking seed (default 0: reproducible); with the epoch (`set_epoch`) and the
            example's ``idx`` it fixes the masks; examples without ``idx`` get new masks at every
            call, reproducible from it (module doc, step 2). ``None``: masks from torch's global
            generator, as transformers draws them (``torch.manual_seed``, a ``Trainer``'s seed),
            so they follow the batch order instead of the example.
        return_tensors: ``"pt"`` (PyTorch tensors) or ``"np"`` (NumPy arrays); a call may ask
            for the other (``collator(features, "np")``, Hugging Face's signature).
        return_counts: add the `METADATA_KEYS` counts to every batch (the recipe's training loop
            reads them; a model's forward does not take them).
        attn_implementation: the model's attention backend; decides the packed mask's form.
        position_offset: first position id of every example (``padding_idx + 1`` for
            RoBERTa-family models, 0 otherwise).
        padding_side: ``"right"`` or ``"left"``; ``None`` takes ``tokenizer.padding_side``.

    Raises:
        ValueError: on any invalid argument, naming it and the fix (`validate_options`).
    """

    def __init__(self, tokenizer: Any, mlm: bool = True, whole_word_mask: bool = False,
                 mlm_probability: float = 0.15, mask_replace_prob: float = 0.8,
                 random_replace_prob: float = 0.1, pad_to_multiple_of: int | None = None,
                 return_tensors: str = "pt", seed: int | None = 0, *,
                 span_masking: bool = False, padding: str = "longest",
                 max_length: int | None = None, drop_keys: bool | Collection[str] = False,
                 return_counts: bool = False, attn_implementation: str = "sdpa",
                 position_offset: int = 0, padding_side: str | None = None) -> None:
        padding_side = tokenizer.padding_side if padding_side is None else padding_side
        options = dict(locals())
        del options["self"], options["tokenizer"]
        validate_options(tokenizer, options)
        self.tokenizer = tokenizer
        self.mlm = mlm
        self.return_tensors = return_tensors
        self.return_counts = return_counts
        self.epoch = 0
        self.calls = 0  # this process's calls: keys the masks of examples without idx
        # Raises ValueError for whole-word or span masking with a tokenizer that marks no words.
        self.tables = VocabularyTables(tokenizer, whole_word=whole_word_mask or span_masking)
        self.masker = Masker(self.tables, mask_token_id=tokenizer.mask_token_id,
                             mlm_probability=mlm_probability, mask_replace_prob=mask_replace_prob,
                             random_replace_prob=random_replace_prob,
                             whole_word_mask=whole_word_mask, span_masking=span_masking,
                             seed=seed)
        self.parse = ExampleParser(self.tables, max_length, drop_keys)
        self.layout = Layout(padding=padding, max_length=max_length,
                             pad_to_multiple_of=pad_to_multiple_of,
                             pad_token_id=int(tokenizer.pad_token_id),
                             position_offset=position_offset, padding_side=padding_side,
                             attn_implementation=attn_implementation)

    @classmethod
    def from_config(cls, tokenizer: Any, cfg: Any, *, position_offset: int,
                    attn_implementation: str | None = None, **overrides: Any) -> "MaskedLMCollator":
        """The collator a run's config (`config.MLMConfig`) asks for, laid out for the attention
        implementation the model actually runs, with the counts the training loop and the eval
        read (``return_counts``); ``overrides`` win (the padding ``auto`` resolved to; eval pads
        dynamically with its own fixed seed). The recipe's examples carry bookkeeping keys
        (``source``), so every extra key is dropped."""
        options = dict(
            mlm_probability=cfg.mlm_probability, mask_replace_prob=cfg.mask_replace_prob,
            random_replace_prob=cfg.random_replace_prob, whole_word_mask=cfg.whole_word_mask,
            span_masking=cfg.span_masking, drop_keys=True, padding=cfg.padding,
            max_length=cfg.max_seq_length,
            pad_to_multiple_of=cfg.pad_to_multiple_of, seed=cfg.seed,
            attn_implementation=attn_implementation or cfg.attn_implementation or "sdpa",
            position_offset=position_offset, return_counts=True)
        return cls(tokenizer, **{**options, **overrides})

    # The options, readable where they are kept.
    padding = property(lambda self: self.layout.padding)
    max_length = property(lambda self: self.layout.max_length)
    pad_to_multiple_of = property(lambda self: self.layout.pad_to_multiple_of)
    padding_side = property(lambda self: self.layout.padding_side)
    seed = property(lambda self: self.masker.seed)
    mask_replace_prob = property(lambda self: self.masker.mask_replace_prob)
    random_replace_prob = property(lambda self: self.masker.random_replace_prob)
    whole_word_mask = property(lambda self: self.masker.whole_word_mask)
    span_masking = property(lambda self: self.masker.span_masking)
    # Settable, as on transformers' collator (a callback moving the rate): `set_mlm_probability`.
    mlm_probability = property(lambda self: self.masker.mlm_probability,
                               lambda self, p: self.set_mlm_probability(p))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose masks the next batches get (masks: f(seed, epoch, idx))."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"MaskedLMCollator.set_epoch: invalid epoch={epoch!r}; use an int >= 0")
        self.epoch = epoch

    def set_mlm_probability(self, mlm_probability: float) -> None:
        """Select the masking rate of the next batches (a schedule's rate of the step they are
        for): the masks' draws stay keyed by (seed, epoch, idx), only the threshold moves."""
        if not _is_prob(mlm_probability):
            raise _fail("mlm_probability", mlm_probability, "it must be a number in [0, 1], "
                        "e.g. 0.15")
        self.masker.mlm_probability = float(mlm_probability)

    def _mask(self, ids, special, lengths, idxs,
              stream: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.mlm:
            return ids.clone(), torch.full_like(ids, -100)
        return self.masker.mask(ids, special, lengths, idxs, self.epoch, stream)

    def mask_example(self, input_ids, special_mask: torch.Tensor | None,
                     idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask one unpadded example: ``(masked_ids, labels)``, both (L,), exactly what the
        example gets inside any batch."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)  # (L,)
        special = self.tables.is_special[ids]  # (L,)
        if special_mask is not None:
            special = special | torch.as_tensor(special_mask).to(torch.bool)
        return self._mask(ids, special, [ids.numel()], [idx])

    def __call__(self, examples: Sequence[Any], return_tensors: str | None = None, *,
                 rows: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
        """Collate ``examples`` into ``return_tensors`` (None: the collator's; Hugging Face's
        signature). In packed mode ``rows`` (lists of positions into ``examples``) may give the
        row layout, e.g. one planned over a larger window (`plans.TrainPlan`); by default the
        batch is packed on its own with `layout.pack_rows`."""
        if return_tensors is not None:
            _check_return_tensors(return_tensors)
        if rows is not None and self.padding != "packed":
            raise ValueError('MaskedLMCollator: rows= is only meaningful with padding="packed"')
        ex = self.parse(examples)
        if self.padding == "packed" and ex.per_example:
            key = next(iter(ex.per_example))
            raise ValueError(f"MaskedLMCollator: a packed row holds several examples, so the "
                             f"per-example key {key!r} has no place in it; drop it "
                             f'(drop_keys=[{key!r}]) or use padding="longest"')
        if self.padding == "packed" and ex.hidden is not None:
            raise ValueError("MaskedLMCollator: an example's attention_mask has a 0 between its "
                             "tokens (a custom mask), and packed rows build their own masks; "
                             'use padding="longest" or "max_length" to keep it')
        stream = (collating_worker(), self.calls)  # keys the examples without idx
        self.calls += 1
        if self._overrides_masking():
            batch = self._laid_out_then_masked(ex, rows)
        else:
            masked, labels = self._mask(ex.ids, ex.special, ex.lengths, ex.idxs, stream)  # (N,)
            batch = self.layout(masked, labels, ex.lengths, rows, ex.per_token, ex.hidden)
        for key, values in ex.per_example.items():
            batch[key] = stack_per_example(values)
        labels = batch["labels"]
        if self.return_counts:
            batch["num_real_tokens"] = torch.tensor(ex.ids.numel(), dtype=torch.long)
            batch["num_masked_tokens"] = (labels != -100).sum()
            batch["num_examples"] = torch.tensor(len(ex.lengths), dtype=torch.long)
        if (return_tensors or self.return_tensors) == "np":
            return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def torch_mask_tokens(self, inputs: torch.Tensor, special_tokens_mask: Any = None,
                          offset_mapping: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' override point, with its meaning: ``(masked inputs, labels)`` of a batch
        of ids (any shape; ``special_tokens_mask`` True where no target may be, padding
        included). A subclass that overrides it (e.g. every target the mask token) gets it
        called on each laid-out batch, as transformers does. This default treats ``inputs`` as
        one example of the unkeyed stream; the collator's own batches are masked per example,
        keyed by (seed, epoch, idx), before they are laid out (`masking.Masker`)."""
        if special_tokens_mask is None:
            special = self.tables.is_special[inputs] | (inputs == self.tokenizer.pad_token_id)
        else:
            special = torch.as_tensor(special_tokens_mask).to(torch.bool)
        flat = inputs.reshape(-1)
        masked, labels = self._mask(flat, special.reshape(-1), [flat.numel()], [None],
                                    (collating_worker(), self.calls))
        return masked.reshape(inputs.shape), labels.reshape(inputs.shape)

    def _overrides_masking(self) -> bool:
        return type(self).torch_mask_tokens is not MaskedLMCollator.torch_mask_tokens

    def _laid_out_then_masked(self, ex: Examples, rows) -> dict[str, Any]:
        """A subclass's `torch_mask_tokens` on the laid-out batch: specials, hidden tokens and
        padding (every position the layout gives no label) are what it must not pick."""
        candidates = torch.where(ex.special, -100, ex.ids)  # (N,): the possible targets
        batch = self.layout(ex.ids, candidates, ex.lengths, rows, ex.per_token, ex.hidden)
        blocked = batch["labels"] == -100  # specials and padding, in the batch's layout
        if not self.mlm:
            batch["labels"] = torch.full_like(batch["input_ids"], -100)
            return batch
        batch["input_ids"], batch["labels"] = self.torch_mask_tokens(
            batch["input_ids"], special_tokens_mask=blocked)
        return batch


def collating_worker() -> int:
    """Who collates, for `masking.unkeyed_seed`: 0 in the main process, 1 + the worker's seed in
    a DataLoader worker. The DataLoader gives worker ``i`` the seed ``base + i``, ``base`` drawn
    for every new set of workers (each epoch, unless ``persistent_workers``) from its
    ``generator`` or the main process's torch RNG: each worker draws its own masks, new ones each
    epoch, and a seeded run draws the same ones again."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else 1 + int(info.seed)
