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
Each regime runs one fixed config (`_plan`), not an autotuner: tuning per new shape would
benchmark (and compile) mid-serving, or inside a CUDA-graph capture. So the compiled variants
are few and known, and the engine compiles all of them at start-up (`warmup_rows`). In Triton's
interpreter (CPU tests) each regime runs a smaller config.
"""

from __future__ import annotations

import dataclasses
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


# M and the element count change with the batch: not specialised on, so a new batch size never
# compiles a new variant. The split range is fixed per layer and stays specialised: knowing it is a
# multiple of 16 lets the compiler issue 16-byte weight loads.
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


@triton.jit(do_not_specialize=["M"])
def _dot_kernel(
    x_ptr,  # [M, K]
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,  # [M, N] in x's dtype, or [splits, M, N] fp32 partial sums
    M, N, K, KW, kw_per_split, num_groups,
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


@triton.jit(do_not_specialize=["numel", "splits"])
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


@dataclasses.dataclass(frozen=True)
class _Config:
    blocks: dict  # BLOCK_N, BLOCK_K (and BLOCK_M for the dot kernel)
    num_warps: int = 4
    num_stages: int = 3


# Compiled (CUDA): Hopper-sized tiles, one per regime (each compiles for sm_90a without spills,
# checked by tests/test_sm90_compile.py). Interpreter: small tiles, so CPU tests stay fast yet
# cover ragged tiles, chunks holding several groups and groups spanning several chunks.
_GPU_CONFIGS = {  # picked from a spill-free sweep (int4 g32/g128, int8 g16/g32 +-zero, per channel)
    "gemv": _Config({"BLOCK_N": 16, "BLOCK_K": 256}, 4, 3),
    "skinny": _Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 3),  # 2 <= M <= 16: one row tile
    "prefill_small": _Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 8, 3),  # 17 <= M <= 64
    "prefill": _Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, 8, 3),
}
_CPU_CONFIGS = {
    "gemv": _Config({"BLOCK_N": 16, "BLOCK_K": 64}),
    "skinny": _Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}),
    "prefill_small": _Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64}),
    "prefill": _Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64}),
}
_CPU_TARGET_PROGRAMS = 8
_H100_SMS = 132  # the compile check (meta tensors) plans for an H100/H200


def _regime(m: int) -> str:
    if m == 1:
        return "gemv"
    if m <= 16:
        return "skinny"
    return "prefill_small" if m <= 64 else "prefill"


def warmup_rows(max_rows: int) -> list[int]:
    """One row count per regime up to max_rows: running them compiles every variant a layer can hit."""
    return [m for m in (1, 2, 17, 65) if m <= max_rows]


@functools.cache
def _cuda_programs(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    # A few programs per SM keep enough loads in flight to cover HBM latency.
    if _INTERPRET:
        return _CPU_TARGET_PROGRAMS
    return 4 * (_H100_SMS if device.type == "meta" else _cuda_programs(device.index or 0))


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
    # meta tensors: the sm_90a compile check, which compiles what a CUDA launch would.
    if x.device.type not in ("cuda", "meta") and not _INTERPRET:
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
    has_zero = zero is not None
    z = zero if has_zero else scale  # a valid pointer the kernel never reads
    common = dict(INT4=int4, HAS_ZERO=has_zero, PER_CHANNEL=not int4 and group_size == k, GROUP=group_size)
    strides = (w.stride(0), scale.stride(0), scale.stride(1), z.stride(0), z.stride(1))
    regime = _regime(m)
    cfg = (_CPU_CONFIGS if _INTERPRET else _GPU_CONFIGS)[regime]
    tiles = dict(cfg.blocks, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    cols_per_byte = 2 if int4 else 1
    kw = k // cols_per_byte
    splits, per = 1, k  # prefill has M / BLOCK_M row tiles to spread over the SMs
    if regime in ("gemv", "skinny"):
        k_step = cfg.blocks["BLOCK_K"]  # a split's K range walks whole chunks
        if split_k is not None:
            steps = triton.cdiv(k, k_step)
            per = triton.cdiv(steps, max(1, min(split_k, steps))) * k_step
            splits = triton.cdiv(k, per)
        else:
            splits, per = _split_k(triton.cdiv(n, cfg.blocks["BLOCK_N"]), k, k_step, _target_programs(x.device))
    if regime == "gemv":
        out = y if splits == 1 else torch.empty(splits, n, dtype=torch.float32, device=x.device)
        _gemv_kernel[(triton.cdiv(n, cfg.blocks["BLOCK_N"]), splits)](
            x, w, scale, z, out, n, k, kw, per // cols_per_byte, k // group_size, *strides, **common, **tiles
        )
    else:
        precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 in, fp32 products: no TF32 rounding
        out = y if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(m, cfg.blocks["BLOCK_M"]) * triton.cdiv(n, cfg.blocks["BLOCK_N"]), splits)
        _dot_kernel[grid](
            x, w, scale, z, out, m, n, k, kw, per // cols_per_byte, k // group_size, x.stride(0), *strides,
            **common, DOT_PRECISION=precision, GROUP_M=8, **tiles,
        )  # fmt: skip
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
    shape and the number of SMs (fixed per layer, so it adds no compiled variant).
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
