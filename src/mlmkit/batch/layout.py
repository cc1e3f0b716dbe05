"""Batch layout: padded or packed rows, position ids, and the attention mask in the form each
attention implementation needs.

The contracts that live here (and nowhere else):

* **Every batch carries an attention mask built from the examples' lengths**, never from
  ``input_ids == pad_token_id`` (the pad id can also be a real token). `Layout.pad` writes a 1
  exactly where an example's tokens are scattered.
* **Packed rows isolate their examples**: `Layout.pack` restarts position ids at every example
  (plus ``position_offset``: ``padding_idx + 1`` for RoBERTa-family models) and builds an
  attention mask under which each example attends only to itself (`packed_attention`, or the
  boundaries of the flash form); where each example and padding tail lies is `rows.PackedRows`.

`pack_rows` is the one packing algorithm; the batch plans (`plans.py`) and the stream's steps
(`streaming.py`) use it to pack rows over a window of examples (`WindowPacker`, the one window
loop of both), and the collator to pack a batch on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlmkit.batch.examples import pad_value
from mlmkit.batch.rows import PackedRows, round_up
from mlmkit.config.choices import ADDITIVE_MASK_ATTENTION, BOUNDARY_ATTENTION


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: rows of example positions, each summing to <= capacity.

    Examples are taken longest first (ties by position, so the layout is deterministic) and each
    goes into the open row with the least remaining space that still fits it, or a new row.
    Within a row, examples are laid out contiguously in the returned order.
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


def fullest_rows(lengths: Sequence[int], capacity: int, multiple: int,
                 keep_all: bool = False) -> tuple[list[list[int]], list[int]]:
    """Pack a window of examples (`pack_rows`) and keep its fullest rows, a multiple of
    ``multiple`` of them (all with ``keep_all``): ``(kept rows, fullest first, stable; the
    positions of the examples of the other rows)``. The planned and the streamed windows both
    cut batches this way and carry the rest into their next window."""
    rows = pack_rows(lengths, capacity)
    rows.sort(key=lambda row: -sum(lengths[i] for i in row))
    keep = len(rows) if keep_all else (len(rows) // multiple) * multiple
    return rows[:keep], [i for row in rows[keep:] for i in row]


WINDOW_STEPS = 4  # steps' worth of examples per window, planned and streamed


@dataclass(frozen=True)
class WindowPacker:
    """The one window loop of the planned and the streamed steps: cuts items (a plan's example
    indices, a stream's examples) into steps of ``multiple`` units, a window at a time.

    A window is filled (the previous window's carry first) to ``steps`` steps' worth: tokens when
    packing rows of ``capacity`` tokens, items otherwise. It keeps its fullest rows, a whole
    number of steps of them (`fullest_rows`), or unpacked a random whole number of steps of
    items; is widened when not one step is kept; shuffles what it keeps, cuts it into steps and
    carries the rest into the next window. The last window of a finite source keeps all (its
    last step may be short). A unit is a row (a list of items) when packing, else an item.

    ``source``: ``read()`` the next items (a non-empty list), ``exhausted()``; ``length``: an
    item's tokens, at most ``capacity`` (packing only).
    """
    multiple: int
    capacity: int | None = None
    length: Callable[[Any], int] | None = None
    steps: int = WINDOW_STEPS

    def windows(self, source, rng: Callable[[int], Any], carry: Sequence = ()):
        """Yield ``(steps, carry)`` per window until ``source`` is exhausted and nothing is
        carried (a stream: for ever); ``rng(k)``: the numpy Generator of the k-th window."""
        carry, k = list(carry), 0
        while carry or not source.exhausted():
            steps, carry = self.window(source, carry, rng(k))
            yield steps, carry
            k += 1

    def window(self, source, carry: list, rng) -> tuple[list[list], list]:
        """``(steps of units, items carried)`` of one window."""
        budget = self.steps * self.multiple * (self.capacity or 1)
        pool = list(carry)
        while True:
            have = self._size(pool)
            while have < budget and not source.exhausted():
                items = source.read()
                pool += items
                have += self._size(items)
            units, rest = self._keep(pool, rng, keep_all=source.exhausted())
            if units:
                break
            budget *= 2  # not one step's worth: widen the window
        return [units[i:i + self.multiple] for i in range(0, len(units), self.multiple)], rest

    def _size(self, items: list) -> int:
        return sum(map(self.length, items)) if self.capacity else len(items)

    def _keep(self, pool: list, rng, keep_all: bool) -> tuple[list, list]:
        """(the kept units, shuffled; the items carried, in pool order)."""
        if self.capacity is None:
            order = rng.permutation(len(pool))
            keep = len(pool) if keep_all else (len(pool) // self.multiple) * self.multiple
            return [pool[i] for i in order[:keep]], [pool[i] for i in sorted(order[keep:])]
        rows, rest = fullest_rows([self.length(x) for x in pool], self.capacity, self.multiple,
                                  keep_all=keep_all)
        if not rows:
            return [], pool
        units = [[pool[i] for i in row] for row in rows]
        return [units[i] for i in rng.permutation(len(units))], [pool[i] for i in rest]


def packed_attention(segment: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """The (R, 1, T, T) mask under which a position attends only to its own segment.

    ``segment`` (R, T): `PackedRows.block_segments` (a padding position matches only itself).
    SDPA takes a bool mask (True = attend); eager and flex a float32 additive one (0 = attend,
    finfo.min = blocked): transformers adds a 4-D mask to the scores as it is, so a bool mask
    would block nothing there.
    """
    allowed = (segment[:, :, None] == segment[:, None, :])[:, None]  # (R, 1, T, T)
    if attn_implementation not in ADDITIVE_MASK_ATTENTION:
        return allowed
    additive = torch.zeros(allowed.shape, dtype=torch.float32)  # (R, 1, T, T)
    return additive.masked_fill_(~allowed, torch.finfo(torch.float32).min)


@dataclass
class Layout:
    """Lays out masked examples (concatenated, with their lengths) as a padded or packed batch.

    See `collator.py` for the shapes of every output. Options are validated by
    `MaskedLMCollator`.
    """

    padding: str
    max_length: int | None
    pad_to_multiple_of: int | None
    pad_token_id: int
    position_offset: int
    padding_side: str
    attn_implementation: str

    def __call__(self, masked: torch.Tensor, labels: torch.Tensor, lengths: list[int],
                 rows: Sequence[Sequence[int]] | None = None,
                 per_token: dict[str, torch.Tensor] | None = None,
                 hidden: torch.Tensor | None = None) -> dict[str, Any]:
        """``per_token`` (name -> (N,)): keys the examples carry per token (``token_type_ids``),
        laid out like the ids (`examples.pad_value` in padding; packed rows concatenate them)
        and returned under their names. ``hidden`` (N,) bool: tokens the user's own attention
        mask hides (padded rows only: their attention-mask column is 0)."""
        lens = torch.tensor(lengths, dtype=torch.long)  # (E,)
        example_of = torch.repeat_interleave(torch.arange(len(lengths)), lens)  # (N,)
        within = torch.arange(masked.numel()) - (torch.cumsum(lens, 0) - lens)[example_of]  # (N,)
        if self.padding == "packed":
            return self.pack(masked, labels, lengths, example_of, within, rows, per_token)
        return self.pad(masked, labels, lens, example_of, within, per_token, hidden)

    def _scatter(self, n_rows: int, width: int, row: torch.Tensor, col: torch.Tensor,
                 masked: torch.Tensor, labels: torch.Tensor,
                 per_token: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """One allocation per tensor, then one scatter of all tokens: (R, T) ids and labels
        (and each per-token key, `examples.pad_value` in padding)."""
        input_ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)  # (R, T)
        label_t = torch.full((n_rows, width), -100, dtype=torch.long)  # (R, T)
        input_ids[row, col] = masked
        label_t[row, col] = labels
        out = {"input_ids": input_ids, "labels": label_t}
        for key, values in (per_token or {}).items():
            laid = torch.full((n_rows, width), pad_value(key), dtype=values.dtype)  # (R, T)
            laid[row, col] = values
            out[key] = laid
        return out

    def pad(self, masked, labels, lens, example_of, within, per_token=None,
            hidden=None) -> dict[str, Any]:
        """One example per row, padded to the longest (or max_length) on ``padding_side``."""
        width = self.max_length if self.padding == "max_length" else int(lens.max())
        width = round_up(width, self.pad_to_multiple_of)
        left = self.padding_side == "left"
        start = (width - lens) if left else torch.zeros_like(lens)  # (B,) first column
        col = start[example_of] + within  # (N,) column of every token
        batch: dict[str, Any] = self._scatter(len(lens), width, example_of, col, masked, labels,
                                              per_token)
        attention_mask = torch.zeros((len(lens), width), dtype=torch.long)  # (B, T)
        # From the lengths, never from ids == pad id; 0 where the user's own mask hides a token.
        attention_mask[example_of, col] = 1 if hidden is None else (~hidden).long()
        batch["attention_mask"] = attention_mask
        if left:  # absolute-position models would otherwise number tokens from the pad count
            pos = (torch.arange(width)[None, :] - start[:, None]).clamp_(min=0)  # (B, T)
            batch["position_ids"] = pos + self.position_offset
        return batch

    def pack(self, masked, labels, lengths, example_of, within, rows=None,
             per_token=None) -> dict[str, Any]:
        """Examples laid out contiguously in rows of at most max_length tokens (``rows`` gives
        the layout as positions into the examples; by default `pack_rows` packs the batch)."""
        cap = self.max_length
        if rows is None:
            rows = pack_rows(lengths, cap)
        elif sorted(i for row in rows for i in row) != list(range(len(lengths))) or any(
                sum(lengths[i] for i in row) > cap for row in rows):
            raise ValueError("MaskedLMCollator: rows must place every example exactly once, "
                             f"each row holding at most max_length={cap} tokens")
        packed = PackedRows.lay_out(lengths, rows, self.pad_to_multiple_of)
        n_rows, width = packed.n_rows, packed.width
        tok_row, tok_col = packed.places(example_of, within)  # (N,) each
        batch: dict[str, Any] = self._scatter(n_rows, width, tok_row, tok_col, masked, labels,
                                              per_token)
        position_ids = torch.full((n_rows, width), self.position_offset, dtype=torch.long)
        position_ids[tok_row, tok_col] = within + self.position_offset  # restarts per example
        batch["position_ids"] = position_ids  # (R, T)
        if self.attn_implementation in BOUNDARY_ATTENTION:  # flash, mlmkit_packed
            batch.update(packed.flash_inputs())
            return batch
        segment = packed.block_segments(tok_row, tok_col, example_of)  # (R, T)
        batch["attention_mask"] = packed_attention(segment, self.attn_implementation)
        return batch
