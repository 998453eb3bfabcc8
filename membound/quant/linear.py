"""Quantized linear layers with one interface: int8 per-channel, int4 group-wise, fp8 per-channel.

All are weight-only here: the weight is stored at low precision with its scales and turned
back into the activation dtype inside the matmul. On CPU, int8 and int4 go through
PyTorch's packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which take
bf16 activations and read the packed weight directly, so decode streams 2-4x fewer bytes
than bf16 and 4-8x fewer than fp32. Elsewhere, and for shapes those kernels do not take,
the weight is dequantized on the fly (correct everywhere, fast nowhere: the Triton kernels
of the quantization issue replace it on GPUs).

int4 follows the "tinygemm" convention: w = (q - 8) * scale + zero, q in [0, 15], one
(scale, zero) per group of `group_size` consecutive input features of a row. GGUF's Q4_0
(w = d * (q - 8)) and Q4_1 (w = d * q + m) are this format with group 32.
"""

from __future__ import annotations

import torch
from torch import nn

FORMATS = ("int8", "int4", "fp8")


class QuantLinear(nn.Module):
    """Base: y = x @ dequant(W).T (+ bias). Subclasses define the storage and `dequantize`."""

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def weight_nbytes(self) -> int:
        """Bytes of the stored weight and its scales (what one decode step reads)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _fast(self, x2: torch.Tensor) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = self._fast(x2)
        if y is None:
            y = torch.nn.functional.linear(x2, self.dequantize(x.dtype))
        else:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(QuantLinear):
    """Symmetric int8, one scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        w = weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16 if w.device.type == "cpu" else weight.dtype))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scale.float()[:, None]).to(dtype)

    def _fast(self, x2: torch.Tensor) -> torch.Tensor | None:
        # The CPU kernel crashes on rows that are not a multiple of 32 (seen with torch 2.13): dequantize those.
        if x2.device.type != "cpu" or self.in_features % 32:
            return None
        return torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scale)


def pick_group_size(in_features: int, preferred: int = 128) -> int:
    """The largest of preferred, 64, 32 that divides the row length (32 at worst, padded)."""
    for g in (preferred, 64, 32):
        if g <= preferred and in_features % g == 0:
            return g
    return 32


class Int4Linear(QuantLinear):
    """Asymmetric int4 per group of input features, stored one 4-bit value per nibble."""

    def __init__(
        self,
        q: torch.Tensor,  # [N, K] ints in [0, 15]
        scale: torch.Tensor,  # [N, K / group]
        zero: torch.Tensor,  # [N, K / group]: w = (q - 8) * scale + zero
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> None:
        n, k = q.shape
        if k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
        super().__init__(k, n, bias)
        self.group_size = group_size
        q8 = q.to(torch.uint8)
        self.register_buffer("packed", (q8[:, 0::2] | (q8[:, 1::2] << 4)).contiguous())  # two per byte
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", zero.float().contiguous())
        self._cpu_pack: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cpu_ok = q.device.type == "cpu" and n % 16 == 0 and k % 2 == 0
        if self._cpu_ok:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
            sz = torch.stack([scale.float(), zero.float()], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._cpu_pack = (packed, sz)
            # The kernel's layout replaces the plain nibbles on CPU: keep one copy, not two.
            self.packed = torch.empty(0, dtype=torch.uint8)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> Int4Linear:
        """Round-to-nearest with each group's min and max mapped onto 0 and 15."""
        n, k = weight.shape
        w = weight.detach().float().reshape(n, k // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).reshape(n, k)
        return cls(q, scale, lo + 8 * scale, group_size, bias)

    def unpacked(self) -> torch.Tensor:
        if self._cpu_pack is not None:
            raise RuntimeError("on CPU the nibbles live in the kernel's layout; use dequantize()")
        lo, hi = self.packed & 0xF, self.packed >> 4
        return torch.stack([lo, hi], dim=-1).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._cpu_pack is not None:
            eye = torch.eye(self.in_features, dtype=torch.bfloat16)
            packed, sz = self._cpu_pack
            return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, self.group_size, sz).t().to(dtype)
        q = self.unpacked().float().reshape(self.out_features, -1, self.group_size)
        w = (q - 8) * self.scale[..., None] + self.zero[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def weight_nbytes(self) -> int:
        if self._cpu_pack is not None:
            packed, sz = self._cpu_pack
            return packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
        return super().weight_nbytes()

    def _fast(self, x2: torch.Tensor) -> torch.Tensor | None:
        if self._cpu_pack is None or x2.device.type != "cpu":
            return None
        packed, sz = self._cpu_pack
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), packed, self.group_size, sz)

    def _apply(self, fn, recurse=True):
        if self._cpu_pack is not None:
            moved = fn(torch.empty(0))
            if moved.device.type != "cpu":
                raise RuntimeError("an int4 layer packed for the CPU kernel cannot move to another device")
        return super()._apply(fn, recurse)


class Fp8Linear(QuantLinear):
    """float8 e4m3 with one scale per output channel (weight-only: dequantized in the matmul)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        w = weight.detach().float()
        fmax = torch.finfo(torch.float8_e4m3fn).max
        scale = w.abs().amax(1).clamp(min=1e-12) / fmax
        self.register_buffer("qweight", (w / scale[:, None]).clamp(-fmax, fmax).to(torch.float8_e4m3fn))
        self.register_buffer("scale", scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)


def quantize_linear(layer: nn.Linear, fmt: str, group_size: int = 128) -> QuantLinear:
    w, b = layer.weight, layer.bias
    if fmt == "int8":
        return Int8Linear(w, b)
    if fmt == "int4":
        return Int4Linear.quantize(w, pick_group_size(w.shape[1], group_size), b)
    if fmt == "fp8":
        return Fp8Linear(w, b)
    raise ValueError(f"unknown quantization {fmt!r}; available: {', '.join(FORMATS)}")


# The matrices of each decoder layer; embeddings and the LM head stay at full precision.
_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def quantize_model(model: nn.Module, fmt: str, group_size: int = 128) -> int:
    """Replace every decoder-layer linear with its quantized twin; returns how many were replaced."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in _TARGETS and isinstance(child, nn.Linear):
                setattr(module, name, quantize_linear(child, fmt, group_size))
                count += 1
    return count


def linear_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of all weights as stored, multiply-accumulates per token), counting quantized layers right."""
    nbytes, macs = 0, 0
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            nbytes += m.weight_nbytes() + (0 if m.bias is None else m.bias.numel() * m.bias.element_size())
            macs += m.in_features * m.out_features
            seen.update(id(p) for p in m.parameters())
    for p in model.parameters():
        if id(p) not in seen:
            nbytes += p.numel() * p.element_size()
    return nbytes, macs
