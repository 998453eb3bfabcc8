"""GGUF quantized blocks unpacked into one neutral group format, and from there into membound's layers.

Neutral format (`Groups`): w = q * d + m, with q small integers [rows, K] (int8 for the signed
types, uint8 for the ones with an offset), d and m float32 [rows, K / group], m None where the
type has no offset. `Groups.dequantize()` computes exactly what `gguf.quants.dequantize` does, in
the same float32 operations, so the two are bit-identical (the tests check every type). Layouts,
read from gguf/quants.py (`QK_K` = 256-element super-blocks):

| type | bytes / block | q | d, m per group | group |
|---|---|---|---|---|
| Q4_0 | 18: fp16 d, 16 B nibbles | nibble - 8 | d | 32 |
| Q4_1 | 20: fp16 d, fp16 m, nibbles | nibble | d, m | 32 |
| Q5_0 | 22: fp16 d, u32 high bits, nibbles | (nibble + 16 * bit) - 16 | d | 32 |
| Q5_1 | 24: fp16 d, fp16 m, u32 high bits, nibbles | nibble + 16 * bit | d, m | 32 |
| Q8_0 | 34: fp16 d, 32 int8 | int8 | d | 32 |
| Q4_K | 144: fp16 d, fp16 dmin, 12 B of 6-bit (sc, mn) x 8, 128 B nibbles | nibble | d * sc, -(dmin * mn) | 32 |
| Q5_K | 176: as Q4_K plus 32 B of high bits | nibble + 16 * bit | d * sc, -(dmin * mn) | 32 |
| Q6_K | 210: 128 B low nibbles, 64 B 2-bit highs, 16 int8 scales, fp16 d | 6 bits - 32 | d * scale | 16 |

In Q4_0/Q4_1/Q5_x, element j < 16 of a block is the low nibble of byte j, j >= 16 the high nibble
of byte j - 16, and (Q5) bit j of the little-endian u32 is element j's fifth bit. In Q4_K/Q5_K,
each 32-byte chunk c of the nibbles holds sub-block 2c (low nibbles) and 2c + 1 (high nibbles);
Q5_K's sub-block i takes bit i of each of the 32 high-bit bytes. Q6_K's 256 elements are eight
rows of 32 made from two halves of 128: low nibbles of 64-byte chunks, 2-bit pairs of 32-byte
chunks (gguf's reshape order, reproduced below).

Mapping onto membound's layers (`LAYER_FORMAT`), and what it loses:
- Q4_0, Q4_1, Q4_K -> `Int4Linear`, group 32, w = (q' - 8) * scale + zero with q' the nibble
  (Q4_0: q + 8), scale = d, zero = m + 8 d (0 for Q4_0). The grid is the file's own; the only
  loss is how the layer stores scale/zero: float32 where nibbles are kept plain (GPU; rows not a
  multiple of 16), where m + 8 d is one float32 rounding (~1 ulp) away from gguf's d q + m; on
  CPU, the tinygemm kernel's layout keeps scale and zero in bf16 (8 mantissa bits, so a weight
  can move by ~2^-9 of its group's range) and multiplies bf16 activations.
- Q8_0, Q5_0, Q5_1, Q5_K, Q6_K -> `Int8Linear` group-wise (group 32; 16 for Q6_K), w = q * scale
  + zero with scale = d, zero = m (None for the symmetric types): exact, scales in float32, and
  the CPU path multiplies in float32.
- The token embedding (and the LM head, when tied to it) -> `Int8Embedding` for the int8 types,
  group-wise and exact like the layers; lookups read and dequantize only their rows. Why this and
  not a faster lossy head (measured): `Int8Embedding`'s docstring in quant/linear.py. 4-bit
  embeddings are widened to the same int8 layout (exact); an untied `output.weight` maps like a
  decoder matrix.
- F32 / F16 / BF16 tensors, and every other type, stay dequantized as the loader made them.
A fused matrix (qkv_proj, gate_up_proj) is kept packed only if all its parts map to one layer
format; int8 parts of different groups share the smallest (scales repeated, exact). Otherwise
(e.g. Q4_K_M's Q4_K q/k with a Q6_K v) it stays dequantized, and is counted as such. For the
llama architecture the q/k rows, which llama.cpp's converter reorders, are put back in HF order
on q, d and m alike, as the loader does to the dequantized weights (a row permutation: exact).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from membound.quant.linear import Int4Linear, Int8Embedding, Int8Linear, QuantLinear

log = logging.getLogger(__name__)

BLOCK = 32
QK_K = 256
# type -> (elements per block, bytes per block), as gguf.constants.GGML_QUANT_SIZES has them.
BLOCK_SIZES = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q4_K": (QK_K, 144),
    "Q5_K": (QK_K, 176),
    "Q6_K": (QK_K, 210),
}
LAYER_FORMAT = {
    "Q4_0": "int4",
    "Q4_1": "int4",
    "Q4_K": "int4",
    "Q8_0": "int8",
    "Q5_0": "int8",
    "Q5_1": "int8",
    "Q5_K": "int8",
    "Q6_K": "int8",
}
_BYTES = {"Q4_0": 18, "Q4_1": 20}  # the 4-bit types the RTN `int4` path takes from the file


@dataclasses.dataclass(frozen=True)
class Groups:
    """w = q * d + m, one (d, m) per `group` consecutive elements of a row."""

    qtype: str
    q: np.ndarray  # [rows, K] int8 or uint8
    d: np.ndarray  # [rows, K // group] float32
    m: np.ndarray | None  # [rows, K // group] float32, or None: no offset
    group: int

    def dequantize(self) -> np.ndarray:
        """float32 [rows, K], bit-identical to gguf.quants.dequantize of the same bytes."""
        rows, k = self.q.shape
        w = self.q.reshape(rows, -1, self.group).astype(np.float32) * self.d[..., None]
        if self.m is not None:
            w = w + self.m[..., None]
        return w.reshape(rows, k)


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> [...] float32 (through float16, as gguf reads them)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32]: low nibbles, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[..., 4] bytes of a little-endian u32 -> [..., 32] bits, bit j first for element j."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (gguf's Q4_K.get_scale_min)."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, m_d = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: [..., 128] bytes -> [..., 8, 32]: chunk c gives sub-blocks 2c (low) and 2c + 1 (high)."""
    qs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(*qs.shape[:-3], 8, 32)


