"""The cost model: weight bytes read per decode step, KV bytes per token, FLOPs, and the bounds they set.

One module, used by the engine's memory plan (engine/memory.py, engine/kv_cache.py's
KVCacheSpec), `membound plan`, `membound doctor` and `membound bench`, so the four agree by
construction. Pure arithmetic on plain numbers and frozen dataclasses: nothing here needs a
tensor, and nothing imports the engine, the server, bench or plan. (`loaded_weight_bytes`
walks a loaded model, importing torch and quant/linear.py only when it is called.)

The model of a decode step:
- weights: every matrix is read once per step, shared by the whole batch; the token embedding
  is only gathered from (a few rows), unless it is also the LM head (tied);
- KV: each sequence reads its whole cache, `context x kv_bytes_per_token`;
- FLOPs: 2 per weight multiplied per token (layers and LM head), plus attention's
  QK^T and PV, 4 x context x layers x heads x head_dim per token;
- the bound on a step is the larger of bytes / bandwidth and FLOPs / peak rate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from membound.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

GB = 1e9  # bandwidths are quoted in GB/s (1e9 bytes/s)

# ---------------------------------------------------------------------- KV cache

KV_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}  # fp8: e4m3, scale 1
KV_SCALE_BYTES = {"int8": 4}  # membound's int8 cache: an fp32 scale per token, head, and K or V
_DTYPE_NAMES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
}


def kv_dtype_name(dtype: object) -> str:
    """'fp32', 'bf16', 'fp16', 'fp8' or 'int8' for a torch dtype or any of those names."""
    s = str(dtype).removeprefix("torch.").lower()
    name = _DTYPE_NAMES.get(s, s)
    if name not in KV_DTYPE_BYTES:
        raise ConfigError(f"KV cache dtype must be one of {', '.join(KV_DTYPE_BYTES)}, got {dtype!r}")
    return name


@dataclasses.dataclass(frozen=True)
class KVCost:
    """Bytes of the paged KV cache: per token, per block, per sequence."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # a kv_dtype_name (a torch dtype is accepted and normalized)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", kv_dtype_name(self.dtype))

    @property
    def element_bytes(self) -> int:
        return KV_DTYPE_BYTES[self.dtype]

    @property
    def scale_bytes(self) -> int:
        """Per head vector (one token, one head, K or V): int8's fp32 scale, 0 otherwise."""
        return KV_SCALE_BYTES.get(self.dtype, 0)

    @property
    def bytes_per_head_vector(self) -> int:
        return self.head_dim * self.element_bytes + self.scale_bytes

    @property
    def bytes_per_token(self) -> int:
        """K and V, every layer, every KV head (GQA: KV heads, not query heads)."""
        return 2 * self.num_layers * self.num_kv_heads * self.bytes_per_head_vector

    def bytes_per_block(self, block_size: int) -> int:
        return self.bytes_per_token * block_size

    def bytes_for(self, tokens: int, block_size: int) -> int:
        """What a sequence of `tokens` holds: whole blocks."""
        return blocks_for(tokens, block_size) * self.bytes_per_block(block_size)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: object) -> int:
    return KVCost(num_layers, num_kv_heads, head_dim, dtype).bytes_per_token


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def kv_blocks(budget_bytes: int, bytes_per_block: int) -> int:
    """Whole blocks that fit in a KV budget."""
    return max(0, budget_bytes // bytes_per_block)


def kv_budget_bytes(memory_bytes: int, utilization: float, weight_bytes: int, reserved_bytes: int) -> int:
    """The KV cache's share of a device: utilization x memory, less the weights and what else is
    reserved (activations, CUDA graphs, the CUDA context, other processes)."""
    return int(utilization * memory_bytes) - weight_bytes - reserved_bytes


def cpu_kv_budget_bytes(physical_bytes: int, default_bytes: int) -> int:
    """The engine's KV budget on a CPU when none is given: the default, at most a quarter of RAM."""
    return min(default_bytes, physical_bytes // 4)


# ---------------------------------------------------------------------- context chosen to fit

# The KV precisions each attention backend reads besides the run dtype: the Triton kernels read
# int8 codes + scales but not fp8, the PyTorch backend both (engine/builder.py refuses the rest).
BACKEND_KV_DTYPES = {"torch": ("fp8", "int8"), "triton": ("int8",)}


def max_context(budget_bytes: int, bytes_per_token: int, block_size: int, concurrency: int) -> int:
    """The longest context `concurrency` sequences can each hold in a KV budget. A sequence of L
    tokens holds ceil(L / block_size) whole blocks, so N of them fit in B blocks while
    N x ceil(L / block_size) <= B: L = (B // N) x block_size (0: not even a block each)."""
    return kv_blocks(budget_bytes, bytes_per_token * block_size) // concurrency * block_size


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class ContextFit:
    """max_model_len="auto": the context (and KV precision) chosen for `concurrency` sequences."""

    max_model_len: int
    kv_dtype: str
    concurrency: int
    budget_bytes: int
    block_size: int
    max_positions: int  # the model's own context length: the choice never exceeds it
    kv_bytes_per_token: dict[str, int]  # the precisions weighed, the one asked for (or the run dtype) first
    kv_dtype_chosen: bool  # kv_cache_dtype "auto" let the rule pick; False: it was given

    def context(self, kv_dtype: str) -> int:
        """The longest context at `concurrency` in `kv_dtype`, at most the model's."""
        n = max_context(self.budget_bytes, self.kv_bytes_per_token[kv_dtype], self.block_size, self.concurrency)
        return min(n, self.max_positions)

    def blocks(self, kv_dtype: str) -> int:
        return kv_blocks(self.budget_bytes, self.kv_bytes_per_token[kv_dtype] * self.block_size)

    @property
    def alternative(self) -> str | None:
        """Another precision weighed that would allow a longer context (the longest), if any."""
        best = max(self.kv_bytes_per_token, key=self.context)  # ties: the first listed
        return best if self.context(best) > self.max_model_len else None

    def describe(self) -> str:
        """One line: what was chosen, and why."""
        n, length = self.concurrency, self.max_model_len
        blocks = self.blocks(self.kv_dtype)
        line = f"{n} x {length:,} tokens in {_size(self.budget_bytes)} of {self.kv_dtype} KV"
        if length == self.max_positions:
            line += " (the model's full context)"
        else:
            line += f" ({blocks:,} blocks of {self.block_size}, {blocks // n:,} per sequence)"
        asked = next(iter(self.kv_bytes_per_token))
        if self.kv_dtype != asked:
            a = self.context(asked)
            line += f"; {asked} would allow only " + (f"{n} x {a:,}" if a else "less than a block each")
        alt = self.alternative
        if alt is not None:
            line += f"; {alt} would allow {n} x {self.context(alt):,}"
        return line


def fit_context(
    budget_bytes: int,
    kv_bytes_per_token: dict[str, int],
    block_size: int,
    concurrency: int,
    max_positions: int,
    choose_kv_dtype: bool = False,
) -> ContextFit:
    """The largest context at which `concurrency` sequences fit in `budget_bytes` of KV cache:
    whole blocks per sequence, at most the model's `max_positions`.

    `kv_bytes_per_token`: the precisions to weigh, the one asked for first (the run dtype when
    kv_cache_dtype is "auto"). Rule when `choose_kv_dtype`: keep the first if it holds the model's
    full context at `concurrency` (no precision lost for nothing); else take the narrowest (fewest
    bytes per token) if that allows a longer context. Otherwise the first is kept and a longer
    alternative is only reported (ContextFit.describe)."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"target_concurrency must be a positive integer, got {concurrency!r}")
    if not kv_bytes_per_token:
        raise ConfigError("fit_context needs at least one KV precision")
    asked = next(iter(kv_bytes_per_token))
    fit = ContextFit(0, asked, concurrency, budget_bytes, block_size, max_positions, dict(kv_bytes_per_token), False)
    kv_dtype = asked
    narrowest = min(kv_bytes_per_token, key=kv_bytes_per_token.__getitem__)  # ties: the first listed
    if choose_kv_dtype and fit.context(asked) < max_positions and fit.context(narrowest) > fit.context(asked):
        kv_dtype = narrowest
    length = fit.context(kv_dtype)
    if length == 0:
        alt = fit.alternative
        hint = f"; {alt} would hold {concurrency} x {fit.context(alt):,} tokens" if alt else ""
        raise ConfigError(
            f"max_model_len='auto': target_concurrency={concurrency} sequences need a {block_size}-token block "
            f"each, but the KV budget of {_size(budget_bytes)} holds {fit.blocks(kv_dtype):,} blocks of "
            f"{kv_dtype} ({kv_bytes_per_token[kv_dtype]:,} bytes/token){hint}; lower target_concurrency or give "
            "the KV cache more memory (kv_cache_memory_bytes, gpu_memory_utilization)"
        )
    return dataclasses.replace(fit, max_model_len=length, kv_dtype=kv_dtype, kv_dtype_chosen=choose_kv_dtype)


# ---------------------------------------------------------------------- weights


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    stored: int  # on the device
    per_step: int  # read by one decode step: all but the embedding table (unless tied to the LM head)
    matmul_params: int  # weights multiplied per token (layers + LM head): 2 FLOPs each


@dataclasses.dataclass(frozen=True)
class TensorBytes:
    """One stored weight (or a group of them): its bytes, and its elements if a token multiplies by it."""

    name: str
    nbytes: int
    matmul_params: int = 0  # 0: not multiplied (norms, biases, a lookup table)
    embedding: bool = False  # the token table: gathered from, not streamed (unless tied)
    embedding_params: int = 0  # its elements, which a tied LM head multiplies by


def weight_bytes(tensors: Iterable[TensorBytes], tied: bool) -> WeightBytes:
    """Stored bytes, bytes read per decode step and matmul parameters of a set of weights."""
    stored = per_step = matmul = 0
    for t in tensors:
        stored += t.nbytes
        if not t.embedding or tied:
            per_step += t.nbytes
        matmul += t.matmul_params + (t.embedding_params if t.embedding and tied else 0)
    return WeightBytes(stored, per_step, matmul)


class _ModelShape(Protocol):  # what membound.model.config.ModelConfig provides
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool


def layer_matmul_params(cfg: _ModelShape) -> int:
    """Weights of one decoder layer's matrices: q, k, v, o and the gated MLP."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return h * (q + 2 * kv) + q * h + 3 * h * i


def matmul_params(cfg: _ModelShape) -> int:
    """Weights multiplied per token: every layer's matrices and the LM head."""
    return cfg.num_layers * layer_matmul_params(cfg) + cfg.vocab_size * cfg.hidden_size


_DENSE_BITS = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "fp8": 8.0, "int8": 8.0}
INT4_GROUP = 128  # int4 stores a 16-bit scale and zero point per group of 128 weights


def gguf_block_size(qtype: str) -> tuple[int, int]:
    """(elements, bytes) of one block of a GGUF tensor type (F32 is (1, 4))."""
    import gguf

    try:
        t = gguf.GGMLQuantizationType[qtype.upper()]
    except KeyError:
        raise ConfigError(f"unknown GGUF tensor type {qtype!r}") from None
    return gguf.GGML_QUANT_SIZES[t]


def gguf_tensor_bytes(qtype: str, n_elements: int) -> int:
    """Bytes of a GGUF tensor of `n_elements` stored as `qtype`: whole blocks of the type."""
    block, size = gguf_block_size(qtype)
    if n_elements % block:
        raise ConfigError(f"{n_elements} elements are not whole {qtype} blocks of {block}")
    return n_elements // block * size


def weight_bits(fmt: str) -> float:
    """Bits per weight of a format: dense types, int4 (group 128), or a GGUF block type."""
    f = fmt.lower()
    if f in _DENSE_BITS:
        return _DENSE_BITS[f]
    if f == "int4":
        return 4 + 32 / INT4_GROUP
    try:
        block, size = gguf_block_size(fmt)
    except ConfigError:
        known = ", ".join([*_DENSE_BITS, "int4", "or a GGUF type such as Q8_0, Q4_K, Q6_K"])
        mixed = " (llama.cpp's _S/_M/_L files mix types: give the GGUF file for exact bytes)" if "_" in f else ""
        raise ConfigError(f"unknown weight format {fmt!r}{mixed}; known: {known}") from None
    return size * 8 / block


def is_gguf_type(fmt: str) -> bool:
    return fmt.lower() not in _DENSE_BITS and fmt.lower() != "int4"


def shape_weight_bytes(cfg: _ModelShape, fmt: str) -> WeightBytes:
    """Bytes of a model whose matmul weights are stored as `fmt` (norms 16-bit).

    The LM head and embedding table follow `fmt` for GGUF types (llama.cpp quantizes them);
    for fp8/int8/int4 they stay 16-bit, as fp8/AWQ/GPTQ checkpoints keep them.
    """
    h, v = cfg.hidden_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer_matmul = layer_matmul_params(cfg)
    small = cfg.num_layers * (
        2 * h + (q + 2 * kv if cfg.attention_bias else 0) + (2 * cfg.head_dim if cfg.qk_norm else 0)
    )
    small += h  # final norm
    bits = weight_bits(fmt)
    head_bits = bits if is_gguf_type(fmt) or fmt.lower() in ("fp32", "bf16", "fp16") else 16.0
    layers = cfg.num_layers * layer_matmul * bits / 8
    head = v * h * head_bits / 8
    norms = small * 2  # 16-bit
    embed = 0 if cfg.tie_word_embeddings else head
    per_step = layers + head + norms
    return WeightBytes(int(per_step + embed), int(per_step), matmul_params(cfg))


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str  # as the file names it: "blk.0.attn_q.weight", "token_embd.weight", "output.weight"
    qtype: str  # "Q4_1", "Q8_0", "F32", ...
    n_elements: int
    n_dims: int


GGUF_EMBEDDING = "token_embd.weight"
GGUF_LM_HEAD = "output.weight"


def gguf_weight_bytes(tensors: Iterable[GGUFTensor]) -> tuple[WeightBytes, dict[str, int]]:
    """Exact bytes of a GGUF file's weights from its tensor types' block sizes (no data read),
    and how many tensors of each type it holds. Matrices (2-D tensors) are multiplied per token;
    without an `output.weight` the LM head is the embedding table (tied)."""
    tensors = list(tensors)
    tied = not any(t.name == GGUF_LM_HEAD for t in tensors)
    counts: dict[str, int] = {}
    parts = []
    for t in tensors:
        counts[t.qtype] = counts.get(t.qtype, 0) + 1
        nbytes = gguf_tensor_bytes(t.qtype, t.n_elements)
        if t.name == GGUF_EMBEDDING:
            parts.append(TensorBytes(t.name, nbytes, embedding=True, embedding_params=t.n_elements))
        else:
            parts.append(TensorBytes(t.name, nbytes, t.n_elements if t.n_dims >= 2 else 0))
    return weight_bytes(parts, tied), counts


def loaded_weight_bytes(model: nn.Module, tied: bool) -> WeightBytes:
    """What a loaded model holds and streams: stored bytes as quant/linear.py's
    `linear_weight_bytes` measures them (quantized layers as stored), less the embedding table
    when it is not also the LM head; matmul parameters of every matrix a token goes through."""
    from torch import nn

    from membound.quant.linear import Int8Embedding, QuantLinear, linear_weight_bytes

    stored, macs = linear_weight_bytes(model)  # macs: the quantized layers'
    emb = getattr(model, "embed_tokens", None)
    embed_bytes = embed_params = 0
    if isinstance(emb, nn.Embedding):
        embed_bytes, embed_params = emb.weight.numel() * emb.weight.element_size(), emb.weight.numel()
    elif isinstance(emb, QuantLinear):  # kept packed (Int8Embedding): a lookup reads a few rows
        embed_bytes, embed_params = emb.weight_nbytes(), emb.in_features * emb.out_features
    dense = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    planes = emb.planes_nbytes() if isinstance(emb, Int8Embedding) and tied else 0
    if planes:  # the tied head multiplies by its nibble planes; the int8 table serves lookups only
        parts = [
            TensorBytes("embed_tokens", embed_bytes - planes, embedding=True),
            TensorBytes("lm_head (nibble planes of embed_tokens)", planes, embed_params),
            TensorBytes("everything else", stored - embed_bytes, macs + dense),
        ]
        return weight_bytes(parts, tied=False)
    parts = [
        TensorBytes("embed_tokens", embed_bytes, embedding=True, embedding_params=embed_params),
        TensorBytes("everything else", stored - embed_bytes, macs + dense),
    ]
    return weight_bytes(parts, tied)


# ---------------------------------------------------------------------- FLOPs and bounds


def attention_flops_per_token(num_layers: int, num_heads: int, head_dim: int, context: float) -> float:
    """QK^T and PV of one new token against `context` cached ones: 2 x 2 FLOPs per element."""
    return 4 * context * num_layers * num_heads * head_dim


def decode_flops_per_token(matmul_params: int, num_layers: int, num_heads: int, head_dim: int, context: float) -> float:
    return 2 * matmul_params + attention_flops_per_token(num_layers, num_heads, head_dim, context)


def prefill_flops(matmul_params: int, num_layers: int, num_heads: int, head_dim: int, tokens: int) -> float:
    """A `tokens`-long prompt alone: 2 FLOPs per weight per token, causal attention (half the square)."""
    return 2 * matmul_params * tokens + 2 * num_layers * num_heads * head_dim * tokens**2


def matmul_flops(m: int, n: int, k: int) -> float:
    return 2 * m * n * k


@dataclasses.dataclass(frozen=True)
class StepCost:
    """What one decode step moves and computes."""

    weight_bytes: int
    kv_bytes: int
    flops: float

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def memory_seconds(self, bandwidth: float) -> float:
        """bandwidth in bytes/s."""
        return self.bytes / bandwidth

    def compute_seconds(self, peak_flops: float) -> float:
        return self.flops / peak_flops

    def bound_seconds(self, bandwidth: float, peak_flops: float) -> float:
        return max(self.memory_seconds(bandwidth), self.compute_seconds(peak_flops))


@dataclasses.dataclass(frozen=True)
class DecodeCost:
    """A model's decode costs: its weights, its KV bytes per token and its attention shape."""

    weights: WeightBytes
    kv_bytes_per_token: int
    num_layers: int
    num_heads: int
    head_dim: int

    @classmethod
    def of(cls, cfg: _ModelShape, weights: WeightBytes, kv_bytes_per_token: int) -> DecodeCost:
        return cls(weights, kv_bytes_per_token, cfg.num_layers, cfg.num_heads, cfg.head_dim)

    def flops_per_token(self, context: float) -> float:
        return decode_flops_per_token(
            self.weights.matmul_params, self.num_layers, self.num_heads, self.head_dim, context
        )

    def step(self, batch: int, context: float) -> StepCost:
        """`batch` sequences at `context` tokens each (a float: the mean over a run)."""
        kv = int(batch * context * self.kv_bytes_per_token)
        return StepCost(self.weights.per_step, kv, batch * self.flops_per_token(context))

    def prefill(self, tokens: int) -> StepCost:
        flops = prefill_flops(self.weights.matmul_params, self.num_layers, self.num_heads, self.head_dim, tokens)
        return StepCost(self.weights.per_step, tokens * self.kv_bytes_per_token, flops)

    def crossover_batch(self, context: float, bandwidth: float, peak_flops: float) -> int | None:
        """The smallest batch whose step is compute-bound, or None if KV reads keep it memory-bound.

        mem_t(B) = (W + B C kv) / bw and comp_t(B) = B f / peak: comp_t >= mem_t once
        B >= (W / bw) / (f / peak - C kv / bw)."""
        slope = self.flops_per_token(context) / peak_flops - context * self.kv_bytes_per_token / bandwidth
        return math.ceil((self.weights.per_step / bandwidth) / slope) if slope > 0 else None


def decode_bound_tok_s(bytes_per_step: float, bandwidth: float, batch: int = 1) -> float:
    """Tokens per second if a step of `bytes_per_step` is bound by `bandwidth` (bytes/s) alone."""
    return batch * bandwidth / bytes_per_step


def roofline_tok_s(step: StepCost, batch: int, bandwidth: float, peak_flops: float) -> float:
    """Aggregate tokens per second at the larger of the memory and compute times."""
    return batch / step.bound_seconds(bandwidth, peak_flops)
