"""Paged attention in plain PyTorch: the CPU path and the reference for kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from membound.attention.base import AttentionMetadata

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter each new token's K/V ([T, KVH, D]) into its slot of the paged cache."""
    kvh, _, _, d = k_cache.shape
    k, v = k.transpose(0, 1), v.transpose(0, 1)
    if k_cache.dtype == FP8:
        # e4m3 has no infinity (out-of-range casts give NaN), and CPU index_copy_ has no fp8 kernel:
        # clamp, cast, and scatter the bytes.
        k = k.clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
        v = v.clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(kvh, -1, d).index_copy_(1, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(kvh, -1, d).index_copy_(1, slot_mapping, v.to(v_cache.dtype))


def decode_attention(
    q: torch.Tensor,  # [B, H, D], one query per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One query token per sequence over its whole cached context, batched."""
    b, h, d = q.shape
    kvh, _, block_size, _ = k_cache.shape
    max_len = block_tables.shape[1] * block_size
    # Gather every sequence's blocks head-major, [KVH * B, L, D], so both products are plain
    # batched matmuls with no layout copies, and query heads sharing a KV head go together (GQA).
    # index_select is several times faster than advanced indexing for this gather on CPU.
    flat = block_tables.reshape(-1)
    keys = torch.index_select(k_cache, 1, flat).view(kvh * b, max_len, d)
    values = torch.index_select(v_cache, 1, flat).view(kvh * b, max_len, d)
    qg = q.reshape(b, kvh, h // kvh, d).transpose(0, 1).reshape(kvh * b, h // kvh, d)
    scores = torch.bmm(qg, keys.to(q.dtype).transpose(1, 2)).float() * scale  # [KVH * B, G, L]
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None, :] < seq_lens[:, None]
    if sliding_window is not None:
        valid &= pos[None, :] > (seq_lens[:, None] - 1 - sliding_window)
    scores = scores.view(kvh, b, -1, max_len).masked_fill(~valid[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(kvh * b, -1, max_len)
    out = torch.bmm(probs.to(q.dtype), values.to(q.dtype))  # [KVH * B, G, D]
    return out.view(kvh, b, -1, d).transpose(0, 1).reshape(b, h, d).to(q.dtype)


def prefill_attention(
    q: torch.Tensor,  # [Q, H, D], the new tokens of one sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks]
    seq_len: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal attention of one sequence's new tokens over its cached prefix + themselves."""
    q_len, h, d = q.shape
    kvh, _, block_size, _ = k_cache.shape
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks]
    keys = torch.index_select(k_cache, 1, blocks).view(kvh, -1, d)[:, :seq_len]  # [KVH, L, D]
    values = torch.index_select(v_cache, 1, blocks).view(kvh, -1, d)[:, :seq_len]
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
    k_pos = torch.arange(seq_len, device=q.device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    keys, values = keys.to(q.dtype), values.to(q.dtype)
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


# Most cached tokens one batched decode gathers at once; bounds the temporary memory.
DECODE_GATHER_TOKENS = 1 << 16


class TorchPagedAttention:
    """Runs anywhere PyTorch runs; decodes are batched, prefills go one sequence at a time."""

    name = "torch"

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
    ) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
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
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
