"""Paged decode attention in Triton, split along the KV length (flash-decoding), GQA-aware.

One program handles one (sequence, KV head, split): it loads the query heads that share
that KV head as one [G, D] tile, so each KV block is read once for all of them, walks its
share of the sequence's pages through the block table with an online softmax, and writes
a partial output and its log-sum-exp. A second kernel merges the splits. Splitting lets a
single long sequence use many SMs. The PyTorch reference is
`membound.attention.torch_paged.decode_attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def load_kv_page(
    k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, kvh, block, t, d, d_ok,
    stride_kh, stride_kb, stride_kt, stride_sh, stride_sb, HAS_SCALES: tl.constexpr,
):  # fmt: skip
    """One KV head's [PAGE, D] tiles of K and V from a cache block; int8 codes come back times
    their per-token scales (fp32). Shared by the decode and prefill kernels.

    Offsets are 64-bit: one layer's pool passes 2^31 elements on a large GPU (an int8 cache of a
    1-3B model at 0.9 utilization), and int32 `block * stride` would wrap to the wrong memory."""
    kvh = kvh.to(tl.int64)
    block = block.to(tl.int64)
    offs = kvh * stride_kh + block * stride_kb + t[:, None] * stride_kt + d[None, :]
    k = tl.load(k_cache_ptr + offs, mask=d_ok[None, :], other=0.0)
    v = tl.load(v_cache_ptr + offs, mask=d_ok[None, :], other=0.0)
    if HAS_SCALES:
        s_offs = kvh * stride_sh + block * stride_sb + t
        k = k.to(tl.float32) * tl.load(k_scale_ptr + s_offs)[:, None]
        v = v.to(tl.float32) * tl.load(v_scale_ptr + s_offs)[:, None]
    return k, v


# Runtime values that change from step to step are not specialised on (Triton would otherwise
# compile a variant per value class: == 1, divisible by 16, or pointer alignment), so serving
# never compiles after the start-up warm-up.
@triton.jit(
    do_not_specialize=["window", "stride_bt", "num_splits"],
    do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr"],
)
def _decode_split_kernel(
    q_ptr,  # [B, H, D]
    k_cache_ptr,  # [KVH, num_blocks, block_size, D]
    v_cache_ptr,
    k_scale_ptr,  # [KVH, num_blocks, block_size] fp32 when HAS_SCALES (int8 cache), else unused
    v_scale_ptr,
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    part_out_ptr,  # [B, H, S, D] fp32
    part_lse_ptr,  # [B, H, S] fp32
    scale,
    window,  # sliding window (tokens) or 0 for none
    num_splits,  # splits of each sequence's pages (a runtime value: one compiled variant for all)
    stride_qb,
    stride_qh,
    stride_kh,
    stride_kb,
    stride_kt,
    stride_bt,
    stride_sh,
    stride_sb,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # GROUP padded (>= 16 so tl.dot has a legal shape on GPUs)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,  # tokens per KV block
    HAS_SCALES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 (no TF32 rounding), else ignored
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, PAGE)
    heads = kvh * GROUP + g
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    first_valid = 0
    if window > 0:
        first_valid = tl.maximum(seq_len - window, 0)
    num_pages = tl.cdiv(seq_len, PAGE)
    # Each sequence divides its own pages among the splits: a short sequence in a batch padded to
    # a long block table (or in a CUDA graph captured for max_model_len) still uses every split.
    pages_per_split = tl.cdiv(num_pages, num_splits)
    start = tl.maximum(split * pages_per_split, first_valid // PAGE)
    stop = tl.minimum((split + 1) * pages_per_split, num_pages)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for page in range(start, stop):
        block = tl.load(block_tables_ptr + b * stride_bt + page)
        pos = page * PAGE + t
        k, v = load_kv_page(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, kvh, block, t, d, d_ok,
            stride_kh, stride_kb, stride_kt, stride_sh, stride_sb, HAS_SCALES,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=DOT_PRECISION).to(tl.float32) * scale  # [G, PAGE]
        valid = (pos < seq_len) & (pos >= first_valid)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION).to(tl.float32)
        m_i = m_new

    has = l_i > 0
    out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    part = (b * tl.num_programs(1) * GROUP + heads) * num_splits + split
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + part, lse, mask=g_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_out_ptr,  # [B * H, S, D]
    part_lse_ptr,  # [B * H, S]
    out_ptr,  # [B, H, D]
    num_splits,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # MAX_SPLITS: one variant whatever the split count
):
    row = tl.program_id(0)  # b * H + h
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    d_ok = d < HEAD_DIM
    lse = tl.load(part_lse_ptr + row * num_splits + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_ok, tl.exp(lse - m), 0.0)
    o = tl.load(
        part_out_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    b = row // NUM_HEADS
    h = row % NUM_HEADS
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


MAX_SPLITS = 32
MIN_TILE = 16  # tl.dot needs M, N and K of at least 16 on NVIDIA GPUs


def choose_num_splits(batch: int, num_kv_heads: int, max_pages: int, target_programs: int = 256) -> int:
    """Enough splits that batch x KV heads x splits fills the GPU, never more than the pages nor
    MAX_SPLITS; a power of two, so the partial buffers take few distinct sizes."""
    want = min(max_pages, MAX_SPLITS, math.ceil(target_programs / max(1, batch * num_kv_heads)))
    return 1 << max(0, want.bit_length() - 1)


MAX_PAGE = 128
MAX_PAGE_FP32_INT8 = 64  # fp32 queries over an int8 cache spill registers at 128-token pages


MAX_HEAD_DIM_FP32 = 128  # wider fp32 heads spill registers on sm_90a (tests/sm90_compile.py)


def check_shapes(
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    dtype: torch.dtype | None = None,
    int8_kv: bool = False,
    head_dim: int | None = None,
) -> None:
    """What both attention kernels can run (each variant compiles for sm_90a without spills,
    tests/test_sm90_compile.py); the engine calls this at start-up and reports a ConfigError."""
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if block_size < MIN_TILE or block_size > MAX_PAGE or block_size & (block_size - 1):
        raise ValueError(
            f"the Triton attention kernels need block_size 16, 32, 64 or 128 (a power of two: tl.dot "
            f"tiles on NVIDIA GPUs are at least {MIN_TILE} wide), got {block_size}"
        )
    if dtype == torch.float32 and head_dim is not None and head_dim > MAX_HEAD_DIM_FP32:
        raise ValueError(
            f"float32 with head_dim {head_dim} (> {MAX_HEAD_DIM_FP32}) does not run on the Triton attention "
            "kernels (its tiles spill registers); use bfloat16 or float16, or attention_backend='torch'"
        )
    if dtype == torch.float32 and int8_kv and block_size > MAX_PAGE_FP32_INT8:
        raise ValueError(
            f"float32 with an int8 KV cache runs on the Triton kernels with block_size <= {MAX_PAGE_FP32_INT8}, "
            f"got {block_size}; use a smaller block_size, or bfloat16"
        )


def launch_shape(dtype: torch.dtype, page: int, block_d: int, int8_kv: bool) -> dict:
    """num_warps / num_stages of both attention kernels: 8 warps once a [PAGE, D] tile holds 8K
    elements (or fp32, whose full-precision dots hold more registers), so no variant spills."""
    if block_d > 128:  # head_dim 256 (Gemma 3): fewer stages, so the K and V pages fit shared memory
        return _wide_launch_shape(dtype, page, block_d, int8_kv)
    if dtype == torch.float32:  # stages from the compile check's sweep: the only spill-free choice
        if int8_kv:
            return {"num_warps": 8, "num_stages": 1 if page >= 32 else 3}
        return {"num_warps": 8, "num_stages": 2 if (page, block_d) == (128, 64) else 3}
    return {"num_warps": 8 if page * block_d >= 8192 else 4, "num_stages": 3}


SHARED_BUDGET = 200 * 1024  # of the H100/H200's 227 KiB per block: room for the rest of the kernel


def _wide_launch_shape(dtype: torch.dtype, page: int, block_d: int, int8_kv: bool) -> dict:
    """Each pipeline stage holds a K and a V page ([PAGE, D] each) in shared memory."""
    elt = 1 if int8_kv else torch.empty((), dtype=dtype).element_size()
    per_stage = 2 * page * block_d * elt
    stages = max(1, min(2 if int8_kv else 3, SHARED_BUDGET // per_stage))
    return {"num_warps": 8, "num_stages": stages}


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee"); tensor cores would round them to TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [KVH, num_blocks, block_size, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32 (each >= 1)
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    b, h, d = q.shape
    kvh, _, page, _ = k_cache.shape
    check_shapes(h, kvh, page, q.dtype, kv_scales is not None, d)
    q = q.contiguous()
    max_pages = block_tables.shape[1]
    splits = num_splits or choose_num_splits(b, kvh, max_pages)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {splits}")
    group = h // kvh
    part_out = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    block_d = max(MIN_TILE, triton.next_power_of_2(d))
    ks, vs = kv_scales if kv_scales is not None else (k_cache, v_cache)
    _decode_split_kernel[(b, kvh, splits)](
        q,
        k_cache,
        v_cache,
        ks,
        vs,
        block_tables,
        seq_lens,
        part_out,
        part_lse,
        scale,
        sliding_window or 0,
        splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        ks.stride(0),
        ks.stride(1),
        GROUP=group,
        BLOCK_G=max(MIN_TILE, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        PAGE=page,
        HAS_SCALES=kv_scales is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        **launch_shape(q.dtype, page, block_d, kv_scales is not None),
    )
    out = torch.empty_like(q)
    _merge_splits_kernel[(b * h,)](
        part_out,
        part_lse,
        out,
        splits,
        out.stride(0),
        out.stride(1),
        NUM_HEADS=h,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_S=MAX_SPLITS,
    )
    return out
