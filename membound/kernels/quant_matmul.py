"""Fused dequantize-and-multiply kernels for weight-only int4 and int8 linear layers, in Triton.

Decode is bandwidth-bound: one token multiplies every weight once, so a step costs the time to
read the weights. Reading 4-bit or 8-bit weights moves 4x or 2x fewer bytes than bf16, but only
if the kernel reads the packed weight itself; dequantizing to bf16 first (what
`QuantLinear.forward` does off the CPU kernels) writes and reads a bf16 copy and is slower
than plain bf16. These kernels load the packed tile, turn it into numbers in registers and
multiply there; the dequantized weight never exists in memory.

Layouts (those of `membound.quant.linear`):
- int4: `packed` [N, K/2] uint8; byte j of row n holds q[n, 2j] in its low nibble and
  q[n, 2j+1] in its high nibble, q in 0..15; `scale`, `zero` [N, K/group]:
  w[n, k] = (q[n, k] - 8) * scale[n, k // group] + zero[n, k // group].
- int8: `qweight` [N, K] int8; `scale` [N, K/group], `zero` the same or None:
  w = q * scale (+ zero). group == K is one scale per output channel.
y = x @ w.T for x [M, K] (fp16, bf16 or fp32), accumulated in fp32, returned in x's dtype.

Two regimes:
- M == 1 (batch-1 decode): `_gemv_kernel`, on CUDA cores. A program owns BLOCK_N output rows
  and walks K, loading x once per K chunk for all its rows; when N gives too few programs to
  fill the GPU, K is split too (partial sums in fp32, added by `_sum_splits_kernel`).
- M > 1: `_dot_kernel`, tiles through tl.dot with the weight tile dequantized in registers to
  x's dtype (int4: the low nibbles meet x's even columns and the high nibbles its odd ones, two
  dots, so the weight is never interleaved). For 2 <= M <= 16 (batched decode) M is padded to
  one 16-row tile and K is split like the GEMV's; above that it is a tiled GEMM (prefill).
On CUDA each kernel autotunes over a few configs; in Triton's interpreter (CPU tests) each runs
one fixed small config.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

INT4_GROUP_SIZES = (16, 32, 64, 128, 256)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# ---------------------------------------------------------------------- PyTorch references


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] uint8 values in 0..15 (low nibble first)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _expand_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    return t.float().repeat_interleave(group_size, dim=1)


def int4_matmul_ref(x, packed, scale, zero, group_size) -> torch.Tensor:
    """Dequantize to fp32, multiply in fp32, return in x's dtype."""
    q = int4_unpack(packed).float()
    w = (q - 8) * _expand_groups(scale, group_size) + _expand_groups(zero, group_size)
    return (x.float() @ w.T).to(x.dtype)


def int8_matmul_ref(x, qweight, scale, zero, group_size) -> torch.Tensor:
    w = qweight.float() * _expand_groups(scale, group_size)
    if zero is not None:
        w = w + _expand_groups(zero, group_size)
    return (x.float() @ w.T).to(x.dtype)


# ---------------------------------------------------------------------- kernels


@triton.jit
def _apply_groups(v, s, z, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr):
    """v [BLOCK_N, NG * GW] of q values; s, z [BLOCK_N, NG]: column block g uses s[:, g], z[:, g]."""
    if NG == 1:
        out = v * s
        if HAS_ZERO:
            out += z
    else:
        v3 = tl.reshape(v, (BLOCK_N, NG, GW)) * s[:, :, None]
        if HAS_ZERO:
            v3 += z[:, :, None]
        out = tl.reshape(v3, (BLOCK_N, NG * GW))
    return out


