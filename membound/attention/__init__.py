"""Attention over the paged KV cache, behind a small backend interface."""

from membound.attention.base import AttentionBackend, AttentionMetadata
from membound.attention.torch_paged import TorchPagedAttention

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchPagedAttention", "get_backend"]


def get_backend(name: str = "auto") -> AttentionBackend:
    """The attention backend by name; "auto" picks the best one for the device."""
    if name in ("auto", "torch"):
        return TorchPagedAttention()
    raise ValueError(f"unknown attention backend {name!r}; available: auto, torch")
