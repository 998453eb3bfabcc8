"""`membound plan`: what fits on a GPU and how fast decode can be, by arithmetic.

Decode reads every weight matrix once per step (shared by the whole batch) plus each
sequence's KV cache; it computes 2 FLOPs per weight per token plus attention. The bound
on a step is the larger of bytes / bandwidth and FLOPs / peak rate.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

from membound.errors import ConfigError
from membound.model.config import ModelConfig
from membound.model.registry import PRESETS, default_model_path
from membound.plan.gpus import GPUSpec

BLOCK_SIZE = 16
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KV_DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}  # fp8: scale 1; int8: + scales below
KV_SCALE_BYTES = {"int8": 4}  # membound's int8 cache: an fp32 scale per token, head, and K or V
_DENSE_BITS = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "fp8": 8.0, "int8": 8.0}
INT4_GROUP = 128  # int4 stores a 16-bit scale and zero point per group of 128 weights


def weight_bits(fmt: str) -> float:
    """Bits per weight of a format: dense types, int4 (group 128), or a GGUF block type."""
    f = fmt.lower()
    if f in _DENSE_BITS:
        return _DENSE_BITS[f]
    if f == "int4":
        return 4 + 32 / INT4_GROUP
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType[fmt.upper()]
    except KeyError:
        known = ", ".join([*_DENSE_BITS, "int4", "or a GGUF type such as Q8_0, Q4_K, Q6_K"])
        mixed = " (llama.cpp's _S/_M/_L files mix types: give the GGUF file for exact bytes)" if "_" in f else ""
        raise ConfigError(f"unknown weight format {fmt!r}{mixed}; known: {known}") from None
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size * 8 / block


def _is_gguf_type(fmt: str) -> bool:
    return fmt.lower() not in _DENSE_BITS and fmt.lower() != "int4"


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    stored: int  # on the device
    per_step: int  # read by one decode step: all but the embedding table (unless tied to the LM head)
    matmul_params: int  # weights multiplied per token (layers + LM head): 2 FLOPs each


def shape_weight_bytes(cfg: ModelConfig, fmt: str) -> WeightBytes:
    """Bytes of a model whose matmul weights are stored as `fmt`.

    The LM head and embedding table follow `fmt` for GGUF types (llama.cpp quantizes them);
    for fp8/int8/int4 they stay 16-bit, as fp8/AWQ/GPTQ checkpoints keep them.
    """
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer_matmul = h * (q + 2 * kv) + q * h + 3 * h * i
    small = cfg.num_layers * (
        2 * h + (q + 2 * kv if cfg.attention_bias else 0) + (2 * cfg.head_dim if cfg.qk_norm else 0)
    )
    small += h  # final norm
    bits = weight_bits(fmt)
    head_bits = bits if _is_gguf_type(fmt) or fmt.lower() in ("fp32", "bf16", "fp16") else 16.0
    layers = cfg.num_layers * layer_matmul * bits / 8
    head = v * h * head_bits / 8
    norms = small * 2  # 16-bit
    embed = 0 if cfg.tie_word_embeddings else head
    per_step = layers + head + norms
    return WeightBytes(int(per_step + embed), int(per_step), cfg.num_layers * layer_matmul + v * h)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    config: ModelConfig
    weights: WeightBytes
    weight_format: str  # e.g. "bf16", "int4", "Q4_1" or "GGUF (Q4_1 x 169, ...)"


def gguf_weight_bytes(reader, cfg: ModelConfig) -> tuple[WeightBytes, str]:
    """Exact bytes from a GGUF header: each tensor's stored size, no data read."""
    total, embed, counts = 0, 0, {}
    for t in reader.tensors:
        total += int(t.n_bytes)
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        if t.name == "token_embd.weight":
            embed = int(t.n_bytes)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    per_step = total if tied else total - embed
    mix = ", ".join(f"{k} x {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    matmul = cfg.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size) + cfg.vocab_size * h
    return WeightBytes(total, per_step, matmul), f"GGUF ({mix})"


def load_shape(model: str | None, weights: str | None = None) -> ModelShape:
    """A preset name, a GGUF file (header only) or a HF folder (config.json only)."""
    from membound.model.loader import GGUFFile, hf_config

    if model is not None and model.lower() in PRESETS:
        cfg, name = PRESETS[model.lower()], model.lower()
        fmt = weights or "bf16"
        return ModelShape(name, cfg, shape_weight_bytes(cfg, fmt), fmt)
    path = pathlib.Path(model) if model is not None else pathlib.Path(default_model_path())
    if path.is_file() and path.suffix.lower() == ".gguf":
        g = GGUFFile(str(path))
        cfg = g.config()
        if weights is None:
            wb, fmt = gguf_weight_bytes(g.reader, cfg)
            return ModelShape(path.name, cfg, wb, fmt)
        return ModelShape(path.name, cfg, shape_weight_bytes(cfg, weights), weights)
    if path.is_dir() and (path / "config.json").is_file():
        cfg = hf_config(str(path))
        fmt = weights or "bf16"
        return ModelShape(path.name, cfg, shape_weight_bytes(cfg, fmt), fmt)
    raise ConfigError(
        f"model {model!r} is not a preset, a GGUF file or a folder with config.json; presets: {', '.join(PRESETS)}"
    )


@dataclasses.dataclass(frozen=True)
class DecodePoint:
    batch: int
    bytes_per_step: int
    flops_per_step: float
    memory_bound_tok_s: float  # aggregate, if only bandwidth limited
    compute_bound_tok_s: float  # aggregate, if only FLOPs limited
    bound_tok_s: float  # the smaller
    per_seq_tok_s: float


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    weight_format: str
    kv_dtype: str
    gpu: str
    context: int
    concurrency: int
    weight_bytes: int
    weight_bytes_per_step: int
    kv_bytes_per_token: int
    kv_bytes_needed: int  # context x concurrency, rounded up to whole blocks per sequence
    memory_bytes: int
    budget_bytes: int  # memory x utilization
    overhead_bytes: int
    kv_budget_bytes: int  # budget - weights - overhead
    fits: bool
    headroom_bytes: int  # kv budget - kv needed (negative: short by that much)
    max_concurrency: int  # at `context`
    max_context: int  # at `concurrency`, before the model's own limit
    model_max_context: int
    decode: list[DecodePoint]
    crossover_batch: int | None  # smallest batch where compute, not memory, bounds the step
    prefill_seconds: float  # a `context`-token prompt, alone: max(FLOPs / peak, weight bytes / bandwidth)
    peak_tflops: float
    bandwidth_gbs: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _blocks_tokens(tokens: int) -> int:
    return math.ceil(tokens / BLOCK_SIZE) * BLOCK_SIZE


def make_plan(
    shape: ModelShape,
    gpu: GPUSpec,
    context: int,
    concurrency: int,
    kv_dtype: str = "bf16",
    gpu_memory_utilization: float = 0.9,
    overhead_bytes: int = 1 << 30,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
) -> Plan:
    if kv_dtype not in KV_DTYPES:
        raise ConfigError(f"kv dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    for name, v in (("context", context), ("concurrency", concurrency)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    cfg, wb = shape.config, shape.weights
    # kv_bytes_per_token counts elements (2 x layers x KV heads x head_dim); scales add per head vector.
    kv_tok = cfg.kv_bytes_per_token * KV_DTYPES[kv_dtype]
    kv_tok += cfg.kv_bytes_per_token // cfg.head_dim * KV_SCALE_BYTES.get(kv_dtype, 0)
    kv_needed = _blocks_tokens(context) * concurrency * kv_tok
    budget = int(gpu.memory_bytes * gpu_memory_utilization)
    kv_budget = budget - wb.stored - overhead_bytes
    per_seq = _blocks_tokens(context) * kv_tok
    max_conc = max(0, kv_budget // per_seq)
    max_ctx = max(0, kv_budget // (concurrency * kv_tok)) // BLOCK_SIZE * BLOCK_SIZE

    fp8_weights = shape.weight_format.lower() == "fp8" and gpu.fp8_tflops is not None
    tflops = gpu.fp8_tflops if fp8_weights else gpu.bf16_tflops
    peak, bw = tflops * 1e12, gpu.bandwidth
    attn_flops_per_token = 4 * context * cfg.num_layers * cfg.num_heads * cfg.head_dim
    points = []
    for b in batches:
        nbytes = wb.per_step + b * context * kv_tok
        flops = b * (2 * wb.matmul_params + attn_flops_per_token)
        mem_t, comp_t = nbytes / bw, flops / peak
        bound = b / max(mem_t, comp_t)
        points.append(DecodePoint(b, nbytes, flops, b / mem_t, b / comp_t, bound, bound / b))
    # mem_t(B) = (W + B*C*kv)/bw, comp_t(B) = B*f/peak: compute-bound once B >= W/bw / (f/peak - C*kv/bw).
    slope = (2 * wb.matmul_params + attn_flops_per_token) / peak - context * kv_tok / bw
    crossover = math.ceil((wb.per_step / bw) / slope) if slope > 0 else None
    prefill_flops = 2 * wb.matmul_params * context + 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context**2
    prefill = max(prefill_flops / peak, (wb.per_step + context * kv_tok) / bw)
    return Plan(
        model=shape.name,
        weight_format=shape.weight_format,
        kv_dtype=kv_dtype,
        gpu=gpu.name,
        context=context,
        concurrency=concurrency,
        weight_bytes=wb.stored,
        weight_bytes_per_step=wb.per_step,
        kv_bytes_per_token=kv_tok,
        kv_bytes_needed=kv_needed,
        memory_bytes=gpu.memory_bytes,
        budget_bytes=budget,
        overhead_bytes=overhead_bytes,
        kv_budget_bytes=kv_budget,
        fits=kv_budget >= kv_needed,
        headroom_bytes=kv_budget - kv_needed,
        max_concurrency=int(max_conc),
        max_context=int(max_ctx),
        model_max_context=cfg.max_position_embeddings,
        decode=points,
        crossover_batch=crossover,
        prefill_seconds=prefill,
        peak_tflops=tflops,
        bandwidth_gbs=gpu.bandwidth_gbs,
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def render(plan: Plan, shape: ModelShape) -> str:
    c = shape.config
    params = shape.weights.matmul_params + (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
    lines = [
        f"model     {plan.model}: {params / 1e9:.2f} B params, {c.num_layers} layers, {c.num_heads} heads / "
        f"{c.num_kv_heads} KV heads (GQA {c.num_heads // c.num_kv_heads}:1), head_dim {c.head_dim}",
        f"weights   {plan.weight_format}: {_gib(plan.weight_bytes)} stored, {_gib(plan.weight_bytes_per_step)} "
        "read per decode step (the embedding table is only gathered from)",
        f"KV cache  {plan.kv_dtype}: {plan.kv_bytes_per_token:,} bytes/token (2 x {c.num_layers} layers x "
        f"{c.num_kv_heads} KV heads x {c.head_dim} x {KV_DTYPES[plan.kv_dtype]} B); {plan.context:,} tokens x "
        f"{plan.concurrency} seqs = {_gib(plan.kv_bytes_needed)}",
        f"device    {plan.gpu}: {_gib(plan.memory_bytes)}, {plan.bandwidth_gbs:,.0f} GB/s, "
        f"{plan.peak_tflops:,.1f} TFLOPS dense",
        f"memory    {_gib(plan.budget_bytes)} budget - {_gib(plan.weight_bytes)} weights - "
        f"{_gib(plan.overhead_bytes)} overhead = {_gib(plan.kv_budget_bytes)} for KV: "
        + (
            f"FITS, {_gib(plan.headroom_bytes)} headroom"
            if plan.fits
            else f"DOES NOT FIT, short by {_gib(-plan.headroom_bytes)}"
        ),
        f"          largest concurrency at {plan.context:,} tokens: {plan.max_concurrency:,}; largest context at "
        f"{plan.concurrency} seqs: {plan.max_context:,} tokens"
        + (
            f" (the model's own limit is {plan.model_max_context:,})"
            if plan.max_context > plan.model_max_context
            else ""
        ),
        "",
        f"decode at {plan.context:,} tokens of context per sequence (upper bounds):",
        f"  {'batch':>5}  {'MB/step':>9}  {'memory-bound':>13}  {'compute-bound':>14}  "
        f"{'bound tok/s':>12}  {'per seq':>8}",
    ]
    for p in plan.decode:
        lines.append(
            f"  {p.batch:>5}  {p.bytes_per_step / 1e6:>9,.0f}  {p.memory_bound_tok_s:>13,.0f}  "
            f"{p.compute_bound_tok_s:>14,.0f}  {p.bound_tok_s:>12,.0f}  {p.per_seq_tok_s:>8,.1f}"
        )
    if plan.crossover_batch is None:
        lines.append("  never compute-bound at this context: KV reads grow with the batch as fast as the FLOPs do")
    else:
        lines.append(f"  compute-bound from batch {plan.crossover_batch:,} (memory-bound below it)")
    lines.append(
        f"prefill   a {plan.context:,}-token prompt: at least {plan.prefill_seconds * 1000:,.1f} ms "
        "(at peak FLOPS; real kernels reach roughly half to two thirds of it)"
    )
    return "\n".join(lines)