def _unpack_blocks(b: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """b [rows, blocks, bytes] -> q [rows, blocks, elements], d and m [rows, blocks, groups], group."""
    if qtype == "Q8_0":
        return b[..., 2:].view(np.int8), _f16(b[..., 0:2])[..., None], None, 32
    if qtype in ("Q4_0", "Q4_1"):
        d = _f16(b[..., 0:2])[..., None]
        if qtype == "Q4_0":
            return (_nibbles(b[..., 2:]).astype(np.int8) - np.int8(8)), d, None, 32
        return _nibbles(b[..., 4:]), d, _f16(b[..., 2:4])[..., None], 32
    if qtype in ("Q5_0", "Q5_1"):
        d = _f16(b[..., 0:2])[..., None]
        off = 2 if qtype == "Q5_0" else 4
        q = _nibbles(b[..., off + 4 :]) | (_fifth_bits(b[..., off : off + 4]) << np.uint8(4))
        if qtype == "Q5_0":
            return q.astype(np.int8) - np.int8(16), d, None, 32
        return q, d, _f16(b[..., 2:4])[..., None], 32
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k_scales(b[..., 4:16])
        d_sub = d[..., None] * sc.astype(np.float32)
        m_sub = -(dmin[..., None] * mn.astype(np.float32))  # gguf: d q - dm; q d + (-dm) is the same float
        if qtype == "Q4_K":
            q = _k_nibbles(b[..., 16:144])
        else:
            qh = b[..., 16:48].reshape(*b.shape[:-1], 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
            q = _k_nibbles(b[..., 48:176]) | ((qh & np.uint8(1)) << np.uint8(4))
        return q.reshape(*b.shape[:-1], QK_K), d_sub, m_sub, 32
    if qtype == "Q6_K":
        lead = b.shape[:-1]
        ql = b[..., 0:128].reshape(*lead, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)
        ql = (ql & np.uint8(0x0F)).reshape(*lead, 8, 32)
        qh = b[..., 128:192].reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
        qh = (qh & np.uint8(0x03)).reshape(*lead, 8, 32)
        q = (ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)
        d_sub = _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)
        return q.reshape(*lead, QK_K), d_sub, None, 16
    raise ValueError(f"GGUF type {qtype} has no packed layout here; supported: {', '.join(BLOCK_SIZES)}")


def unpack(raw: np.ndarray, qtype: str) -> Groups:
    """raw [rows, bytes per row] (a GGUF tensor's `data`) -> its Groups."""
    if qtype not in BLOCK_SIZES:
        raise ValueError(f"GGUF type {qtype} has no packed layout here; supported: {', '.join(BLOCK_SIZES)}")
    raw = np.asarray(raw).view(np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, BLOCK_SIZES[qtype][1])
    q, d, m, group = _unpack_blocks(blocks, qtype)
    return Groups(
        qtype,
        np.ascontiguousarray(q.reshape(rows, -1)),
        np.ascontiguousarray(d.reshape(rows, -1), dtype=np.float32),
        None if m is None else np.ascontiguousarray(m.reshape(rows, -1), dtype=np.float32),
        group,
    )


# ---------------------------------------------------------------------- onto the layers


def int4_from_groups(g: Groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q in 0..15, scale, zero) in Int4Linear's convention w = (q - 8) scale + zero, group 32."""
    if LAYER_FORMAT.get(g.qtype) != "int4":
        raise ValueError(f"{g.qtype} is not a 4-bit type")
    if g.q.dtype == np.int8:  # Q4_0: q = nibble - 8, no offset
        return torch.from_numpy(g.q.astype(np.uint8) + np.uint8(8)), torch.from_numpy(g.d), torch.zeros(g.d.shape)
    m = np.zeros_like(g.d) if g.m is None else g.m
    return torch.from_numpy(g.q), torch.from_numpy(g.d), torch.from_numpy(m + 8 * g.d)


def int8_from_groups(g: Groups, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q int8, scale, zero or None) for Int8Linear, w = q scale + zero; `group` (a divisor of the
    type's) repeats each scale to a finer grid, for fusing with a finer-grouped part."""
    group = group or g.group
    if g.group % group:
        raise ValueError(f"group {group} does not divide {g.qtype}'s {g.group}")
    rep = g.group // group
    d = np.repeat(g.d, rep, axis=1) if rep > 1 else g.d
    m = None if g.m is None else (np.repeat(g.m, rep, axis=1) if rep > 1 else g.m)
    q = g.q.view(np.int8) if g.q.dtype == np.int8 else g.q.astype(np.int8)  # uint8 q is at most 31 here
    if g.q.dtype == np.uint8 and g.q.max(initial=0) > 127:
        raise ValueError(f"{g.qtype}: q does not fit int8")
    return torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(d), None if m is None else torch.from_numpy(m)


def unpack_q4(raw: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """raw [rows, bytes per row] -> (nibbles uint8 [rows, K], d fp32 [rows, K/32], m fp32 [rows, K/32] or zeros)."""
    if qtype not in _BYTES:
        raise ValueError(f"not a 4-bit GGUF block type: {qtype}")
    g = unpack(raw, qtype)
    if qtype == "Q4_0":
        return g.q.astype(np.uint8) + np.uint8(8), g.d, np.zeros_like(g.d)
    return g.q, g.d, g.m


def int4_parts(raw: np.ndarray, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) in Int4Linear's convention, group 32."""
    return int4_from_groups(unpack(raw, qtype))


# membound module -> the GGUF tensors that fill it, in row order.
_LAYER_PARTS = (
    (("self_attn", "qkv_proj"), ("attn_q", "attn_k", "attn_v")),
    (("self_attn", "o_proj"), ("attn_output",)),
    (("mlp", "gate_up_proj"), ("ffn_gate", "ffn_up")),
    (("mlp", "down_proj"), ("ffn_down",)),
)


def _unpermuted(g: Groups, heads: int) -> Groups:
    """llama's q/k rows back in HF order (the loader's _unpermute_rope), on every per-row array."""
    from membound.model.loader import _unpermute_rope

    def un(a):
        return None if a is None else _unpermute_rope(torch.from_numpy(a), heads).numpy()

    return dataclasses.replace(g, q=un(g.q), d=un(g.d), m=un(g.m))


def _layer_groups(gguf, i: int, names, cfg) -> list[Groups] | None:
    parts = []
    for n in names:
        t = gguf.tensors[f"blk.{i}.{n}.weight"]
        g = unpack(t.data, t.tensor_type.name)
        if gguf.arch == "llama" and n in ("attn_q", "attn_k"):
            g = _unpermuted(g, cfg.num_heads if n == "attn_q" else cfg.num_kv_heads)
        parts.append(g)
    return parts


def _build(parts: list[Groups], bias: torch.Tensor | None, device: torch.device):
    """One layer from the parts' rows stacked; all parts map to the same format."""
    fmt = LAYER_FORMAT[parts[0].qtype]
    if fmt == "int4":
        q, s, z = (torch.cat(x).to(device) for x in zip(*(int4_from_groups(p) for p in parts), strict=True))
        return Int4Linear(q, s, z, BLOCK, bias)
    group = min(p.group for p in parts)
    got = [int8_from_groups(p, group) for p in parts]
    q = torch.cat([x[0] for x in got]).to(device)
    s = torch.cat([x[1] for x in got]).to(device)
    zero = None
    if any(x[2] is not None for x in got):
        zero = torch.cat([torch.zeros_like(x[1]) if x[2] is None else x[2] for x in got]).to(device)
    return Int8Linear(q, s, zero, group, bias)


def load_gguf_packed(model, gguf, device: torch.device | None = None) -> dict[str, int]:
    """Swap the matrices of `model` for layers holding the file's own blocks, on `device` (default:
    the model's): every decoder matrix, the token embedding and the LM head, as the module
    docstring maps them. `model` may be on the meta device (the loader builds it there, so no
    dequantized copy is ever made); a packed layer's bias is then the meta module's, which the
    loader fills from the file with the rest. Returns {GGUF type: tensors kept packed,
    "dequantized": quantized tensors left dequantized (an unsupported type, or a fused matrix
    whose parts map to different formats)}."""
    cfg = model.config
    device = model.norm.weight.device if device is None else device
    counts: dict[str, int] = {}

    def kept(types):
        for t in types:
            counts[t] = counts.get(t, 0) + 1

    def left(n):
        counts["dequantized"] = counts.get("dequantized", 0) + n

    for i, layer in enumerate(model.layers):
        for (owner, attr), names in _LAYER_PARTS:
            types = [gguf.tensors[f"blk.{i}.{n}.weight"].tensor_type.name for n in names]
            quantized = [t for t in types if t not in ("F32", "F16", "BF16")]
            if not quantized:
                continue
            if any(t not in LAYER_FORMAT for t in types) or len({LAYER_FORMAT[t] for t in types}) != 1:
                left(len(quantized))  # a float part, an unsupported type, or int4 and int8 parts
                continue
            module = getattr(getattr(layer, owner), attr)
            bias = None if module.bias is None else module.bias.data
            parts = _layer_groups(gguf, i, names, cfg)
            setattr(getattr(layer, owner), attr, _build(parts, bias, device))
            gguf.release_pages(*(f"blk.{i}.{n}.weight" for n in names))
            kept(types)

    dtype = model.run_dtype
    emb = gguf.tensors.get("token_embd.weight")
    if emb is not None and emb.tensor_type.name in LAYER_FORMAT:
        g = unpack(emb.data, emb.tensor_type.name)
        q, s, z = int8_from_groups(g) if LAYER_FORMAT[g.qtype] == "int8" else _int4_as_int8(g)
        tied = model.lm_head is None
        model.embed_tokens = Int8Embedding(q.to(device), s.to(device), _to(z, device), g.group, dtype, head=tied)
        gguf.release_pages("token_embd.weight")
        kept([g.qtype])
    elif emb is not None and emb.tensor_type.name not in ("F32", "F16", "BF16"):
        left(1)
    out = gguf.tensors.get("output.weight")
    if out is not None and model.lm_head is not None:
        qtype = out.tensor_type.name
        if qtype in LAYER_FORMAT:
            model.lm_head = _build([unpack(out.data, qtype)], None, device)
            kept([qtype])
        elif qtype not in ("F32", "F16", "BF16"):
            left(1)
    return counts


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _int4_as_int8(g: Groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A 4-bit embedding in the int8 layout (q fits int8 as it is: exact, one byte per weight)."""
    return torch.from_numpy(g.q.astype(np.int8)), torch.from_numpy(g.d), None if g.m is None else torch.from_numpy(g.m)


def load_int4_from_gguf(model, gguf) -> int:
    """Replace every decoder matrix whose GGUF tensors are all Q4_0/Q4_1 by an Int4Linear built from
    the blocks themselves, on the CPU; returns how many were replaced (others are left for the
    caller). `model` may be on the meta device, as for load_gguf_packed."""
    cfg = model.config
    count = 0
    for i, layer in enumerate(model.layers):
        for (owner, attr), names in _LAYER_PARTS:
            tensors = [gguf.tensors[f"blk.{i}.{n}.weight"] for n in names]
            if any(t.tensor_type.name not in _BYTES for t in tensors):
                continue
            module = getattr(getattr(layer, owner), attr)
            bias = None if module.bias is None else module.bias.data
            parts = _layer_groups(gguf, i, names, cfg)
            setattr(getattr(layer, owner), attr, _build(parts, bias, torch.device("cpu")))
            count += 1
    return count


def packed_tensors(model) -> set[str]:
    """Names of the GGUF weight tensors that `model` already holds as packed layers (after
    load_gguf_packed / load_int4_from_gguf): the loader must neither dequantize nor copy them."""
    names = set()
    for i, layer in enumerate(model.layers):
        for (owner, attr), parts in _LAYER_PARTS:
            if isinstance(getattr(getattr(layer, owner), attr), QuantLinear):
                names.update(f"blk.{i}.{n}.weight" for n in parts)
    if isinstance(model.embed_tokens, QuantLinear):
        names.add("token_embd.weight")
    if isinstance(model.lm_head, QuantLinear):
        names.add("output.weight")
    return names
