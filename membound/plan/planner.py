"""`membound plan`: what fits on a GPU and how fast decode can be, by arithmetic.

Decode reads every weight matrix once per step (shared by the whole batch) plus each
sequence's KV cache; it computes 2 FLOPs per weight per token plus attention. The bound
on a step is the larger of bytes / bandwidth and FLOPs / peak rate. All of that arithmetic is
the cost model's (membound/costs.py), the one the engine's memory plan, the doctor and bench
use; this module reads model shapes and lays the numbers out.
"""

from __future__ import annotations

import dataclasses
import pathlib

from membound import costs
from membound.config import DEFAULT_CPU_KV_CACHE_BYTES
from membound.costs import KV_DTYPE_BYTES, WeightBytes, shape_weight_bytes
from membound.costs import weight_bits as weight_bits  # re-exported: `membound plan` names formats by it
from membound.errors import ConfigError
from membound.model.config import ModelConfig
from membound.model.registry import PRESETS, default_model_path
from membound.plan.gpus import GPUSpec

BLOCK_SIZE = 16  # the engine's default block_size
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KV_DTYPES = (*KV_DTYPE_BYTES, "auto")  # auto: what the engine picks, fp32 on a CPU, else bf16


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    config: ModelConfig
    weights: WeightBytes
    weight_format: str  # e.g. "bf16", "int4", "Q4_1" or "GGUF (Q4_1 x 169, ...)"


