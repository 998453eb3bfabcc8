"""Batch invariance for row-wise ops: a row's result must not depend on the rows beside it.

Whether a matmul gives row r the same bits in a call of 1, 7 or 300 rows is the BLAS's choice, made
by shape: on the CPUs measured, oneDNN's bf16 matmul and the packed int4 kernel compute every row
alike at any row count, while MKL's fp32 sgemm switches kernels at 2 and at 16 rows. So nothing is
assumed: `rows_independent` checks a function on random rows at the row counts a step can have, and
`RowTiled` makes one that fails invariant by always calling it on exactly `TILE` rows (padded).
Elementwise ops with a transcendental (SiLU's exp) go through `serial_rows`: PyTorch splits a big
tensor among threads at element counts, not rows, and the vector and scalar exp differ in the last bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

TILE = 8  # rows per call of a tiled matmul (MKL's small-M kernel covers 2-8 rows)


def _row_counts(max_rows: int) -> list[int]:
    """Row counts that cross every kernel switch seen so far (1, 2, 8/9, 16/17, 64/65, ...), up to max_rows."""
    counts = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 255, 257, 511, 513, max_rows}
    return sorted(c for c in counts if c <= max_rows)


@torch.no_grad()
def rows_independent(
    fn: Callable[[torch.Tensor], torch.Tensor], in_features: int, dtype: torch.dtype, max_rows: int, seed: int = 0
) -> bool:
    """Whether fn gives every row of a call of m rows, for every m that crosses a known kernel switch up
    to max_rows, the same bits as that row alone (one call per row, the reference)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max_rows, in_features, generator=g).to(dtype)
    alone = torch.cat([fn(x[r : r + 1]) for r in range(max_rows)])
    return all(torch.equal(fn(x[:m]), alone[:m]) for m in _row_counts(max_rows)[1:])


# PyTorch runs an elementwise op on one thread below this many elements (at::internal::GRAIN_SIZE);
# above it, the threads' chunks can start mid-row, where the vector and scalar exp differ in the last bit.
_SERIAL_ELEMENTS = 32768


def serial_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn (elementwise per row) on groups of whole rows small enough to run on one thread each, so how a
    row is computed does not depend on how many rows the call has or on the thread count."""
    per = max(1, _SERIAL_ELEMENTS // max(1, x[:1].numel()))
    if x.shape[0] <= per:
        return fn(x)
    return torch.cat([fn(x[i : i + per]) for i in range(0, x.shape[0], per)])


class RowTiled(nn.Module):
    """`inner` called on exactly TILE rows at a time (the last tile padded with zeros), so every call
    has the same shape and the BLAS always picks the same kernel for a row."""

    def __init__(self, inner: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        pad = -rows % TILE
        if pad:
            x = torch.cat((x, x.new_zeros(pad, *x.shape[1:])))
        out = torch.cat([self.inner(x[i : i + TILE]) for i in range(0, x.shape[0], TILE)])
        return out[:rows]
