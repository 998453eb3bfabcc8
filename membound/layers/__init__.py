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

LAYER_KERNELS = ("auto", "torch", "cpu", "triton")


@dataclasses.dataclass(frozen=True)
class LayerKernels:
    name: Literal["torch", "cpu", "triton"]
    # (x, residual | None, weight, eps) -> (RMSNorm(x + residual), x + residual)
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    # (q, k, v, cos_rows, sin_rows, rows, k_cache, v_cache, slot_mapping, kv_scales) -> rotated q, with the
    # rotated k and v written to the cache, then the backend only attends (`attend`); None: the model
    # rotates q and k itself and hands them to the backend's `forward`, which writes the cache.
    rope_write_kv: Callable[..., torch.Tensor] | None


TORCH = LayerKernels("torch", add_rms_norm, silu_and_mul, None)


def _cpu_add_rms_norm(x, residual, weight, eps):
    from membound.kernels import cpu

    return cpu.add_rms_norm(x, residual, weight, eps) or add_rms_norm(x, residual, weight, eps)


def _cpu_rope_write_kv(q, k, v, cos, sin, rows, k_cache, v_cache, slot_mapping, kv_scales=None):
    """The C op when q, k and v are the fused projection's adjacent slices (as the model makes them) and
    the cache is bf16; else rope_write_kv in PyTorch."""
    from membound.kernels import cpu

    t, h, d = q.shape
    kvh = k.shape[1]
    e = q.element_size()
    row = q.stride(0) if t > 1 else (h + 2 * kvh) * d  # a single row's stride is whatever view() chose
    fused = (
        kv_scales is None
        and q.stride()[1:] == k.stride()[1:] == v.stride()[1:] == (d, 1)
        and (t == 1 or q.stride(0) == k.stride(0) == v.stride(0))
        and k.data_ptr() == q.data_ptr() + h * d * e
        and v.data_ptr() == k.data_ptr() + kvh * d * e
    )
    if fused:
        qkv = q.as_strided((t, (h + 2 * kvh) * d), (row, 1))
        out = cpu.rope_write_kv(qkv, h, kvh, d, cos, sin, rows, k_cache, v_cache, slot_mapping)
        if out is not None:
            return out
    return rope_write_kv(q, k, v, cos, sin, rows, k_cache, v_cache, slot_mapping, kv_scales)


# PyTorch ops, with three fused C ops (membound/kernels/cpu_ops.c) where they apply: bf16 on the CPU.
CPU = LayerKernels("cpu", _cpu_add_rms_norm, silu_and_mul, _cpu_rope_write_kv)


def choose_layer_kernels(
    name: str = "auto", attention_backend: str = "torch", dtype: torch.dtype | None = None, device_type: str = "cpu"
) -> LayerKernels:
    """The kernel set by name; "auto" is Triton with the Triton attention backend, else the CPU set for a
    bf16 model on the CPU where its C ops were built, else PyTorch."""
    if name not in LAYER_KERNELS:
        raise ConfigError(f"unknown layer kernels {name!r}; available: {', '.join(LAYER_KERNELS)}")
    if name == "auto":
        from membound.kernels import cpu

        fused_cpu = cpu.available() and dtype == torch.bfloat16 and device_type == "cpu"
        name = "triton" if attention_backend == "triton" else ("cpu" if fused_cpu else "torch")
    if name == "torch":
        return TORCH
    if name == "cpu":
        return CPU
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("layer kernels 'triton' need the triton package (pip install triton)")
    from membound.kernels import fused

    return LayerKernels("triton", fused.add_rmsnorm, fused.silu_and_mul, fused.rope_write_kv)
