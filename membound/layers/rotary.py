"""Rotary position embedding: the cos/sin tables, the rotation, and the rotation fused with the KV write."""

from __future__ import annotations

import torch
from torch import nn

from membound.attention.torch_paged import write_kv


class RotaryEmbedding(nn.Module):
    """Neox-style rotation (halves of each head), cos/sin tables [max_positions, head_dim / 2] precomputed."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int) -> None:
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each position, [T, 1, head_dim / 2]; looked up once per step, not per layer."""
        return self.cos[positions][:, None, :].to(dtype), self.sin[positions][:, None, :].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by position: neox style, on the two halves of each head."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_write_kv(
    q, k, v, cos_table, sin_table, positions, k_cache, v_cache, slot_mapping, kv_scales=None
) -> torch.Tensor:
    """Rotate q and k (neox halves) at `positions`, write k and v to their cache slots; return rotated q.
    The PyTorch twin of kernels.fused.rope_write_kv (same arguments), which it is tested against."""
    cos = cos_table[positions][:, None, :].to(q.dtype)
    sin = sin_table[positions][:, None, :].to(q.dtype)
    write_kv(apply_rope(k, cos, sin), v, k_cache, v_cache, slot_mapping, kv_scales)
    return apply_rope(q, cos, sin)
