"""The paged KV cache: one pool of fixed-size blocks, and the allocator that hands them out.

Memory is allocated once at start-up. A sequence owns a list of block ids (its
block table); token i of the sequence lives in block `block_ids[i // block_size]`
at offset `i % block_size`. Blocks are reference-counted so that later features
(prefix caching) can share them between sequences.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib

import torch


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def has_scales(self) -> bool:
        """int8 caches keep an fp32 scale per token and head beside the codes."""
        return self.dtype == torch.int8

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_head = self.head_dim * elem + (4 if self.has_scales else 0)
        return 2 * self.num_layers * self.num_kv_heads * per_head

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Per-layer (K, V) views into one allocation of [layers, 2, kv_heads, blocks, block_size, head_dim];
    for an int8 cache (K, V, K scales, V scales), the scales [kv_heads, blocks, block_size] fp32.

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
    if not spec.has_scales:
        return [(pool[i, 0], pool[i, 1]) for i in range(spec.num_layers)]
    scales = torch.zeros(
        spec.num_layers, 2, spec.num_kv_heads, num_blocks, spec.block_size, dtype=torch.float32, device=device
    )
    return [(pool[i, 0], pool[i, 1], scales[i, 0], scales[i, 1]) for i in range(spec.num_layers)]


class BlockAllocator:
    """Hands out block ids, counts references, never over-commits; caches full blocks by content.

    Free blocks sit in one queue, least recently used first. A block whose last holder lets go
    keeps its content hash and goes to the back of the queue: it is still a cache hit until it
    reaches the front and is handed out again (LRU eviction). So "free" includes cached blocks
    nobody holds; the cache never costs capacity.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        # An insertion-ordered dict is an O(1) LRU queue that can also drop from the middle.
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        out = []
        for _ in range(n):
            b = next(iter(self._free))
            del self._free[b]
            self._evict(b)
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        # Last blocks first: a sequence's tail is the least likely to be shared, so it goes first.
        for b in reversed(blocks):
            if self._refs[b] <= 0:
                raise RuntimeError(f"KV block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None

    # ---------------------------------------------------------------- prefix cache

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks holding the longest run of these chained block hashes."""
        hits = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def num_free_after_taking(self, blocks: list[int]) -> int:
        """Free blocks left once `blocks` (cache hits) are taken: hits nobody holds leave the queue."""
        return len(self._free) - sum(1 for b in blocks if self._refs[b] == 0)

    def take(self, blocks: list[int]) -> None:
        """Share cached blocks with one more holder."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1

    def register(self, block: int, block_hash: bytes) -> None:
        """Record that a held, fully computed block holds the content `block_hash` names."""
        if self._hash_of[block] is not None or block_hash in self._block_of:
            return  # already cached, or another block already holds the same content
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block

    def reset_cache(self) -> None:
        """Forget every cached block's content (blocks in use stay allocated)."""
        self._block_of.clear()
        self._hash_of = [None] * self.num_blocks

    def _evict(self, b: int) -> None:
        h = self._hash_of[b]
        if h is not None:
            self._hash_of[b] = None
            del self._block_of[h]


def hash_block(parent: bytes | None, token_ids: list[int], extra: bytes = b"") -> bytes:
    """Chained content hash of one full block: its tokens, everything before it, and what
    else shapes its K/V (`extra`: model id, later LoRA). SHA-256, so distinct prefixes never
    share KV by collision."""
    h = hashlib.sha256(parent or b"root")
    h.update(extra)
    h.update(array.array("q", token_ids).tobytes())
    return h.digest()


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size
