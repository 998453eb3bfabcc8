"""Paged attention in plain PyTorch: the CPU path and the reference for kernels."""

from __future__ import annotations

import concurrent.futures

import torch
import torch.nn.functional as F

from membound.attention.base import AttentionMetadata, PagedAttentionBase
from membound.kernels import cpu as cpu_kernels

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


INT8_MAX = 127.0


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per vector of the last dim: (codes, scales [...]).
    Rounds half up (floor(x + 0.5)), as the Triton KV-write kernel does."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp(min=1e-8) / INT8_MAX
    return (xf / scale[..., None] + 0.5).floor().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Scatter each new token's K/V ([T, KVH, D]) into its slot of the paged cache.

    An int8 cache comes with kv_scales ([KVH, num_blocks, block_size] fp32 each): one scale per
    token and head, so an outlier token costs precision only for itself."""
    kvh, _, _, d = k_cache.shape
    k, v = k.transpose(0, 1), v.transpose(0, 1)
    if k_cache.dtype == torch.int8:
        if kv_scales is None:
            raise ValueError("an int8 KV cache needs its scales")
        for x, cache, scales in ((k, k_cache, kv_scales[0]), (v, v_cache, kv_scales[1])):
            codes, sc = quantize_int8(x)
            cache.view(kvh, -1, d).index_copy_(1, slot_mapping, codes)
            scales.view(kvh, -1).index_copy_(1, slot_mapping, sc)
        return
    if k_cache.dtype == FP8:
        # e4m3 has no infinity (out-of-range casts give NaN), and CPU index_copy_ has no fp8 kernel:
        # clamp, cast, and scatter the bytes.
        k = k.clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
        v = v.clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(kvh, -1, d).index_copy_(1, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(kvh, -1, d).index_copy_(1, slot_mapping, v.to(v_cache.dtype))


def gather_blocks(
    cache: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """[KVH, len(blocks), block_size, D] of the listed blocks in `dtype`, int8 codes times their scales."""
    x = torch.index_select(cache, 1, blocks)
    if scales is None:
        return x.to(dtype)
    return (x.to(torch.float32) * torch.index_select(scales, 1, blocks)[..., None]).to(dtype)


def _gather_sequences(q, k_cache, v_cache, block_tables, kv_scales) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence's blocks, keys and values [KVH, B, L, D] in q's dtype (L = the table's width in
    tokens). index_select is several times faster than advanced indexing for this gather on CPU."""
    kvh, _, block_size, d = k_cache.shape
    b, width = block_tables.shape[0], block_tables.shape[1] * block_size
    flat = block_tables.reshape(-1)
    keys = gather_blocks(k_cache, None if kv_scales is None else kv_scales[0], flat, q.dtype)
    values = gather_blocks(v_cache, None if kv_scales is None else kv_scales[1], flat, q.dtype)
    return keys.view(kvh, b, width, d), values.view(kvh, b, width, d)


def _visible(width: int, seq_lens: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """[B, L] bool: the cached positions each sequence's one new token attends to."""
    pos = torch.arange(width, device=seq_lens.device)
    valid = pos[None, :] < seq_lens[:, None]
    if sliding_window is not None:
        valid &= pos[None, :] > (seq_lens[:, None] - 1 - sliding_window)
    return valid


def decode_attention(
    q: torch.Tensor,  # [B, H, D], one query per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    sliding_window: int | None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seq_len: int | None = None,  # the longest of seq_lens, known on the host
) -> torch.Tensor:
    """One query token per sequence over its whole cached context, batched: the sequences' blocks
    gathered (index_select is several times faster than advanced indexing on CPU), then one fused
    SDPA call that groups query heads per KV head itself (GQA). A lone sequence needs no mask: its
    gather is cut to its length."""
    b, h, d = q.shape
    if kv_scales is None:
        out = cpu_kernels.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window)
        if out is not None:  # bf16, a few sequences: the fused C op (membound/kernels/cpu_ops.c)
            return out
    lone = b == 1 and max_seq_len is not None and sliding_window is None
    if not lone and q.dtype == torch.float32:
        return _decode_bmm(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, kv_scales)
    keys, values = _gather_sequences(q, k_cache, v_cache, block_tables, kv_scales)
    keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [B, KVH, L, D]
    mask = None
    if lone:
        keys, values = keys[:, :, :max_seq_len], values[:, :, :max_seq_len]
    else:
        mask = _visible(keys.shape[2], seq_lens, sliding_window)[:, None, None, :]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(
        q[:, :, None], keys, values, attn_mask=mask, scale=scale, enable_gqa=h != k_cache.shape[0]
    )
    return out.view(b, h, d)


