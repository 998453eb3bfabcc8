"""The paged KV cache: one pool of fixed-size blocks, and the allocator that hands them out.

Memory is allocated once at start-up. A sequence owns a list of block ids (its
block table); token i of the sequence lives in block `block_ids[i // block_size]`
at offset `i % block_size`. Which blocks are free, shared or cached is the block
pool's business (block_pool.py).
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
    def cost(self):
        """The cost model's view of this cache (membound/costs.py): the one place KV bytes are counted."""
        from membound.costs import KVCost

        return KVCost(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def has_scales(self) -> bool:
        """int8 caches keep an fp32 scale per token and head beside the codes."""
        return self.cost.scale_bytes > 0

    @property
    def bytes_per_token(self) -> int:
        return self.cost.bytes_per_token

    @property
    def bytes_per_block(self) -> int:
        return self.cost.bytes_per_block(self.block_size)


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Per-layer (K, V) views into one allocation of [layers, 2, kv_heads, blocks, block_size, head_dim];
    for an int8 cache (K, V, K scales, V scales), the scales [kv_heads, blocks, block_size] fp32.

    Head-major: one head's block is a contiguous [block_size, head_dim] tile, and a gather of
    a sequence's blocks is directly a batched-matmul operand. Zero-filled so that padded slots
    read by batched attention are finite; on CPU by pages the OS zeroes when first touched
    (`_lazy_zeros`), so the process holds only the blocks in use, not the whole budget.
    """
    shape = (spec.num_layers, 2, spec.num_kv_heads, num_blocks, spec.block_size, spec.head_dim)
    pool = (
        _lazy_zeros(shape, spec.dtype) if device.type == "cpu" else torch.zeros(shape, dtype=spec.dtype, device=device)
    )
    if not spec.has_scales:
        return [(pool[i, 0], pool[i, 1]) for i in range(spec.num_layers)]
    sshape = shape[:-1]
    if device.type == "cpu":
        scales = _lazy_zeros(sshape, torch.float32)
    else:
        scales = torch.zeros(sshape, dtype=torch.float32, device=device)
    return [(pool[i, 0], pool[i, 1], scales[i, 0], scales[i, 1]) for i in range(spec.num_layers)]


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose pages are not touched: an anonymous mapping is fresh zero pages, committed
    one by one as written, where torch.zeros writes every byte (a 2 GiB CPU cache was 2 GiB of RSS at
    once). Small pages on purpose: each block spans layers x 2 x KV heads regions, and transparent
    huge pages (which numpy asks for) would commit 2 MiB for each of them at the first block."""
    import mmap

    nbytes = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        nbytes *= d
    buf = mmap.mmap(-1, max(nbytes, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buf, dtype=torch.uint8)[:nbytes].view(dtype).view(shape)  # the tensor keeps buf alive


def hash_block(parent: bytes | None, token_ids: list[int], extra: bytes = b"") -> bytes:
    """Chained content hash of one full block: its tokens, everything before it, and what
    else shapes its K/V (`extra`: model id, later LoRA). SHA-256, so distinct prefixes never
    share KV by collision."""
    h = hashlib.sha256(parent or b"root")
    h.update(extra)
    h.update(array.array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int, extra: bytes = b"") -> list[bytes]:
    """Append to `hashes` (the chain of `token_ids`' first len(hashes) full blocks) the hashes of the
    rest of its full blocks; returns `hashes`. The prefix cache's names for a sequence's blocks, and
    the prefix-aware router's (server/prefix_router.py)."""
    for i in range(len(hashes), len(token_ids) // block_size):
        hashes.append(
            hash_block(hashes[-1] if hashes else None, token_ids[i * block_size : (i + 1) * block_size], extra)
        )
    return hashes


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


# ---------------------------------------------------------------------- sleep / wake (LLMEngine.sleep)


def unique_storages(tensors) -> list[torch.UntypedStorage]:
    """The distinct, non-empty storages behind `tensors` (views of one allocation count once)."""
    seen: dict[tuple[str, int], torch.UntypedStorage] = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr():
            seen.setdefault((str(s.device), s.data_ptr()), s)
    return list(seen.values())


def storage_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over all of `storage` (to copy or zero it whole)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),))


def release_kv_cache(caches: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.UntypedStorage, int]]:
    """Give the KV cache's memory back and keep its tensors (an engine put to sleep). On CUDA each
    storage shrinks to nothing (every view stays valid, pointing at no memory until restored); on CPU
    the untouched-zero-pages mapping (`_lazy_zeros`) drops its pages, which come back as zero pages
    when written again. What `restore_kv_cache` needs; the content is gone either way."""
    held = []
    for s in unique_storages(t for layer in caches for t in layer):
        n = s.nbytes()
        if s.device.type == "cpu" and not s.resizable():
            _drop_pages(s.data_ptr(), n)
        else:
            s.resize_(0)
        held.append((s, n))
    return held


def restore_kv_cache(held: list[tuple[torch.UntypedStorage, int]]) -> None:
    """Memory for a released KV cache again, zero-filled (padded rows read finite values), at new
    addresses on CUDA (CUDA graphs over the old ones must be captured again)."""
    for s, n in held:
        if s.nbytes() != n:
            s.resize_(n)
            storage_bytes(s).zero_()


def _drop_pages(address: int, nbytes: int) -> bool:
    """madvise(MADV_REMOVE) over the anonymous mapping `_lazy_zeros` made (Python maps it shared, where
    MADV_DONTNEED would keep the pages): they are freed and read as zeros after. False (nothing
    freed, the content kept) where that is not possible."""
    import ctypes
    import mmap

    advice = getattr(mmap, "MADV_REMOVE", None)
    if address % mmap.PAGESIZE or advice is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), advice) == 0
    except (OSError, AttributeError):
        return False