@triton.jit
def _load_groups(
    s_ptr, z_ptr, rows, row_ok, k0, num_groups, stride_sn, stride_sg, stride_zn, stride_zg,
    HAS_ZERO: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr,
):  # fmt: skip
    """Scales and zeros [BLOCK_N, NG] of the groups that the K chunk starting at k0 covers."""
    g = k0 // GROUP + tl.arange(0, NG)
    ok = row_ok[:, None] & (g < num_groups)[None, :]
    s = tl.load(s_ptr + rows[:, None] * stride_sn + g[None, :] * stride_sg, mask=ok, other=0.0).to(tl.float32)
    z = s
    if HAS_ZERO:
        z = tl.load(z_ptr + rows[:, None] * stride_zn + g[None, :] * stride_zg, mask=ok, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _gemv_kernel(
    x_ptr,  # [K] (M == 1)
    w_ptr,  # int4: [N, K/2] uint8; int8: [N, K] int8
    s_ptr,
    z_ptr,  # [N, K/GROUP] (unused without HAS_ZERO)
    out_ptr,  # [N] in x's dtype, or [splits, N] fp32 partial sums
    N, K, KW, kw_per_split, num_groups,  # KW, kw_per_split: in stored columns (bytes for int4)
    stride_wn, stride_sn, stride_sg, stride_zn, stride_zg,
    INT4: tl.constexpr, HAS_ZERO: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Stored columns per K chunk: int4 holds two columns per byte.
    W: tl.constexpr = BLOCK_K // 2 if INT4 else BLOCK_K
    # Groups per chunk: a chunk holds several whole groups, or sits inside one.
    NG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, W)
    kk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    # The loop walks stored columns so the compiler sees 16-aligned offsets and issues 16-byte loads.
    kw_start = split * kw_per_split
    kw_end = tl.minimum(kw_start + kw_per_split, KW)
    # A 2-D accumulator: the cross-thread sum over K happens once, after the loop.
    acc = tl.zeros([BLOCK_N, W], dtype=tl.float32)
    xsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for kw0 in range(kw_start, kw_end, W):
        kw = kw0 + cols
        wt = tl.load(w_rows + kw[None, :], mask=row_ok[:, None] & (kw < KW)[None, :], other=0)
        k0 = 2 * kw0 if INT4 else kw0
        xk = k0 + kk
        xv = tl.load(x_ptr + xk, mask=xk < K, other=0.0).to(tl.float32)
        if INT4:
            # Low nibbles are x's even columns and high nibbles its odd ones: multiply each half
            # by its columns of x (split in registers) instead of interleaving the weight.
            xe, xo = tl.split(tl.reshape(xv, (W, 2)))
            lo = (wt & 0xF).to(tl.float32) - 8.0
            hi = (wt >> 4).to(tl.float32) - 8.0
            s, z = _load_groups(s_ptr, z_ptr, rows, row_ok, k0, num_groups, stride_sn, stride_sg, stride_zn,
                                stride_zg, HAS_ZERO, GROUP, NG)  # fmt: skip
            lo = _apply_groups(lo, s, z, HAS_ZERO, BLOCK_N, NG, W // NG)
            hi = _apply_groups(hi, s, z, HAS_ZERO, BLOCK_N, NG, W // NG)
            acc += lo * xe[None, :] + hi * xo[None, :]
        else:
            q = wt.to(tl.float32)
            if PER_CHANNEL:
                xsum += xv  # the scale comes out of the sum: applied once, after the loop
            else:
                s, z = _load_groups(s_ptr, z_ptr, rows, row_ok, k0, num_groups, stride_sn, stride_sg, stride_zn,
                                    stride_zg, HAS_ZERO, GROUP, NG)  # fmt: skip
                q = _apply_groups(q, s, z, HAS_ZERO, BLOCK_N, NG, W // NG)
            acc += q * xv[None, :]
    y = tl.sum(acc, 1)
    if PER_CHANNEL:
        y *= tl.load(s_ptr + rows * stride_sn, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_ZERO:
            y += tl.load(z_ptr + rows * stride_zn, mask=row_ok, other=0.0).to(tl.float32) * tl.sum(xsum, 0)
    tl.store(out_ptr + split * N + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _dot_kernel(
    x_ptr,  # [M, K]
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,  # [M, N] in x's dtype, or [splits, M, N] fp32 partial sums
    M, N, K, KW, kw_per_split, num_groups, m_bucket,  # m_bucket: only an autotune key (M rounded up)
    stride_xm, stride_wn, stride_sn, stride_sg, stride_zn, stride_zg,
    INT4: tl.constexpr, HAS_ZERO: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    W: tl.constexpr = BLOCK_K // 2 if INT4 else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    # Tile order: GROUP_M row tiles of x run next to each other over the same weight tiles,
    # so a weight tile read from HBM is reused from L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_band = GROUP_M * num_n
    first_m = (pid // per_band) * GROUP_M
    band_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % band_m
    pid_n = (pid % per_band) // band_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    row_ok = rows < N
    kk = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, W)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    kw_start = split * kw_per_split
    kw_end = tl.minimum(kw_start + kw_per_split, KW)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    xsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for kw0 in range(kw_start, kw_end, W):
        kw = kw0 + cols
        wt = tl.load(w_rows + kw[None, :], mask=row_ok[:, None] & (kw < KW)[None, :], other=0)
        k0 = 2 * kw0 if INT4 else kw0
        xk = k0 + kk
        xt = tl.load(x_rows + xk[None, :], mask=m_ok[:, None] & (xk < K)[None, :], other=0.0)
        if INT4:
            lo = (wt & 0xF).to(tl.float32) - 8.0
            hi = (wt >> 4).to(tl.float32) - 8.0
            s, z = _load_groups(s_ptr, z_ptr, rows, row_ok, k0, num_groups, stride_sn, stride_sg, stride_zn,
                                stride_zg, HAS_ZERO, GROUP, NG)  # fmt: skip
            lo = _apply_groups(lo, s, z, HAS_ZERO, BLOCK_N, NG, W // NG).to(xt.dtype)
            hi = _apply_groups(hi, s, z, HAS_ZERO, BLOCK_N, NG, W // NG).to(xt.dtype)
            # x's even columns meet the low nibbles, its odd columns the high ones: x is loaded as
            # one contiguous tile and split in registers; the weight is never interleaved.
            xe, xo = tl.split(tl.reshape(xt, (BLOCK_M, W, 2)))
            acc = tl.dot(xe, tl.trans(lo), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(xo, tl.trans(hi), acc, input_precision=DOT_PRECISION)
        else:
            if PER_CHANNEL:
                w = wt.to(xt.dtype)  # |q| <= 127 is exact in fp16/bf16; the scale is applied after the loop
                xsum += tl.sum(xt.to(tl.float32), 1)
            else:
                s, z = _load_groups(s_ptr, z_ptr, rows, row_ok, k0, num_groups, stride_sn, stride_sg, stride_zn,
                                    stride_zg, HAS_ZERO, GROUP, NG)  # fmt: skip
                w = _apply_groups(wt.to(tl.float32), s, z, HAS_ZERO, BLOCK_N, NG, W // NG).to(xt.dtype)
            acc = tl.dot(xt, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if PER_CHANNEL:
        acc *= tl.load(s_ptr + rows * stride_sn, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_ZERO:
            zc = tl.load(z_ptr + rows * stride_zn, mask=row_ok, other=0.0).to(tl.float32)
            acc += xsum[:, None] * zc[None, :]
    out = out_ptr + split * M * N + rm.to(tl.int64)[:, None] * N + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, numel, splits, BLOCK: tl.constexpr):
    """out = sum over splits of part [splits, numel] (fp32), in out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(part_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# Triton picks its interpreter (TRITON_INTERPRET=1) when a kernel is decorated.
_INTERPRET = not isinstance(_gemv_kernel, triton.runtime.JITFunction)

# ---------------------------------------------------------------------- configs

# CUDA: a short autotune per shape over a few Hopper-sized configs (all compile for sm_90
# without spills). The number of K splits is fixed before tuning, from a nominal tile width,
# and a split's K range is a multiple of the largest BLOCK_K of its list, so every config
# walks whole chunks and the partial-sum buffer has one size.
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
    for bn, bk, nw, ns in [(16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 8, 3), (64, 256, 8, 3), (16, 1024, 8, 2),
                           (8, 1024, 4, 2)]
]  # fmt: skip
_GEMV_NOMINAL_N, _GEMV_K_STEP = 32, 1024  # split choice assumes 32-row tiles; K splits are multiples of 1024
_SKINNY_CONFIGS = [  # 2 <= M <= 16: one 16-row tile of x; weight tiles as in the GEMV, plus tl.dot
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
    for bn, bk, nw, ns in [(32, 128, 4, 4), (64, 128, 4, 3), (64, 256, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3)]
]
_SKINNY_NOMINAL_N, _SKINNY_K_STEP = 64, 256
_PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
    for bm, bn, bk, nw, ns in [(64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
                               (128, 128, 128, 8, 3)]
]  # fmt: skip

_gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["N", "K", "kw_per_split"])(_gemv_kernel)
_skinny_tuned = triton.autotune(_SKINNY_CONFIGS, key=["N", "K", "kw_per_split"])(_dot_kernel)
_prefill_tuned = triton.autotune(_PREFILL_CONFIGS, key=["m_bucket", "N", "K"])(_dot_kernel)

# Interpreter: one small config per kernel, so CPU tests stay fast yet cover ragged tiles,
# chunks holding several groups and groups spanning several chunks.
_CPU_GEMV = {"BLOCK_N": 16, "BLOCK_K": 64}
_CPU_SKINNY = {"BLOCK_N": 16, "BLOCK_K": 64}
_CPU_PREFILL = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64}
_CPU_TARGET_PROGRAMS = 8


@functools.cache
def _target_programs(device_index: int) -> int:
    # A few programs per SM keep enough loads in flight to cover HBM latency.
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(tiles: int, K: int, k_step: int, target: int) -> tuple[int, int]:
    """(splits, K per split): enough splits that tiles x splits reaches the target, in whole k_steps."""
    steps = triton.cdiv(K, k_step)
    splits = max(1, min(steps, triton.cdiv(target, tiles)))
    per = triton.cdiv(steps, splits)
    return triton.cdiv(steps, per), per * k_step


# ---------------------------------------------------------------------- validation and launch


def _check(name, x, w, scale, zero, group_size, int4: bool) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name}: x must be a 2-D tensor [M, K], got shape {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name}: x must be float16, bfloat16 or float32, got {x.dtype}")
    m, k = x.shape
    wname = "packed" if int4 else "qweight"
    wdtype = torch.uint8 if int4 else torch.int8
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{name}: {wname} must be a 2-D tensor [N, {'K/2' if int4 else 'K'}]")
    if w.dtype != wdtype:
        raise ValueError(f"{name}: {wname} must be {wdtype}, got {w.dtype}")
    if int4 and k % 2:
        raise ValueError(f"{name}: K must be even for int4 (two values per byte), got K={k}")
    n = w.shape[0]
    if w.shape[1] != (k // 2 if int4 else k):
        want = f"[N, {k // 2}] (K/2)" if int4 else f"[N, {k}]"
        raise ValueError(f"{name}: {wname} shape {tuple(w.shape)} does not match x's K={k}: expected {want}")
    if w.stride(1) != 1 and w.shape[1] > 1:
        raise ValueError(f"{name}: {wname} must be contiguous along K")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{name}: group_size must be a positive int, got {group_size!r}")
    if int4 and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{name}: group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if not int4 and group_size != k and (group_size < 16 or group_size & (group_size - 1)):
        raise ValueError(f"{name}: group_size must be a power of two >= 16, or K ({k}) for per-channel")
    if k % group_size:
        raise ValueError(f"{name}: group_size {group_size} does not divide K={k}")
    groups = k // group_size
    for tname, t in (("scale", scale), ("zero", zero)):
        if t is None:
            if tname == "scale" or int4:
                raise ValueError(f"{name}: {tname} is required")
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
            raise ValueError(f"{name}: {tname} must be a float16, bfloat16 or float32 tensor")
        if tuple(t.shape) != (n, groups):
            raise ValueError(f"{name}: {tname} shape {tuple(t.shape)} must be [N, K/group_size] = [{n}, {groups}]")
    devices = {t.device for t in (x, w, scale, zero) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"{name}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return m, n, k


def _launch(x, w, scale, zero, group_size, int4: bool, split_k: int | None) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    x = x.contiguous()
    per_channel = not int4 and group_size == k
    has_zero = zero is not None
    z = zero if has_zero else scale  # a valid pointer the kernel never reads
    tuned = x.device.type == "cuda" and not _INTERPRET
    common = dict(INT4=int4, HAS_ZERO=has_zero, PER_CHANNEL=per_channel, GROUP=group_size)
    strides = (w.stride(0), scale.stride(0), scale.stride(1), z.stride(0), z.stride(1))
    target = _target_programs(x.device.index or 0) if tuned else _CPU_TARGET_PROGRAMS
    groups = k // group_size
    cols_per_byte = 2 if int4 else 1
    kw = k // cols_per_byte

    def splits_for(nominal_n, k_step):
        if split_k is not None:
            s = max(1, min(split_k, triton.cdiv(k, k_step)))
            per = triton.cdiv(triton.cdiv(k, k_step), s) * k_step
            return triton.cdiv(k, per), per
        return _split_k(triton.cdiv(n, nominal_n), k, k_step, target)

    if m == 1:
        nominal, k_step = (_GEMV_NOMINAL_N, _GEMV_K_STEP) if tuned else (_CPU_GEMV["BLOCK_N"], _CPU_GEMV["BLOCK_K"])
        splits, per = splits_for(nominal, k_step)
        out = y if splits == 1 else torch.empty(splits, n, dtype=torch.float32, device=x.device)
        args = (x, w, scale, z, out, n, k, kw, per // cols_per_byte, groups, *strides)
        if tuned:
            _gemv_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)](*args, **common)
        else:
            _gemv_kernel[(triton.cdiv(n, _CPU_GEMV["BLOCK_N"]), splits)](*args, **common, **_CPU_GEMV)
    else:
        precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 in, fp32 products: no TF32 rounding
        common.update(DOT_PRECISION=precision, GROUP_M=8)
        m_bucket = min(triton.next_power_of_2(m), 4096)
        skinny = m <= 16
        splits, per = 1, k  # prefill has M / BLOCK_M row tiles to spread over the SMs
        if skinny:
            nominal, k_step = (
                (_SKINNY_NOMINAL_N, _SKINNY_K_STEP) if tuned else (_CPU_SKINNY["BLOCK_N"], _CPU_SKINNY["BLOCK_K"])
            )
            splits, per = splits_for(nominal, k_step)
        out = y if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        args = (x, w, scale, z, out, m, n, k, kw, per // cols_per_byte, groups, m_bucket, x.stride(0), *strides)

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), splits)

        if tuned and skinny:
            _skinny_tuned[grid](*args, **common, BLOCK_M=16)
        elif tuned:
            _prefill_tuned[grid](*args, **common)
        else:
            cfg = {"BLOCK_M": 16, **_CPU_SKINNY} if skinny else _CPU_PREFILL
            _dot_kernel[grid(cfg)](*args, **common, **cfg)
    if splits > 1:
        numel = m * n
        _sum_splits_kernel[(triton.cdiv(numel, 1024),)](out, y, numel, splits, BLOCK=1024)
    return y


def int4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x @ w.T with w the int4 weight of `Int4Linear` (see the module docstring for the layout).

    split_k forces the number of K splits for M <= 16 (tests); by default it is chosen from the
    shape and the number of SMs.
    """
    _check("int4_matmul", x, packed, scale, zero, group_size, int4=True)
    return _launch(x, packed, scale, zero, group_size, True, split_k)


def int8_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x @ w.T with w = qweight * scale (+ zero) per group of input features (group_size == K: per channel)."""
    _check("int8_matmul", x, qweight, scale, zero, group_size, int4=False)
    return _launch(x, qweight, scale, zero, group_size, False, split_k)
