"""Packed rows: the one statement of how several examples share a row (`PackedRows`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def round_up(n: int, multiple: int | None) -> int:
    return -(-n // multiple) * multiple if multiple else n


@dataclass(frozen=True)
class PackedRows:
    """Examples laid out contiguously in ``n_rows`` rows of ``width`` tokens (``lengths``,
    ``row_of``, ``start_of``: each example's tokens, row and first column). The convention, stated
    here and nowhere else:

    * **Positions** are numbered over the R*T flattened rows, row by row. Each example is one
      *segment*: contiguous positions within one row, restarting its position ids.
    * **The padding tail is one more segment**: a row's positions after its last example (all of
      an empty row) form a segment of their own, so every position belongs to a segment, padding
      included. The 2-D ``attention_mask`` of packed rows is therefore all ones (`ones_mask`):
      any 0 would send transformers down its unpadding path, which ignores the boundaries and
      would let a row's examples see each other.
    * **Boundaries** (`boundaries`, the flash form ``cu_seq_lens``): the start of every segment
      and R*T at the end, so every row starts on one; a fixed-size boundary tensor repeats its
      last entry (`pad_boundaries`: zero-length segments at the end).
    * **Segment ids** (`segment_ids`): the number of each position's segment, counted from 0
      in that order; positions attend only within their segment.
    * **The block-mask form** (`block_segments`, for masks the collator builds itself): each real
      token's example, and a distinct negative number for every padding position, so a padding
      query "matches" only itself (an all-blocked query row would make SDPA return NaN; padding
      carries no labels). Both forms keep every example alone.
    """
    lengths: tuple[int, ...]
    row_of: tuple[int, ...]
    start_of: tuple[int, ...]
    n_rows: int
    width: int

    @classmethod
    def lay_out(cls, lengths: Sequence[int], rows: Sequence[Sequence[int]],
                pad_to_multiple_of: int | None = None) -> "PackedRows":
        """``rows`` (positions into the examples, each row's in order) laid out contiguously;
        the width is the fullest row's, rounded up to ``pad_to_multiple_of``."""
        row_of, start_of, used = [0] * len(lengths), [0] * len(lengths), []
        for r, row in enumerate(rows):
            col = 0
            for i in row:
                row_of[i], start_of[i] = r, col
                col += lengths[i]
            used.append(col)
        return cls(tuple(lengths), tuple(row_of), tuple(start_of), len(rows),
                   round_up(max(used), pad_to_multiple_of))

    @property
    def ends(self) -> list[int]:
        """The flat end of every example (over the R*T positions)."""
        return [self.row_of[i] * self.width + self.start_of[i] + n
                for i, n in enumerate(self.lengths)]

    def places(self, example_of: torch.Tensor,
               within: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every token (N,), given its example and its index within it."""
        return (torch.tensor(self.row_of)[example_of],
                torch.tensor(self.start_of)[example_of] + within)

    def boundaries(self) -> torch.Tensor:
        """(S + 1,) int32: the start of every segment (examples and padding tails), then R*T."""
        total = self.n_rows * self.width
        return torch.tensor(sorted({0, total, *self.ends,
                                    *(r * self.width for r in range(self.n_rows))}),
                            dtype=torch.int32)

    def flash_inputs(self) -> dict[str, Any]:
        """The flash-attention varlen inputs: the all-ones 2-D ``attention_mask``,
        ``cu_seq_lens_q/k`` (`boundaries`) and ``max_length_q/k``, the longest segment -- the
        names transformers' `DataCollatorWithFlattening` uses."""
        cu = self.boundaries()  # (S + 1,)
        bounds = cu.tolist()
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        return {"attention_mask": self.ones_mask((self.n_rows, self.width)),  # (R, T)
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(),
                "max_length_q": longest, "max_length_k": longest}

    def block_segments(self, row: torch.Tensor, col: torch.Tensor,
                       example_of: torch.Tensor) -> torch.Tensor:
        """(R, T) long, the block-mask form: each token's example (tokens at ``row``, ``col``),
        a distinct negative number for every padding position."""
        segment = (-1 - torch.arange(self.width)).repeat(self.n_rows, 1)  # (R, T)
        segment[row, col] = example_of
        return segment

    @staticmethod
    def ones_mask(shape: tuple[int, int], device=None) -> torch.Tensor:
        """(R, T) long ones: the 2-D ``attention_mask`` of packed rows (every position is in a
        segment, padding included)."""
        return torch.ones(shape, dtype=torch.long, device=device)

    @staticmethod
    def segment_ids(cu_seq_lens: torch.Tensor, n_rows: int, width: int) -> torch.Tensor:
        """(R, T) long: the segment of every position, from the boundaries over R*T positions
        (at most R*T segments; zero-length ones take no position)."""
        starts = torch.zeros(n_rows * width + 1, dtype=torch.long, device=cu_seq_lens.device)
        starts[cu_seq_lens.long()] = 1  # (R*T + 1,) 1 where a segment starts (and at the end)
        return starts[:-1].cumsum(0).view(n_rows, width)  # (R, T)

    @staticmethod
    def pad_boundaries(cu_seq_lens: torch.Tensor, size: int) -> torch.Tensor:
        """(size,) the boundaries with their last entry repeated: zero-length segments at the
        end (a fixed shape for compiled steps)."""
        return torch.cat([cu_seq_lens, cu_seq_lens[-1:].expand(size - len(cu_seq_lens))])