def _decode_bmm(
    q: torch.Tensor,  # [B, H, D], one query per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    sliding_window: int | None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """decode_attention as two batched matmuls around a masked softmax (fp32 batches, where CPU SDPA
    with a mask is 5x slower than this)."""
    b, h, d = q.shape
    kvh = k_cache.shape[0]
    keys, values = _gather_sequences(q, k_cache, v_cache, block_tables, kv_scales)
    max_len = keys.shape[2]
    # Head-major, [KVH * B, L, D]: both products are plain batched matmuls with no layout copies,
    # and query heads sharing a KV head go together (GQA).
    keys, values = keys.reshape(kvh * b, max_len, d), values.reshape(kvh * b, max_len, d)
    qg = q.reshape(b, kvh, h // kvh, d).transpose(0, 1).reshape(kvh * b, h // kvh, d)
    scores = torch.bmm(qg, keys.transpose(1, 2)).float() * scale  # [KVH * B, G, L]
    valid = _visible(max_len, seq_lens, sliding_window)
    scores = scores.view(kvh, b, -1, max_len).masked_fill(~valid[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(kvh * b, -1, max_len)
    out = torch.bmm(probs.to(q.dtype), values)  # [KVH * B, G, D]
    return out.view(kvh, b, -1, d).transpose(0, 1).reshape(b, h, d).to(q.dtype)


def prefill_attention(
    q: torch.Tensor,  # [Q, H, D], the new tokens of one sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks]
    seq_len: int,
    scale: float,
    sliding_window: int | None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of one sequence's new tokens over its cached prefix + themselves."""
    q_len, h, d = q.shape
    kvh, _, block_size, _ = k_cache.shape
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks]
    ks, vs = kv_scales if kv_scales is not None else (None, None)
    keys = gather_blocks(k_cache, ks, blocks, q.dtype).view(kvh, -1, d)[:, :seq_len]  # [KVH, L, D]
    values = gather_blocks(v_cache, vs, blocks, q.dtype).view(kvh, -1, d)[:, :seq_len]
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
    k_pos = torch.arange(seq_len, device=q.device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    gqa = h != kvh
    if gqa and q.is_cuda:
        # CUDA's fused SDPA kernels take no GQA flag with a mask; expanding keeps them in play.
        keys, values, gqa = keys.repeat_interleave(h // kvh, 0), values.repeat_interleave(h // kvh, 0), False
    causal_only = q_len == seq_len and sliding_window is None
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        keys[None],
        values[None],
        attn_mask=None if causal_only else mask,
        is_causal=causal_only,
        scale=scale,
        enable_gqa=gqa,
    )
    return out[0].transpose(0, 1)


def _even_work(kv_lens: list[int], parts: int) -> list[int]:
    """Row bounds of `parts` contiguous parts with about the same attended tokens each (a prompt's later
    rows attend to more), from 0 to len(kv_lens)."""
    total, bounds, acc = sum(kv_lens), [0], 0
    for r, n in enumerate(kv_lens):
        acc += n
        if len(bounds) < parts and acc * parts >= total * len(bounds):
            bounds.append(r + 1)
    bounds += [len(kv_lens)] * (parts + 1 - len(bounds))
    return bounds


def rowwise_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [T, max_blocks]: each row's sequence's table
    kv_lens: torch.Tensor,  # [T] int32: the cached tokens each row attends to
    kv_lens_host: list[int],
    scale: float,
    sliding_window: int | None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    pool: concurrent.futures.Executor | None = None,
) -> torch.Tensor:
    """Each query row over its own first kv_lens[r] cached tokens, alone: a prompt token attends as it
    would decoding at its position, with the same reduction order whatever the step holds or however the
    prompt was chunked (the batch-invariant path). The C op where it applies (split over `pool`'s
    threads: it runs on one core and releases the GIL); otherwise one SDPA call per row."""
    t, h, d = q.shape
    if kv_scales is None and cpu_kernels.available():
        n = 1 if pool is None else max(1, min(torch.get_num_threads(), t // 16))
        bounds = _even_work(kv_lens_host, n)
        ranges = [(lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False) if hi > lo]

        def part(lo: int, hi: int):
            return cpu_kernels.decode_attention(
                q[lo:hi], k_cache, v_cache, block_tables[lo:hi], kv_lens[lo:hi], scale, sliding_window, None
            )

        if len(ranges) == 1:
            parts = [part(*ranges[0])]
        else:
            parts = list(pool.map(part, *zip(*ranges, strict=True)))
        if parts and all(p is not None for p in parts):
            return parts[0] if len(parts) == 1 else torch.cat(parts)
    kvh, _, block_size, _ = k_cache.shape
    ks, vs = kv_scales if kv_scales is not None else (None, None)
    out = torch.empty_like(q)
    for r, n in enumerate(kv_lens_host):
        blocks = block_tables[r, : (n + block_size - 1) // block_size]
        lo = 0 if sliding_window is None else max(0, n - sliding_window)
        keys = gather_blocks(k_cache, ks, blocks, q.dtype).view(kvh, -1, d)[None, :, lo:n]
        values = gather_blocks(v_cache, vs, blocks, q.dtype).view(kvh, -1, d)[None, :, lo:n]
        out[r] = F.scaled_dot_product_attention(
            q[r, :, None][None], keys, values, scale=scale, enable_gqa=h != kvh
        ).view(h, d)
    return out


# Most cached tokens one batched decode gathers at once; bounds the temporary memory.
DECODE_GATHER_TOKENS = 1 << 16


class TorchPagedAttention(PagedAttentionBase):
    """Runs anywhere PyTorch runs; decodes are batched, prefills go one sequence at a time.
    batch_invariant: every row attends on its own (rowwise_attention), so a token's result does not
    depend on the batch or the prompt's chunking; slower for long prefills."""

    name = "torch"

    def __init__(self, batch_invariant: bool = False) -> None:
        self.batch_invariant = batch_invariant
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping, kv_scales)
        return self.attend(q, k_cache, v_cache, meta, scale, sliding_window, kv_scales)

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention over K/V already in the cache (this step's included)."""
        if self.batch_invariant:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max(1, torch.get_num_threads()), thread_name_prefix="membound-attn"
                )
            tables, lens, lens_host = meta.row_kv
            return rowwise_attention(
                q, k_cache, v_cache, tables, lens, lens_host, scale, sliding_window, kv_scales, self._pool
            )
        nd = meta.num_decodes
        parts = []
        if nd:
            block_size = k_cache.shape[2]
            width = (meta.max_decode_len + block_size - 1) // block_size
            step = max(1, DECODE_GATHER_TOKENS // (width * block_size))
            for lo in range(0, nd, step):
                hi = min(nd, lo + step)
                parts.append(
                    decode_attention(
                        q[lo:hi],
                        k_cache,
                        v_cache,
                        meta.block_tables[lo:hi, :width],
                        meta.seq_lens[lo:hi],
                        scale,
                        sliding_window,
                        kv_scales,
                        meta.max_decode_len if hi - lo == 1 and nd == 1 else None,
                    )
                )
        starts = meta.query_start_loc_host
        for i in range(nd, meta.num_seqs):
            parts.append(
                prefill_attention(
                    q[starts[i] : starts[i + 1]],
                    k_cache,
                    v_cache,
                    meta.block_tables[i],
                    meta.seq_lens_host[i],
                    scale,
                    sliding_window,
                    kv_scales,
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
