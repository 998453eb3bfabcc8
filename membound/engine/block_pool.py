"""The KV block pool: reference counts, a free queue in LRU order, and the prefix-cache index.

A sequence owns a list of block ids (its block table). Blocks are reference-counted so that
sequences with a common prefix share them. A block whose last holder lets go keeps its
content hash and goes to the back of the free queue: it is still a cache hit until it
reaches the front and is handed out again (LRU eviction). So "free" includes cached blocks
nobody holds, and the cache never costs capacity.
"""

from __future__ import annotations

import array


class FreeBlockQueue:
    """Free block ids in LRU order with O(1) pop from the front, push to the back, and removal
    from the middle (a cache hit taken back). A doubly linked list threaded through two flat
    arrays indexed by block id; the sentinel is the id `n`. A dict popped with `next(iter())`
    would rescan its deleted slots: microseconds per take at a 60K-block pool."""

    def __init__(self, n: int) -> None:
        self._n = n
        # Initially 0 <-> 1 <-> ... <-> n-1, closed into a ring through the sentinel n.
        self._next = array.array("q", range(1, n + 2))
        self._prev = array.array("q", range(-1, n))
        self._next[n], self._prev[0] = 0, n  # for n == 0 both are the sentinel itself
        self._in = bytearray(b"\x01") * n  # 1 where the block is in the queue
        self._len = n

    def __len__(self) -> int:
        return self._len

    def __contains__(self, b: int) -> bool:
        return bool(self._in[b])

    def popleft(self) -> int:
        b = self._next[self._n]
        if b == self._n:
            raise IndexError("the free queue is empty")
        self.remove(b)
        return b

    def append(self, b: int) -> None:
        if self._in[b]:
            raise ValueError(f"block {b} is already free")
        s, nxt, prv = self._n, self._next, self._prev
        last = prv[s]
        nxt[last], prv[b], nxt[b], prv[s] = b, last, s, b
        self._in[b] = 1
        self._len += 1

    def remove(self, b: int) -> None:
        if not self._in[b]:
            raise ValueError(f"block {b} is not free")
        nxt, prv = self._next, self._prev
        p, q = prv[b], nxt[b]
        nxt[p], prv[q] = q, p
        self._in[b] = 0
        self._len -= 1

    def __iter__(self):
        b = self._next[self._n]
        while b != self._n:
            yield b
            b = self._next[b]


class BlockPool:
    """Hands out block ids, counts references, never over-commits; caches full blocks by content."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._free = FreeBlockQueue(num_blocks)
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}
        # Told of every change to the cached content: ("+", hash) cached, ("-", hash) evicted,
        # ("reset", None). A replica reports them to the prefix-aware router (server/replicas.py).
        self._listeners: list = []

    def add_cache_listener(self, listener) -> None:
        """Call `listener(event, block_hash)` on each cache change (see `_listeners`), on the engine's thread."""
        self._listeners.append(listener)

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
            b = self._free.popleft()
            if self._hash_of[b] is not None:
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
                self._free.append(b)

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
                self._free.remove(b)
            self._refs[b] += 1

    def register(self, block: int, block_hash: bytes) -> None:
        """Record that a held, fully computed block holds the content `block_hash` names."""
        if self._hash_of[block] is not None or block_hash in self._block_of:
            return  # already cached, or another block already holds the same content
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block
        for listener in self._listeners:
            listener("+", block_hash)

    def reset_cache(self) -> None:
        """Forget every cached block's content (blocks in use stay allocated)."""
        self._block_of.clear()
        self._hash_of = [None] * self.num_blocks
        for listener in self._listeners:
            listener("reset", None)

    def _evict(self, b: int) -> None:
        h = self._hash_of[b]
        self._hash_of[b] = None
        del self._block_of[h]
        for listener in self._listeners:
            listener("-", h)
