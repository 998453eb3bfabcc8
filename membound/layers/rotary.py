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
        """Full-width tables for each position, [T, 1, head_dim]: (cos | cos) and (-sin | sin), as
        apply_rope takes them; looked up once per step, not per layer."""
        cos, sin = self.cos[positions], self.sin[positions]
        return torch.cat((cos, cos), -1)[:, None].to(dtype), torch.cat((-sin, sin), -1)[:, None].to(dtype)


def half_tables(cos_full: torch.Tensor, sin_signed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The [T, head_dim / 2] cos and sin rows inside RotaryEmbedding's full-width tables."""
    half = cos_full.shape[-1] // 2
    return cos_full[:, 0, :half].contiguous(), sin_signed[:, 0, half:].contiguous()  # kernels take dense rows


def apply_rope(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by position, neox style (the two halves of each head):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) = x * (cos | cos) + roll(x, half) * (-sin | sin),
    three ops where the half-by-half form takes eight."""
    return torch.addcmul(x * cos_full, x.roll(x.shape[-1] // 2, -1), sin_signed)


def rope_write_kv(
    q, k, v, cos_table, sin_table, positions, k_cache, v_cache, slot_mapping, kv_scales=None
) -> torch.Tensor:
    """Rotate q and k (neox halves) at `positions`, write k and v to their cache slots; return rotated q.
    The PyTorch twin of kernels.fused.rope_write_kv (same arguments), which it is tested against."""
    cos, sin = cos_table[positions].to(q.dtype), sin_table[positions].to(q.dtype)
    cos, sin = torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]
    write_kv(apply_rope(k, cos, sin), v, k_cache, v_cache, slot_mapping, kv_scales)
    return apply_rope(q, cos, sin)
