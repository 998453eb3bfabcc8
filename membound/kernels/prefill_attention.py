"""Paged prefill/extend attention in Triton: causal, variable-length batch, over a cached prefix.

Each sequence brings `q_len` new tokens whose K/V are already in the paged cache, after
`seq_len - q_len` cached ones (a prefix-cache hit or earlier prefill chunks). One program
takes BLOCK_M query tokens of one head of one sequence and walks the sequence's pages
through its block table, up to the last key its queries may see, with an online softmax.
The PyTorch reference is `membound.attention.torch_paged.prefill_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from membound.kernels.decode_attention import MIN_TILE, check_shapes, dot_precision, launch_shape, load_kv_page


# Not specialised on what changes between steps (block-table width; the metadata pointers are
# slices at a batch-dependent offset): serving compiles nothing after the warm-up.
@triton.jit(
    do_not_specialize=["window", "stride_bt"],
    do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr", "q_start_ptr"],
)
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    k_cache_ptr,  # [KVH, num_blocks, PAGE, D]
    v_cache_ptr,
    k_scale_ptr,  # [KVH, num_blocks, PAGE] fp32 when HAS_SCALES (int8 cache), else unused
    v_scale_ptr,
    out_ptr,  # [T, H, D]
    block_tables_ptr,  # [B, max_blocks]
    seq_lens_ptr,  # [B]
    q_start_ptr,  # [B + 1]
    scale,
    window,  # 0 = none
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kh,
    stride_kb,
    stride_kt,
    stride_bt,
    stride_sh,
    stride_sb,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PAGE: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    mblock = tl.program_id(2)
    q_lo = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_start_ptr + seq + 1) - q_lo
    if mblock * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    kvh = head // GROUP

    m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, PAGE)
    m_ok = m < q_len
    d_ok = d < HEAD_DIM
    first_tok = q_lo.to(tl.int64)  # token x stride passes 2^31 in long chunks: a 64-bit scalar base
    q = tl.load(
        q_ptr + first_tok * stride_qt + m[:, None] * stride_qt + head * stride_qh + d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q_pos = context + m
    last = tl.minimum(context + (mblock + 1) * BLOCK_M, seq_len)  # keys past this are in nobody's view
    first = 0
    if window > 0:
        first = tl.maximum(context + mblock * BLOCK_M - window + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for page in range(first // PAGE, tl.cdiv(last, PAGE)):
        block = tl.load(block_tables_ptr + seq * stride_bt + page)
        k_pos = page * PAGE + t
        k, v = load_kv_page(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, kvh, block, t, d, d_ok,
            stride_kh, stride_kb, stride_kt, stride_sh, stride_sb, HAS_SCALES,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=DOT_PRECISION).to(tl.float32) * scale  # [BLOCK_M, PAGE]
        seen = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < seq_len)
        if window > 0:
            seen = seen & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet stay at zero
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION).to(tl.float32)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + first_tok * stride_ot + m[:, None] * stride_ot + head * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D]: the new tokens of every sequence, back to back
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B]: KV length after this step (cached + new)
    query_start_loc: torch.Tensor,  # [B + 1]
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    block_m: int = 16,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    t, h, d = q.shape
    kvh, _, page, _ = k_cache.shape
    check_shapes(h, kvh, page, q.dtype, kv_scales is not None, d)
    if block_m < MIN_TILE or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two of at least {MIN_TILE}, got {block_m}")
    out = torch.empty_like(q)
    block_d = max(MIN_TILE, triton.next_power_of_2(d))
    b = block_tables.shape[0]
    ks, vs = kv_scales if kv_scales is not None else (k_cache, v_cache)
    _prefill_kernel[(b, h, triton.cdiv(max_query_len, block_m))](
        q,
        k_cache,
        v_cache,
        ks,
        vs,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        ks.stride(0),
        ks.stride(1),
        GROUP=h // kvh,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        PAGE=page,
        HAS_SCALES=kv_scales is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        **launch_shape(q.dtype, page, block_d, kv_scales is not None),
    )
    return out
