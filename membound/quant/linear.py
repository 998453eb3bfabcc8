"""Quantized linear layers with one interface: int8 per-channel or group-wise, int4 group-wise, fp8 per-channel.

All are weight-only here: the weight is stored at low precision with its scales and turned
back into the activation dtype inside the matmul. On CPU, int8 and int4 go through
PyTorch's packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which take
bf16 activations and read the packed weight directly, so decode streams 2-4x fewer bytes
than bf16 and 4-8x fewer than fp32. Elsewhere, and for shapes those kernels do not take,
the weight is dequantized on the fly (correct everywhere, fast nowhere). On CUDA, int4 and
int8 go through membound's Triton dequantize-and-multiply kernels (kernels/quant_matmul.py).

int4 follows the "tinygemm" convention: w = (q - 8) * scale + zero, q in [0, 15], one
(scale, zero) per group of `group_size` consecutive input features of a row. GGUF's Q4_0
(w = d * (q - 8)) and Q4_1 (w = d * q + m) are this format with group 32; Q8_0 and the other
8-bit-or-less GGUF types are group-wise int8 (see quant/gguf_blocks.py for the mapping).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

FORMATS = ("int8", "int4", "fp8")

# Prefill rows in a step from which Int4Linear.forward_rows's dequantize-then-dense matmul beats the
# packed kernel on CPU (SmolLM2's matrices, 2-core Xeon with AMX: even at 64 rows, 0.55x the time).
DENSE_MIN_ROWS = 64

# Where the Triton matmuls run: CUDA, and meta tensors (the sm_90a compile check runs the CUDA
# path on them, compiling what a GPU would launch without one).
_TRITON_DEVICES = ("cuda", "meta")


def _triton_path(x: torch.Tensor) -> bool:
    # fp32 activations on a GPU are a reference setting, not a fast one: they take the exact
    # dequantize-then-matmul path (full-precision tl.dot tiles would spill registers).
    return x.device.type in _TRITON_DEVICES and x.dtype != torch.float32


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
        # The model's activations are 2-D [tokens, features]: no reshapes (a decode step makes 120
        # of these calls, and each skipped op is a microsecond of a ~10 ms step).
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self._fast(x2)
        if y is None:
            y = torch.nn.functional.linear(x2, self.dequantize(x.dtype))
        elif y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(QuantLinear):
    """int8 weights, w = q * scale (+ zero): one scale per output channel (`group_size` = in_features,
    no zero; what `quantize` makes), or one (scale, zero) per group of `group_size` input features
    (GGUF's Q8_0, Q5_x, Q6_K blocks, loaded by quant/gguf_blocks.py).

    Buffers, as the Triton `int8_matmul(x, qweight, scale, zero, group_size)` takes them:
    `qweight` [N, K] int8, `scale` [N, K / group_size], `zero` the same or None.

    CPU paths. Per channel: `_weight_int8pack_mm` with bf16 activations and a bf16 scale (it crashes
    unless K % 32 == 0: other K dequantize; it also takes fp32 activations, unvectorized: 740 ms
    at M = 16 on the LM head below). Group-wise: the weight is dequantized in float32 one chunk of
    rows (8 MiB) at a time and multiplied chunk by chunk with `torch.mm`: the very float32 weight
    of the dequantized model (exact), 1 byte per weight read from memory instead of 4.
    Measured on SmolLM2's Q8_0 LM head (49152 x 576, group 32) with real hidden states, batch
    M = 1 / 16, min (median) of 20 interleaved runs, 2-core AMD EPYC Zen 4 shared with other jobs:
      fp32 linear on the dequantized table               13.6 (16.4) / 27.0 (32.2) ms
      group-wise, chunked fp32 (this)                     7.6 (17.1) / 12.7 (17.9) ms, exact
      dequantize the whole table, then fp32 linear       98.7        / 109 ms
      dequantize the whole table to bf16, bf16 linear    54.9        / 59.9 ms, lossy
      one fp32 `_weight_int8pack_mm` per group (18)      ~20         / ~1,130 ms
    The chunked path has a parallel region per op per chunk, so it suffers most when other jobs
    take a core (its median above); end to end it still decodes faster than the fp32 head (see
    Int8Embedding). Lossy CPU alternatives measured, not taken: `Int8Embedding`'s docstring.
    """

    def __init__(
        self,
        qweight: torch.Tensor,  # [N, K] int8
        scale: torch.Tensor,  # [N, K / group_size] (or [N] per channel)
        zero: torch.Tensor | None = None,  # like scale, or None
        group_size: int | None = None,  # None: K, one scale per output channel
        bias: torch.Tensor | None = None,
    ) -> None:
        if qweight.is_floating_point():
            raise TypeError("Int8Linear takes int8 values and scales; Int8Linear.quantize(weight) rounds a float one")
        n, k = qweight.shape
        group_size = k if group_size is None else group_size
        if group_size < 1 or k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
        super().__init__(k, n, bias)
        self.group_size = group_size
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.reshape(n, k // group_size).contiguous())
        self.register_buffer("zero", None if zero is None else zero.reshape(n, k // group_size).float().contiguous())

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Symmetric round-to-nearest, one scale per output channel (bf16 on CPU, the kernel's dtype)."""
        w = weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scale.to(torch.bfloat16 if w.device.type == "cpu" else weight.dtype), None, None, bias)

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.in_features and self.zero is None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        w = self.qweight.view(n, -1, self.group_size).to(torch.float32) * self.scale.float()[..., None]
        if self.zero is not None:
            w = w + self.zero[..., None]
        return w.reshape(n, k).to(dtype)

    def _fast(self, x2: torch.Tensor) -> torch.Tensor | None:
        if _triton_path(x2):
            from membound.kernels.quant_matmul import int8_matmul

            return int8_matmul(x2.contiguous(), self.qweight, self.scale, self.zero, self.group_size)
        if x2.device.type != "cpu":
            return None
        if not self.per_channel:
            return self._grouped_cpu(x2)
        # The CPU kernel crashes on rows that are not a multiple of 32 (seen with torch 2.13): dequantize those.
        if self.in_features % 32:
            return None
        scale = self.scale.view(-1)
        return torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, scale.to(torch.bfloat16))

    def _grouped_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        """x @ w.T in float32, w dequantized one cache-sized chunk of rows at a time."""
        n, k, g = self.out_features, self.in_features, self.group_size
        xt = x2.float().t()
        rows = max(1, min(n, _CHUNK_ELEMENTS // k))
        out = torch.empty(n, x2.shape[0])  # [N, M]: each chunk's slice is contiguous
        buf = torch.empty(rows, k // g, g)
        for i in range(0, n, rows):
            j = min(n, i + rows)
            b = buf[: j - i]
            b.copy_(self.qweight[i:j].view(j - i, -1, g))
            b.mul_(self.scale[i:j, :, None])
            if self.zero is not None:
                b.add_(self.zero[i:j, :, None])
            torch.mm(b.view(j - i, k), xt, out=out[i:j])
        return out.t()


# float32 elements of weight dequantized at a time on the CPU group-wise path (8 MiB: stays in L3).
_CHUNK_ELEMENTS = 1 << 21


class Int8Embedding(Int8Linear):
    """An embedding table kept as int8 (groups): a lookup dequantizes only the rows it reads;
    `logits(hidden)` multiplies by the whole table, for an LM head tied to the embedding.

    The choice for a GGUF's Q8_0 table (SmolLM2's, tied to the head): keep the file's group-32
    blocks, exact, on the chunked fp32 path of Int8Linear. Measured against the alternatives on
    SmolLM2's table with 167 real final hidden states (5 prompts), timings as in Int8Linear's
    docstring (M = 1 / 16, min (median)); KL of the next-token distribution against the fp32 head:
      (a) fp32 linear (today's dequantized head, 113 MB)  13.6 (16.4) / 27.0 (32.2) ms, exact
      (b) group-32 int8, chunked fp32 (chosen, 32 MB)      7.6 (17.1) / 12.7 (17.9) ms, exact
      (c) requantized per channel, `_weight_int8pack_mm`   3.5 (4.5)  / 14.8 (16.3) ms: max |dw|
          0.0094 (of |w| <= 1.96), logits off by up to 0.63, mean KL 2.1e-3 (max 6.1e-3),
          top-1 97.3%
      (d) two nibble planes (q = 16 hi + lo) through `_weight_int4pack_mm_for_cpu`, bf16 scales
          (+42 MB on top of the lookup table)             2.1 (2.8)  / 14.0 (15.3) ms: mean KL
          6.2e-4 (max 3.1e-3), top-1 100%
    End to end (benchmarks/cpu_quant.py, batch 1, 64 new tokens, medians, one process): the gguf
    default with (b) decodes at 24.7 tok/s, quantization="int4" (the same Q4_1 blocks, fp32 head)
    at 17.8, fp32 at 9.4; KL vs fp32 is the same 0.0006 for both (the head adds nothing).
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None = None,
        group_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        head: bool = True,
    ) -> None:
        """head: also the (tied) LM head; only then are the nibble planes for `logits` built."""
        super().__init__(qweight, scale, zero, group_size)
        self.out_dtype = dtype  # what lookups return: the model's activation dtype
        self._planes: tuple[torch.Tensor, torch.Tensor] | None = None
        if head and dtype == torch.bfloat16 and qweight.device.type == "cpu":
            self._planes = _nibble_planes(self.qweight, self.scale, self.zero, self.group_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        g = self.group_size
        w = self.qweight[ids].view(*ids.shape, -1, g).to(torch.float32) * self.scale[ids].float()[..., None]
        if self.zero is not None:
            w = w + self.zero[ids][..., None]
        return w.reshape(*ids.shape, self.in_features).to(self.out_dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._planes is not None:
            packed, sz = self._planes
            x = hidden.reshape(-1, self.in_features).to(torch.bfloat16)
            # Both planes in one call: K doubled, x repeated, the groups' sums add the planes up.
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.cat((x, x), -1), packed, self.group_size, sz)
            return y.reshape(*hidden.shape[:-1], self.out_features)
        return super().forward(hidden)

    def planes_nbytes(self) -> int:
        """Bytes of the head's nibble planes (0 without them): what `logits` reads instead of the table."""
        return 0 if self._planes is None else sum(t.numel() * t.element_size() for t in self._planes)

    def weight_nbytes(self) -> int:
        return super().weight_nbytes() + self.planes_nbytes()

    def extra_repr(self) -> str:
        return f"num_embeddings={self.out_features}, embedding_dim={self.in_features}, group_size={self.group_size}"


def _nibble_planes(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int, rows_per_chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A group-wise int8 matrix w = q * d + m as two 4-bit planes for the CPU tinygemm kernel, side by side
    along K: u = q + 128 = 16 hi + lo, so w = (hi - 8) 16 d + (lo - 8) d + (8 d + m). The integer grid
    is exact; d, 16 d and 8 d + m are rounded to bf16 (the kernel's dtype, as for the int4 layers).
    Returns (packed [N, K], scale-and-zero [2 K / group, N, 2]), or None where the kernel does not take
    the shape. Packed in chunks of rows (the layout is blocked by 64 rows), so no copy of the whole
    table exists at once."""
    n, k = q.shape
    if n % 64 or k % 2 or group_size not in (16, 32, 64, 128, 256):
        return None
    packs = []
    for i in range(0, n, rows_per_chunk):
        u = (q[i : i + rows_per_chunk].to(torch.int16) + 128).to(torch.uint8)
        packs.append(_int4pack_for_cpu(torch.cat((u >> 4, u & 15), dim=1)))  # [rows, 2K]: hi plane, then lo
    d = scale.float()
    m = torch.zeros_like(d) if zero is None else zero.float()
    s_hi, z_hi = 16 * d, torch.zeros_like(d)
    s_lo, z_lo = d, 8 * d + m
    sz = torch.stack((torch.cat((s_hi, s_lo), 1), torch.cat((z_hi, z_lo), 1)), -1)  # [N, 2K / g, 2]
    return torch.cat(packs), sz.transpose(0, 1).contiguous().to(torch.bfloat16)


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
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", zero.float().contiguous())
        self._cpu_pack: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cpu_ok = q.device.type == "cpu" and n % 16 == 0 and k % 2 == 0
        if self._cpu_ok:
            packed = _int4pack_for_cpu(q)
            sz = torch.stack([scale.float(), zero.float()], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._cpu_pack = (packed, sz)
            # The kernel's layout replaces the plain nibbles on CPU: keep one copy, not two.
            self.register_buffer("packed", torch.empty(0, dtype=torch.uint8))
        else:
            q8 = q.to(torch.uint8)
            self.register_buffer("packed", (q8[:, 0::2] | (q8[:, 1::2] << 4)).contiguous())  # two per byte

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
        if _triton_path(x2) and self._cpu_pack is None:
            from membound.kernels.quant_matmul import int4_matmul

            # The Triton kernel reads the nibbles and scales as stored: no dequantized copy.
            return int4_matmul(x2.contiguous(), self.packed, self.scale, self.zero, self.group_size)
        if self._cpu_pack is None or x2.device.type != "cpu":
            return None
        packed, sz = self._cpu_pack
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        # The op takes dense rows only (an attention output of several heads can arrive as a strided view).
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, self.group_size, sz)

    def forward_rows(self, x: torch.Tensor, dense_from: int) -> torch.Tensor:
        """x @ w.T with rows [:dense_from] on the packed kernel and the rest through a bf16 copy of w,
        dequantized for this call, in one dense (oneDNN; AMX where the CPU has it) matmul. The packed
        kernel reads 4 bits a weight but computes row by row (a 512-row prefill: 3.1 ms on qkv_proj);
        the dense one pays a dequantize (0.2 ms) to multiply 512 rows in 0.23 ms. Both kernels give each
        row the same result whatever the other rows are, so a decode row (always packed) does not
        depend on what it is batched with. Measured: benchmarks/cpu_vs_llamacpp.py, prefill row."""
        if self._cpu_pack is None or x.dtype != torch.bfloat16 or self.bias is not None:
            return self(x)
        if not _knows_cpu_pack_layout() or self.out_features % 64:
            return self(x)
        n, k, g = self.out_features, self.in_features, self.group_size
        packed, sz = self._cpu_pack
        blocks = packed.view(torch.uint8).view(
            n // 64, k, 32
        )  # the kernel's layout: rows r and r + 32 of each 64 per byte
        q = torch.cat((blocks & 15, blocks >> 4), 2).transpose(0, 1).reshape(k // g, g, n).to(torch.bfloat16)
        scale = sz[..., 0]  # [K / g, N]: w = q * scale + (zero - 8 scale)
        w_t = torch.addcmul((sz[..., 1] - 8 * scale)[:, None], q, scale[:, None]).view(k, n)
        dense = torch.mm(x[dense_from:], w_t)
        if dense_from == 0:
            return dense
        return torch.cat((self(x[:dense_from]), dense))

    def _apply(self, fn, recurse=True):
        if self._cpu_pack is not None:
            moved = fn(torch.empty(0))
            if moved.device.type != "cpu":
                raise RuntimeError("an int4 layer packed for the CPU kernel cannot move to another device")
        return super()._apply(fn, recurse)


def _int4pack_for_cpu(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in [0, 15] in the CPU int4 kernel's layout. Where the layout is the known one
    (`_knows_cpu_pack_layout`) it is built from bytes directly: the ATen op takes int32 codes, a 4x
    copy of the matrix that made up a quarter of the default model's load time."""
    n, k = q.shape
    if n % 64 or not _knows_cpu_pack_layout():
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    rows = q.to(torch.uint8).view(n // 64, 2, 32, k)  # each block of 64 rows: rows r and r + 32 share a byte
    return (rows[:, 0] | (rows[:, 1] << 4)).transpose(1, 2).contiguous().view(n, k // 2)


@functools.cache
def _knows_cpu_pack_layout() -> bool:
    """Whether `_convert_weight_to_int4pack_for_cpu` lays nibbles out as forward_rows reads them
    ([N / 64, K, 32] bytes, row r in the low and row r + 32 in the high nibble): checked once on a
    small matrix, so a PyTorch that changes the layout loses the dense path, not correctness."""
    n, k = 128, 64
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    blocks = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2).view(torch.uint8).view(n // 64, k, 32)
    got = torch.cat((blocks & 15, blocks >> 4), 2).permute(0, 2, 1).reshape(n, k)
    return torch.equal(got.to(torch.int32), q)


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
        return Int8Linear.quantize(w, b)
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
            if not isinstance(m, Int8Embedding):  # a lookup; a tied head's multiply is the caller's to count
                macs += m.in_features * m.out_features
            seen.update(id(p) for p in m.parameters())
    for p in model.parameters():
        if id(p) not in seen:
            nbytes += p.numel() * p.element_size()
    return nbytes, macs
