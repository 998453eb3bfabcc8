"""Fused elementwise kernels: residual-add + RMSNorm, SiLU-and-mul, RoPE + KV-cache write.

Each saves round trips through memory that the unfused PyTorch ops make (the add writes a
tensor the norm reads back; gate and up are read, `silu(gate)` written and read again; the
rotated K is written then copied into the cache). The PyTorch implementations they are tested
against, with the same rounding points, are membound.layers' (norm, activation, rotary).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------- residual add + RMSNorm


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)  # rows x width passes 2^31 for long prefill chunks
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=ok, other=0.0)
    if HAS_RES:
        # Round the sum to the run dtype first, as `x + residual` in PyTorch does.
        x = (x.to(tl.float32) + tl.load(res_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    y = (xf * inv).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.contiguous().view(-1, x.shape[-1])
    rows, n = x2.shape
    out = torch.empty_like(x2)  # in x's dtype, whatever the weight's (Gemma's are fp32)
    res_out = torch.empty_like(x2) if residual is not None else x2
    res = residual.contiguous().view(-1, n) if residual is not None else x2
    _add_rmsnorm_kernel[(rows,)](
        x2, res, weight, out, res_out, n, eps, HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n)
    )
    return out.view(x.shape), res_out.view(x.shape)


# ---------------------------------------------------------------------- SiLU and mul


@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows x 2 x intermediate passes 2^31 at ~75K tokens (8B)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < n
    gate = tl.load(gu_ptr + row * 2 * n + col, mask=ok, other=0.0)
    up = tl.load(gu_ptr + row * 2 * n + n + col, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # PyTorch rounds silu's result before the multiply
    tl.store(out_ptr + row * n + col, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=ok)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gu = gate_up.contiguous().view(-1, gate_up.shape[-1])
    rows, n2 = gu.shape
    n = n2 // 2
    out = torch.empty(rows, n, dtype=gu.dtype, device=gu.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](gu, out, n, BLOCK=block)
    return out.view(*gate_up.shape[:-1], n)


# ---------------------------------------------------------------------- RoPE + KV-cache write


# Positions and slots are read one scalar per program; in the CUDA-graph buffers they are rows of one
# [4, max_batch] tensor, 16-byte aligned or not by max_batch: not specialised on, one variant.
@triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    k_scale_ptr, v_scale_ptr,
    stride_qt, stride_kt, stride_vt, stride_ch, stride_cs, stride_sh,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_SCALES: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t)
    i = tl.arange(0, BLOCK_HALF)
    h = tl.arange(0, BLOCK_H)
    i_ok = i < HALF
    cos = tl.load(cos_ptr + pos * HALF + i, mask=i_ok, other=0.0)
    sin = tl.load(sin_ptr + pos * HALF + i, mask=i_ok, other=0.0)

    # q: [H, D] as two halves; the model rounds cos/sin to the run dtype before multiplying.
    qm = (h[:, None] < NUM_HEADS) & i_ok[None, :]
    q1 = tl.load(q_ptr + t * stride_qt + h[:, None] * 2 * HALF + i[None, :], mask=qm, other=0.0)
    q2 = tl.load(q_ptr + t * stride_qt + h[:, None] * 2 * HALF + HALF + i[None, :], mask=qm, other=0.0)
    c = cos.to(q1.dtype).to(tl.float32)[None, :]
    s = sin.to(q1.dtype).to(tl.float32)[None, :]
    q1f, q2f = q1.to(tl.float32), q2.to(tl.float32)
    base = q_out_ptr + t * NUM_HEADS * 2 * HALF + h[:, None] * 2 * HALF + i[None, :]
    tl.store(base, (q1f * c - q2f * s).to(q1.dtype), mask=qm)
    tl.store(base + HALF, (q2f * c + q1f * s).to(q1.dtype), mask=qm)

    km = (h[:, None] < NUM_KV_HEADS) & i_ok[None, :]
    k1 = tl.load(k_ptr + t * stride_kt + h[:, None] * 2 * HALF + i[None, :], mask=km, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + t * stride_kt + h[:, None] * 2 * HALF + HALF + i[None, :], mask=km, other=0.0).to(tl.float32)
    # 64-bit: head * stride + slot * stride passes 2^31 elements in a large pool.
    dst = h.to(tl.int64)[:, None] * stride_ch + slot.to(tl.int64) * stride_cs + i[None, :]
    kd = k_cache_ptr.dtype.element_ty
    kr1 = (k1 * c - k2 * s).to(q1.dtype)
    kr2 = (k2 * c + k1 * s).to(q1.dtype)
    v1 = tl.load(v_ptr + t * stride_vt + h[:, None] * 2 * HALF + i[None, :], mask=km, other=0.0)
    v2 = tl.load(v_ptr + t * stride_vt + h[:, None] * 2 * HALF + HALF + i[None, :], mask=km, other=0.0)
    if HAS_SCALES:
        # int8 with one scale per (token, head), the same arithmetic as torch_paged.quantize_int8.
        kr1, kr2, v1, v2 = kr1.to(tl.float32), kr2.to(tl.float32), v1.to(tl.float32), v2.to(tl.float32)
        k_s = tl.maximum(tl.maximum(tl.max(tl.abs(kr1), 1), tl.max(tl.abs(kr2), 1)), 1e-8) / 127.0
        v_s = tl.maximum(tl.maximum(tl.max(tl.abs(v1), 1), tl.max(tl.abs(v2), 1)), 1e-8) / 127.0
        h_ok = h < NUM_KV_HEADS
        s_dst = h.to(tl.int64) * stride_sh + slot.to(tl.int64)
        tl.store(k_scale_ptr + s_dst, k_s, mask=h_ok)
        tl.store(v_scale_ptr + s_dst, v_s, mask=h_ok)
        kr1 = tl.clamp(tl.floor(kr1 / k_s[:, None] + 0.5), -127.0, 127.0)
        kr2 = tl.clamp(tl.floor(kr2 / k_s[:, None] + 0.5), -127.0, 127.0)
        v1 = tl.clamp(tl.floor(v1 / v_s[:, None] + 0.5), -127.0, 127.0)
        v2 = tl.clamp(tl.floor(v2 / v_s[:, None] + 0.5), -127.0, 127.0)
    tl.store(k_cache_ptr + dst, kr1.to(kd), mask=km)
    tl.store(k_cache_ptr + dst + HALF, kr2.to(kd), mask=km)
    tl.store(v_cache_ptr + dst, v1.to(kd), mask=km)
    tl.store(v_cache_ptr + dst + HALF, v2.to(kd), mask=km)


def rope_write_kv(
    q, k, v, cos_table, sin_table, positions, k_cache, v_cache, slot_mapping, kv_scales=None
) -> torch.Tensor:
    """q, k, v: [T, heads, D] (views of the fused qkv output are fine: rows may be strided).
    kv_scales: for an int8 cache, its per-(token, head) scales [KVH, num_blocks, block_size]."""
    t, h, d = q.shape
    kvh = k.shape[1]
    half = d // 2
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(2) != 1 or x.stride(1) != d:
            raise ValueError(f"{name} must have contiguous heads ([T, heads, D] rows), got strides {x.stride()}")
    q_out = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    # Slots index the flattened [blocks * block_size] axis of each head's cache.
    ks, vs = kv_scales if kv_scales is not None else (k_cache, v_cache)
    _rope_write_kv_kernel[(t,)](
        q, k, v, cos_table, sin_table, positions, slot_mapping, q_out, k_cache, v_cache, ks, vs,
        q.stride(0), k.stride(0), v.stride(0), k_cache.stride(0), k_cache.stride(2), ks.stride(0),
        NUM_HEADS=h, NUM_KV_HEADS=kvh, HALF=half,
        BLOCK_H=triton.next_power_of_2(max(h, kvh)), BLOCK_HALF=triton.next_power_of_2(half),
        HAS_SCALES=kv_scales is not None,
    )  # fmt: skip
    return q_out
