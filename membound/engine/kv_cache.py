"""The paged KV cache: one pool of fixed-size blocks, and the allocator that hands them out.

Memory is allocated once at start-up. A sequence owns a list of block ids (its
block table); token i of the sequence lives in block `block_ids[i // block_size]`
at offset `i % block_size`. Blocks are reference-counted so that later features
(prefix caching) can share them between sequences.
"""

from __future__ import annotations

import collections
import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


def allocate_kv_cache(
    spec: KVCacheSpec, num_blocks: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) views into one allocation of [layers, 2, kv_heads, blocks, block_size, head_dim].

    Head-major: one head's block is a contiguous [block_size, head_dim] tile, and a gather of
    a sequence's blocks is directly a batched-matmul operand. Zero-filled so that padded slots
    read by batched attention are finite.
    """
    pool = torch.zeros(
        spec.num_layers,
        2,
        spec.num_kv_heads,
        num_blocks,
        spec.block_size,
        spec.head_dim,
        dtype=spec.dtype,
        device=device,
    )
    return [(pool[i, 0], pool[i, 1]) for i in range(spec.num_layers)]


class BlockAllocator:
    """Hands out block ids from a free list; counts references; never over-commits."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] <= 0:
                raise RuntimeError(f"KV block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size
