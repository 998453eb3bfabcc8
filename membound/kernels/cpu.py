"""Python side of the fused CPU ops (cpu_ops.c, built by `pip install` as `_cpu_ops` when a C compiler
is there). Each function checks that its inputs are the case the C code handles (bf16, on the CPU,
the layouts below) and otherwise returns None, so the caller runs its PyTorch version; membound's
layers (membound/layers) and PyTorch attention hold those versions, which the tests compare against.
"""

from __future__ import annotations

import torch

try:
    from membound.kernels import _cpu_ops
except ImportError:  # built without a compiler, or a source checkout never installed
    _cpu_ops = None

BF16 = torch.bfloat16
# Most sequences decode_attention takes per call: it runs on one core, where SDPA uses all of them.
MAX_DECODE_BATCH = 8


def available() -> bool:
    return _cpu_ops is not None


def _plain(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == BF16 and t.is_contiguous()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(RMSNorm(x + residual) * weight, x + residual) as layers.norm.add_rms_norm, for bf16 [rows, dim]
    rows; overwrites x (with the normed rows) and residual (with the sum), which the decoder no longer
    needs. None where the C op does not apply."""
    if _cpu_ops is None or x.dim() != 2 or not _plain(x) or not _plain(weight) or weight.numel() != x.shape[1]:
        return None
    if residual is None:
        residual = torch.empty_like(x)
        has_residual = False
    elif _plain(residual) and residual.shape == x.shape:
        has_residual = True
    else:
        return None
    if not has_residual:
        residual.copy_(x)
    rows, dim = x.shape
    _cpu_ops.add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), rows, dim, eps, has_residual)
    return x, residual


def rope_write_kv(qkv, num_heads, num_kv_heads, head_dim, cos, sin, rows, k_cache, v_cache, slot_mapping):
    """Rotated q [T, heads, head_dim] from the fused projection's rows qkv [T, (heads + 2 kv_heads) *
    head_dim], with the rotated k and v written to their cache slots (layers.rotary.rope_write_kv's
    result). cos / sin: [*, head_dim / 2] bf16 rows, looked up by `rows` (int64). None where the C op
    does not apply (another dtype or layout, an int8 or fp8 cache)."""
    if _cpu_ops is None or not (qkv.dim() == 2 and qkv.stride(1) == 1 and qkv.dtype == BF16):
        return None
    if not (_plain(cos) and _plain(sin) and _plain(k_cache) and _plain(v_cache)):
        return None
    t = qkv.shape[0]
    if not all(x.dtype == torch.int64 and x.is_contiguous() and x.numel() == t for x in (rows, slot_mapping)):
        return None
    if (
        head_dim % 2
        or k_cache.shape != v_cache.shape
        or k_cache.shape[0] != num_kv_heads
        or k_cache.shape[3] != head_dim
    ):
        return None
    if (
        cos.shape != sin.shape
        or cos.shape[-1] != head_dim // 2
        or qkv.shape[1] < (num_heads + 2 * num_kv_heads) * head_dim
    ):
        return None
    q = torch.empty(t, num_heads, head_dim, dtype=BF16)
    kvh, nblocks, bs, _ = k_cache.shape
    _cpu_ops.rope_write_kv(
        qkv.data_ptr(), q.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows.data_ptr(), slot_mapping.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), t, qkv.stride(0), num_heads, num_kv_heads, head_dim,
        cos.stride(0), nblocks * bs, cos.shape[0],
    )  # fmt: skip
    return q


def decode_attention(
    q, k_cache, v_cache, block_tables, seq_lens, scale: float, sliding_window: int | None, max_batch=MAX_DECODE_BATCH
):
    """attention.torch_paged.decode_attention for bf16 caches and at most max_batch sequences (None: any
    number); None otherwise. q [B, H, D] with contiguous rows of H x D. Each sequence is computed on its
    own, in the same order whatever the others are."""
    b, h, d = q.shape
    if _cpu_ops is None or (max_batch is not None and b > max_batch):
        return None
    if q.dtype != BF16 or q.stride(2) != 1 or q.stride(1) != d:
        return None
    if not (_plain(k_cache) and _plain(v_cache)) or block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        return None
    if not (block_tables.dim() == 2 and block_tables.stride(1) == 1 and block_tables.shape[0] >= b):
        return None
    if not (seq_lens.is_contiguous() and seq_lens.numel() >= b and k_cache.shape == v_cache.shape):
        return None
    kvh, nblocks, bs, kd = k_cache.shape
    if kd != d or h % kvh:
        return None
    out = torch.empty(b, h, d, dtype=BF16)
    _cpu_ops.decode_attention(
        q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        seq_lens.data_ptr(), b, h, kvh, d, q.stride(0), bs, block_tables.stride(0), nblocks, scale,
        0 if sliding_window is None else sliding_window, block_tables.shape[1],
    )  # fmt: skip
    return out