def gguf_weight_bytes(reader) -> tuple[WeightBytes, str]:
    """Exact bytes from a GGUF header (each tensor's type and element count), no data read."""
    tensors = [costs.GGUFTensor(t.name, t.tensor_type.name, int(t.n_elements), len(t.shape)) for t in reader.tensors]
    wb, counts = costs.gguf_weight_bytes(tensors)
    mix = ", ".join(f"{k} x {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return wb, f"GGUF ({mix})"


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
            wb, fmt = gguf_weight_bytes(g.reader)
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
    kv_budget_bytes: int  # see kv_budget_source
    kv_budget_source: str  # "device": budget - weights - overhead; "given": kv_cache_memory_bytes; "cpu default"
    fits: bool
    headroom_bytes: int  # kv budget - kv needed (negative: short by that much)
    max_concurrency: int  # at `context`
    max_context: int  # at `concurrency`, before the model's own limit
    model_max_context: int
    block_size: int
    kv_block_bytes: int
    kv_blocks: int  # whole blocks in the KV budget: what the engine's memory plan allocates
    kv_cache_bytes: int  # kv_blocks x kv_block_bytes
    kv_tokens: int  # kv_blocks x block_size
    decode: list[DecodePoint]
    crossover_batch: int | None  # smallest batch where compute, not memory, bounds the step
    prefill_seconds: float  # a `context`-token prompt, alone: max(FLOPs / peak, weight bytes / bandwidth)
    peak_tflops: float
    bandwidth_gbs: float
    context_fit: costs.ContextFit | None = None  # context="auto": the engine's max_model_len="auto" choice

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def runs_packed(weight_format: str) -> bool:
    """Whether the engine would run these weights on its packed kernels (int4/int8, or a GGUF whose
    layers hold a type it keeps packed; load_shape names a GGUF's format "GGUF (Q4_1 x 210, ...)")."""
    from membound.quant.gguf_blocks import LAYER_FORMAT

    if weight_format in ("int4", "int8") or LAYER_FORMAT.get(weight_format) == "int4":
        return True
    types = weight_format.removeprefix("GGUF (").rstrip(")").split(", ")
    return weight_format.startswith("GGUF") and any(LAYER_FORMAT.get(t.split(" x ")[0]) == "int4" for t in types)


def resolve_kv_dtype(kv_dtype: str, gpu: GPUSpec, packed: bool = False) -> str:
    """The engine's kv_cache_dtype="auto" is the run dtype (EngineConfig.torch_dtype): 16-bit on a GPU;
    on a CPU bf16 for packed weights where it has bf16 in hardware, else fp32."""
    if kv_dtype == "auto":
        if not gpu.cpu:
            return "bf16"
        from membound.cpu import has_native_bf16

        return "bf16" if packed and has_native_bf16() else "fp32"
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ConfigError(f"kv dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


def make_plan(
    shape: ModelShape,
    gpu: GPUSpec,
    context: int | str,
    concurrency: int,
    kv_dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    overhead_bytes: int = 1 << 30,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    kv_cache_memory_bytes: int | None = None,
    block_size: int = BLOCK_SIZE,
) -> Plan:
    """The engine's memory plan and decode bounds by arithmetic. `kv_cache_memory_bytes` fixes the
    KV budget as the engine's option of that name does; otherwise it is what the engine takes:
    on a CPU the default budget (at most a quarter of RAM), on a GPU utilization x memory less
    the weights and `overhead_bytes` (activations, graphs, CUDA context).

    context="auto": the longest at which `concurrency` sequences fit the KV budget, chosen (with
    kv_dtype "auto", the KV precision too) by the engine's rule, costs.fit_context, for the attention
    backend the engine would run: Triton on a GPU, PyTorch on a CPU."""
    choose_kv_dtype = kv_dtype == "auto"
    kv_dtype = resolve_kv_dtype(kv_dtype, gpu, runs_packed(shape.weight_format))
    if context != "auto" and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise ConfigError(f"context must be a positive integer or 'auto', got {context!r}")
    for name, v in (("concurrency", concurrency), ("block_size", block_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if kv_cache_memory_bytes is not None and kv_cache_memory_bytes < 1:
        raise ConfigError(f"kv_cache_memory_bytes must be positive, got {kv_cache_memory_bytes!r}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    cfg, wb = shape.config, shape.weights
    budget = int(gpu.memory_bytes * gpu_memory_utilization)
    room = costs.kv_budget_bytes(gpu.memory_bytes, gpu_memory_utilization, wb.stored, overhead_bytes)
    if kv_cache_memory_bytes is not None:
        kv_budget, source = kv_cache_memory_bytes, "given"
    elif gpu.cpu:
        kv_budget, source = costs.cpu_kv_budget_bytes(gpu.memory_bytes, DEFAULT_CPU_KV_CACHE_BYTES), "cpu default"
    else:
        kv_budget, source = room, "device"
    fit = None
    if context == "auto":
        backend = "torch" if gpu.cpu else "triton"  # the engine's attention_backend="auto"
        options = [kv_dtype, *costs.BACKEND_KV_DTYPES[backend]]
        per_token = {k: costs.kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, k) for k in options}
        fit = costs.fit_context(
            kv_budget, per_token, block_size, concurrency, cfg.max_position_embeddings, choose_kv_dtype
        )
        context, kv_dtype = fit.max_model_len, fit.kv_dtype
    kv = costs.KVCost(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype)
    kv_tok, block_bytes = kv.bytes_per_token, kv.bytes_per_block(block_size)
    per_seq = kv.bytes_for(context, block_size)
    kv_needed = concurrency * per_seq
    blocks = costs.kv_blocks(kv_budget, block_bytes)
    max_conc = max(0, kv_budget // per_seq)
    max_ctx = costs.max_context(kv_budget, kv_tok, block_size, concurrency)

    fp8_weights = shape.weight_format.lower() == "fp8" and gpu.fp8_tflops is not None
    tflops = gpu.fp8_tflops if fp8_weights else gpu.bf16_tflops
    peak, bw = tflops * 1e12, gpu.bandwidth
    model = costs.DecodeCost.of(cfg, wb, kv_tok)
    points = []
    for b in batches:
        step = model.step(b, context)
        mem_tok_s, comp_tok_s = b / step.memory_seconds(bw), b / step.compute_seconds(peak)
        bound = costs.roofline_tok_s(step, b, bw, peak)
        points.append(DecodePoint(b, step.bytes, step.flops, mem_tok_s, comp_tok_s, bound, bound / b))
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
        kv_budget_source=source,
        fits=kv_needed <= kv_budget <= room,
        headroom_bytes=kv_budget - kv_needed,
        max_concurrency=int(max_conc),
        max_context=int(max_ctx),
        model_max_context=cfg.max_position_embeddings,
        block_size=block_size,
        kv_block_bytes=block_bytes,
        kv_blocks=blocks,
        kv_cache_bytes=blocks * block_bytes,
        kv_tokens=blocks * block_size,
        decode=points,
        crossover_batch=model.crossover_batch(context, bw, peak),
        prefill_seconds=model.prefill(context).bound_seconds(bw, peak),
        peak_tflops=tflops,
        bandwidth_gbs=gpu.bandwidth_gbs,
        context_fit=fit,
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def render(plan: Plan, shape: ModelShape) -> str:
    c = shape.config
    params = shape.weights.matmul_params + (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
    room = plan.budget_bytes - plan.weight_bytes - plan.overhead_bytes
    kv_source = {"device": "", "given": "; given", "cpu default": "; the engine's CPU default"}[plan.kv_budget_source]
    if kv_source:
        kv_source += f" {_gib(plan.kv_budget_bytes)}"
    lines = [
        f"model     {plan.model}: {params / 1e9:.2f} B params, {c.num_layers} layers, {c.num_heads} heads / "
        f"{c.num_kv_heads} KV heads (GQA {c.num_heads // c.num_kv_heads}:1), head_dim {c.head_dim}",
        f"weights   {plan.weight_format}: {_gib(plan.weight_bytes)} stored, {_gib(plan.weight_bytes_per_step)} "
        "read per decode step (the embedding table is only gathered from)",
        f"KV cache  {plan.kv_dtype}: {plan.kv_bytes_per_token:,} bytes/token (2 x {c.num_layers} layers x "
        f"{c.num_kv_heads} KV heads x ({c.head_dim} x {KV_DTYPE_BYTES[plan.kv_dtype]} B"
        + (f" + {costs.KV_SCALE_BYTES[plan.kv_dtype]} B scale" if plan.kv_dtype in costs.KV_SCALE_BYTES else "")
        + f")); {plan.context:,} tokens x {plan.concurrency} seqs = {_gib(plan.kv_bytes_needed)}",
        f"device    {plan.gpu}: {_gib(plan.memory_bytes)}, {plan.bandwidth_gbs:,.0f} GB/s, "
        f"{plan.peak_tflops:,.1f} TFLOPS dense",
        f"memory    {_gib(plan.budget_bytes)} budget - {_gib(plan.weight_bytes)} weights - "
        f"{_gib(plan.overhead_bytes)} overhead = {_gib(room)}{kv_source} for KV: "
        + (
            f"FITS, {_gib(plan.headroom_bytes)} headroom"
            if plan.fits
            else f"DOES NOT FIT, short by {_gib(max(-plan.headroom_bytes, plan.kv_budget_bytes - room))}"
        ),
        f"          = {plan.kv_blocks:,} blocks of {plan.block_size} tokens ({plan.kv_block_bytes:,} B each) = "
        f"{plan.kv_tokens:,} tokens, {_gib(plan.kv_cache_bytes)}",
        f"          largest concurrency at {plan.context:,} tokens: {plan.max_concurrency:,}; largest context at "
        f"{plan.concurrency} seqs: {plan.max_context:,} tokens"
        + (
            f" (the model's own limit is {plan.model_max_context:,})"
            if plan.max_context > plan.model_max_context
            else ""
        ),
        *([f"context   auto: {plan.context_fit.describe()}"] if plan.context_fit is not None else []),
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
