"""GGUF 4-bit blocks read straight into membound's int4 layout, with no fp32 detour.

Q4_0 (18-byte blocks: fp16 d, 16 bytes of nibbles) is w = d * (q - 8); Q4_1 (20 bytes: fp16 d,
fp16 m, nibbles) is w = d * q + m = d * (q - 8) + (m + 8 d). In both, element j < 16 of a block is
the low nibble of byte j and element j >= 16 the high nibble of byte j - 16. So each maps onto
int4 with groups of 32: scale = d, zero = 0 or m + 8 d.
"""

from __future__ import annotations

import numpy as np
import torch

from membound.quant.linear import Int4Linear

BLOCK = 32
_BYTES = {"Q4_0": 18, "Q4_1": 20}


def unpack_q4(raw: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """raw [rows, bytes per row] -> (q uint8 [rows, K], d fp32 [rows, K/32], m fp32 [rows, K/32] or zeros)."""
    if qtype not in _BYTES:
        raise ValueError(f"not a 4-bit GGUF block type: {qtype}")
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, _BYTES[qtype])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:]
    else:
        m = np.zeros_like(d)
        qs = blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)
    return q, d, m


def int4_parts(raw: np.ndarray, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) in Int4Linear's convention, group 32."""
    q, d, m = unpack_q4(raw, qtype)
    zero = m + 8 * d if qtype == "Q4_1" else np.zeros_like(d)
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero)


# membound module -> the GGUF tensors that fill it, in row order.
_LAYER_PARTS = (
    (("self_attn", "qkv_proj"), ("attn_q", "attn_k", "attn_v")),
    (("self_attn", "o_proj"), ("attn_output",)),
    (("mlp", "gate_up_proj"), ("ffn_gate", "ffn_up")),
    (("mlp", "down_proj"), ("ffn_down",)),
)


def load_int4_from_gguf(model, gguf) -> int:
    """Replace every decoder matrix whose GGUF tensors are all Q4_0/Q4_1 by an Int4Linear built from
    the blocks themselves; returns how many were replaced (others are left for the caller)."""
    from membound.model.loader import _unpermute_rope

    cfg = model.config
    count = 0
    for i, layer in enumerate(model.layers):
        for (owner, attr), names in _LAYER_PARTS:
            tensors = [gguf.tensors[f"blk.{i}.{n}.weight"] for n in names]
            if any(t.tensor_type.name not in _BYTES for t in tensors):
                continue
            parts = []
            for n, t in zip(names, tensors, strict=True):
                q, s, z = int4_parts(t.data, t.tensor_type.name)
                if gguf.arch == "llama" and n in ("attn_q", "attn_k"):
                    heads = cfg.num_heads if n == "attn_q" else cfg.num_kv_heads
                    q, s, z = (_unpermute_rope(x, heads) for x in (q, s, z))
                parts.append((q, s, z))
            module = getattr(getattr(layer, owner), attr)
            q, s, z = (torch.cat([p[k] for p in parts]) for k in range(3))
            bias = module.bias
            setattr(getattr(layer, owner), attr, Int4Linear(q, s, z, BLOCK, None if bias is None else bias.data))
            count += 1
    return count
