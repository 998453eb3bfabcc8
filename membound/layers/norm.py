"""RMSNorm, alone (q/k norm) and fused with the residual add before it (the decoder's norms)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight in fp32 whatever the run dtype, rounded once (PyTorch's
    rms_norm; HF rounds before scaling, which in bf16 turned SmolLM2's "Paris" into a loop)."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new residual): residual = x + residual in x's dtype, then RMSNorm in fp32.
    The PyTorch implementation, and the reference kernels.fused.add_rmsnorm is tested against."""
    h = x if residual is None else x + residual
    return rms_norm(h, weight, eps), h


class RMSNorm(nn.Module):
    """Holds the weight (and eps); the decoder's norms go through the kernel set's add_rms_norm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
