"""The collator's input normalisation: whatever examples a user or the recipe hands in, as one
`Examples` (the batch's tokens concatenated, with each example's length).

Examples are lists of ids, 1-D tensors or arrays, or dicts (rows of a `datasets.Dataset`, as
lists, tensors or numpy arrays) with ``input_ids`` and optionally:

* ``attention_mask``: zeros at the start or the end of an example are padding an upstream
  tokenizer added, and are dropped (the collator pads again, from lengths). A zero *between* an
  example's tokens is the user's own mask: the token stays in the row, hidden (its attention-mask
  column stays 0 in padded rows) and never a target. Packed rows build their own masks, so there
  it is refused.
* ``special_tokens_mask``: OR-ed with the tokenizer's special ids (never targets).
* ``idx``: the example's index in its dataset, which keys the reproducible masking.
* ``labels``, ``offset_mapping``: consumed, as transformers' collator does (the MLM labels
  replace input labels; words come from the vocabulary, not offsets).
* any other key passes through to the batch, as transformers' ``tokenizer.pad`` lets it:
  a **per-token** key (in every example a 1-D value as long as its ``input_ids``, e.g.
  ``token_type_ids``) is truncated and laid out like the ids, padded with `pad_value` (0, or
  -100 for keys ending in ``labels``); a **per-example** key (anything else: an int label, a
  float score, a fixed-size vector) is stacked into a tensor of B rows (kept as a list when it
  can't be, e.g. strings). ``drop_keys`` (the collator's option) drops them instead: True drops
  all but ``token_type_ids``, a collection of names drops those.

Examples longer than ``max_length`` are truncated to their first ``max_length`` tokens.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mlmkit.batch.masking import VocabularyTables

# Keys a tokenizer writes per token: a length that differs from the ids' is an error.
PER_TOKEN_KEYS = frozenset({"token_type_ids"})
# Keys the collator reads itself; the output's own keys are not taken from the input.
CONSUMED_KEYS = frozenset({"input_ids", "attention_mask", "special_tokens_mask", "idx", "labels",
                           "offset_mapping"})


def pad_value(key: str) -> int:
    """What a per-token key holds in padding: -100 for label columns (ignored by the loss), 0
    otherwise (token type 0, as the tokenizer pads them)."""
    return -100 if key.endswith("labels") else 0


@dataclass
class Examples:
    """A batch's examples, concatenated: ``ids`` (N,) long, ``special`` (N,) bool (never
    targets: the tokenizer's specials, a given ``special_tokens_mask``, hidden tokens),
    ``lengths`` [E], ``idxs`` [E] (None without ``idx``), ``per_token`` (name -> (N,) tensor),
    ``per_example`` (name -> E values), ``hidden`` (N,) bool or None: tokens the user's
    attention mask hides inside an example."""
    ids: torch.Tensor
    special: torch.Tensor
    lengths: list[int]
    idxs: list[int | None]
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)
    per_example: dict[str, list] = field(default_factory=dict)
    hidden: torch.Tensor | None = None


def _fail(pos: int, what: str) -> ValueError:
    return ValueError(f"MaskedLMCollator: example {pos} {what}")


def _one_d(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(not isinstance(v, (list, tuple, str, bytes, Mapping)) for v in value)
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 1


def _user_mask(keep: torch.Tensor) -> tuple[slice, torch.Tensor | None]:
    """(the span of the example between its first and last attended token, the hidden tokens
    inside it or None): zeros outside the span are upstream padding, zeros inside a user mask."""
    on = torch.nonzero(keep).flatten()
    if on.numel() == 0:
        return slice(0, 0), None
    span = slice(int(on[0]), int(on[-1]) + 1)
    if on.numel() == span.stop - span.start:
        return span, None
    return span, ~keep[span]


class ExampleParser:
    """Turns a list of examples into `Examples` (module docstring). ``drop_keys``: True drops
    every key that would pass through but the tokenizer's own (``token_type_ids``, a model
    input), a collection drops those named."""

    def __init__(self, tables: VocabularyTables, max_length: int | None,
                 drop_keys: bool | Collection[str] = False):
        self.tables, self.max_length = tables, max_length
        self.drop_all = drop_keys is True
        self.dropped = frozenset(CONSUMED_KEYS | (set() if isinstance(drop_keys, bool)
                                                  else set(drop_keys)))

    def __call__(self, examples: Sequence[Any]) -> Examples:
        if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Sequence) \
                or not examples:
            raise ValueError("MaskedLMCollator: expected a non-empty list of examples (lists of "
                             "ids, 1-D tensors or dicts with 'input_ids'), got "
                             f"{type(examples).__name__}")
        chunks, specials, hiddens, lengths, idxs = [], [], [], [], []
        extras: dict[str, list] = {}
        keys: set[str] | None = None
        for pos, ex in enumerate(examples):
            if isinstance(ex, Mapping):
                ids, special, hidden, idx, extra = self._from_dict(ex, pos)
            else:
                ids, special, hidden, idx, extra = ex, None, None, None, {}
            if not isinstance(ids, list):
                ids = torch.as_tensor(ids, dtype=torch.long)
                if ids.dim() != 1:
                    raise _fail(pos, f"must be 1-D token ids, got shape {tuple(ids.shape)}")
            n = len(ids)
            if n == 0:
                where = f" (idx {idx})" if idx is not None else ""
                raise ValueError(f"MaskedLMCollator: example {pos}{where} has no tokens; filter "
                                 "empty examples out")
            if keys is None:
                keys = set(extra)
            elif set(extra) != keys:
                key = sorted(keys ^ set(extra))[0]
                have = ("has", "has no") if key in keys else ("has no", "has")
                raise ValueError(f"MaskedLMCollator: example 0 {have[0]} {key} and example "
                                 f"{pos} {have[1]}; give every example of a batch them, or none")
            for key, value in extra.items():  # (value, the example's length before the cut)
                extras.setdefault(key, []).append((value, n))
            if self.max_length is not None and n > self.max_length:
                ids, n = ids[:self.max_length], self.max_length
                special = special[:n] if special is not None else None
                hidden = hidden[:n] if hidden is not None else None
            chunks.append(ids)
            specials.append(special)
            hiddens.append(hidden)
            lengths.append(n)
            idxs.append(idx)
        flat = _concat(chunks)  # (N,)
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= len(self.tables):
            raise ValueError(f"MaskedLMCollator: token ids must lie in [0, {len(self.tables)}) "
                             f"for this tokenizer, got range [{lo}, {hi}]; was the data "
                             "tokenized with a different tokenizer?")
        special_flat = self.tables.is_special[flat]  # (N,) one table lookup for the batch
        hidden_flat = None
        if any(s is not None for s in specials) or any(h is not None for h in hiddens):
            given = torch.cat([(s if s is not None else torch.zeros(n, dtype=torch.bool))
                               for s, n in zip(specials, lengths)])  # (N,)
            hidden_flat = torch.cat([(h if h is not None else torch.zeros(n, dtype=torch.bool))
                                     for h, n in zip(hiddens, lengths)])  # (N,)
            special_flat |= given | hidden_flat  # a special id stays special whatever is given
            hidden_flat = hidden_flat if bool(hidden_flat.any()) else None
        out = Examples(flat, special_flat, lengths, idxs, hidden=hidden_flat)
        for key, values in extras.items():
            if all(_one_d(v) and len(v) == full for v, full in values):  # per token
                out.per_token[key] = _concat([v[:n] for (v, _), n in zip(values, lengths)],
                                             dtype=None)
            else:
                out.per_example[key] = [v for v, _ in values]
        return out

    def _from_dict(self, ex: Mapping, pos: int):
        """(ids, special mask or None, hidden mask or None, idx or None, the keys that pass)."""
        if "input_ids" not in ex:
            raise _fail(pos, "is a dict without 'input_ids'")
        ids, special, hidden, idx = ex["input_ids"], None, None, None
        if ex.get("idx") is not None:
            raw = ex["idx"]
            idx = int(raw.item()) if isinstance(raw, (torch.Tensor, np.ndarray)) \
                else operator.index(raw)
        if ex.get("special_tokens_mask") is not None:
            special = torch.as_tensor(ex["special_tokens_mask"]).to(torch.bool)
            if special.shape != (len(ids),):
                raise _fail(pos, "has a special_tokens_mask whose shape != input_ids shape")
        extra = {k: v for k, v in ex.items() if k not in self.dropped and v is not None and (
            not self.drop_all or k in PER_TOKEN_KEYS)}
        for key in PER_TOKEN_KEYS & extra.keys():
            if not _one_d(extra[key]) or len(extra[key]) != len(ids):
                raise _fail(pos, f"has a {key} length != its input_ids length")
        if ex.get("attention_mask") is not None:
            keep = torch.as_tensor(ex["attention_mask"]).to(torch.bool)
            if keep.shape != (len(ids),):
                raise _fail(pos, "has an attention_mask whose shape != input_ids shape")
            span, hidden = _user_mask(keep)
            if span != slice(0, len(ids)):
                ids = torch.as_tensor(ids, dtype=torch.long)[span]
                special = special[span] if special is not None else None
                extra = {k: (v[span] if _one_d(v) and len(v) == len(keep) else v)
                         for k, v in extra.items()}
        return ids, special, hidden, idx, extra


def _concat(chunks: list, dtype: torch.dtype | None = torch.long) -> torch.Tensor:
    """One 1-D tensor of python lists or 1-D tensors/arrays (one list comprehension when all
    are lists: the common case)."""
    if all(isinstance(c, (list, tuple)) for c in chunks):
        return torch.tensor([t for chunk in chunks for t in chunk], dtype=dtype)
    return torch.cat([torch.as_tensor(c, dtype=dtype) for c in chunks])


def stack_per_example(values: list) -> Any:
    """The batch's value of a per-example key: a tensor of B rows where the values stack, else
    the list as given (strings, ragged values)."""
    try:
        if all(isinstance(v, torch.Tensor) for v in values):
            return torch.stack(values)
        if all(isinstance(v, (np.ndarray, np.generic)) for v in values):
            return torch.as_tensor(np.stack(values))
        return torch.tensor(values)  # python ints: long, floats: float32, as transformers
    except (TypeError, ValueError, RuntimeError):
        return list(values)
