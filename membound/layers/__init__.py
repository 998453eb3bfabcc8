"""The model's norms, activation and RoPE, behind one kernel set chosen once, where the model is built.

`LayerKernels` names the implementation of each op: PyTorch (norm.py, activation.py, rotary.py) or
the Triton kernels of membound.kernels.fused. "auto" pairs them with the attention backend, as
before: the Triton set exactly when attention runs on the Triton backend.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Literal

import torch

from membound.errors import ConfigError
from membound.layers.activation import silu_and_mul
from membound.layers.norm import RMSNorm, add_rms_norm, rms_norm
from membound.layers.rotary import RotaryEmbedding, apply_rope, rope_write_kv

__all__ = [
    "LAYER_KERNELS",
    "LayerKernels",
    "RMSNorm",
    "RotaryEmbedding",
    "add_rms_norm",
    "apply_rope",
    "choose_layer_kernels",
    "rms_norm",
    "rope_write_kv",
    "silu_and_mul",
]

LAYER_KERNELS = ("auto", "torch", "triton")


@dataclasses.dataclass(frozen=True)
class LayerKernels:
    name: Literal["torch", "triton"]
    # (x, residual | None, weight, eps) -> (RMSNorm(x + residual), x + residual)
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    # (q, k, v, cos_rows, sin_rows, rows, k_cache, v_cache, slot_mapping, kv_scales) -> rotated q, with the
    # rotated k and v written to the cache, then the backend only attends (`attend`); None: the model
    # rotates q and k itself and hands them to the backend's `forward`, which writes the cache.
    rope_write_kv: Callable[..., torch.Tensor] | None


TORCH = LayerKernels("torch", add_rms_norm, silu_and_mul, None)


def choose_layer_kernels(name: str = "auto", attention_backend: str = "torch") -> LayerKernels:
    """The kernel set by name; "auto" is Triton iff the attention backend (its name) is "triton"."""
    if name not in LAYER_KERNELS:
        raise ConfigError(f"unknown layer kernels {name!r}; available: {', '.join(LAYER_KERNELS)}")
    if name == "auto":
        name = "triton" if attention_backend == "triton" else "torch"
    if name == "torch":
        return TORCH
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("layer kernels 'triton' need the triton package (pip install triton)")
    from membound.kernels import fused

    return LayerKernels("triton", fused.add_rmsnorm, fused.silu_and_mul, fused.rope_write_kv)
