"""Attention over the paged KV cache, behind a small backend interface."""

from __future__ import annotations

import importlib.util

import torch

from membound.attention.base import AttentionBackend, AttentionMetadata
from membound.attention.torch_paged import TorchPagedAttention
from membound.errors import ConfigError

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchPagedAttention", "get_backend"]

BACKENDS = ("auto", "torch", "triton")


def get_backend(
    name: str = "auto", device: torch.device | None = None, batch_invariant: bool = False
) -> AttentionBackend:
    """The attention backend by name; "auto" is Triton on CUDA (when installed), PyTorch elsewhere.
    batch_invariant: the PyTorch backend's row-by-row mode (the only backend that has one)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}")
    has_triton = importlib.util.find_spec("triton") is not None
    if name == "auto":
        name = "triton" if device is not None and device.type == "cuda" and has_triton else "torch"
    if name == "torch":
        return TorchPagedAttention(batch_invariant)
    if batch_invariant:
        raise ConfigError("batch_invariant runs on the PyTorch attention backend only (attention_backend='torch')")
    if not has_triton:
        raise ConfigError("attention_backend='triton' needs the triton package (pip install triton)")
    from membound.attention.triton_paged import TritonPagedAttention

    return TritonPagedAttention()
