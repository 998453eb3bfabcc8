"""Builds an engine's parts, in order: load (packed-first, quantized; the tokenizer loads on a second
thread meanwhile) -> profile -> plan memory (max_model_len="auto": the context, and the KV
precision, chosen to fit the budget) -> allocate the KV cache -> scheduler, input batch, runner ->
warm up kernels -> capture CUDA graphs. Everything that happens once, at start-up, lives here;
`core.py` is the loop and nothing else.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import logging
import time

import torch

from membound import costs
from membound.attention import AttentionBackend, get_backend
from membound.attention.base import AttentionMetadata
from membound.config import EngineConfig
from membound.cpu import ThreadGovernor, loading_heap, omp_thread_limit, usable_cores
from membound.engine.block_pool import BlockPool
from membound.engine.core import EngineCore
from membound.engine.cuda_graphs import DecodeGraphs
from membound.engine.input_batch import InputBatch, PenaltyRows
from membound.engine.kv_cache import KVCacheSpec, allocate_kv_cache, blocks_needed
from membound.engine.memory import MemoryPlan, kv_budget_bytes, plan_memory
from membound.engine.model_runner import ModelRunner
from membound.engine.sampler import SamplingBatch, sample, verify_on_device
from membound.engine.scheduler import Scheduler, SchedulerConfig
from membound.engine.speculator import NgramSpeculator
from membound.engine.warmup import synthetic_metadata, warm_up_kernels
from membound.errors import ConfigError
from membound.model.config import TURN_END_TOKENS, ModelConfig
from membound.model.loader import (
    ModelSource,
    load_config,
    load_model,
    open_gguf,
    resolve_model,
    resolve_quantization,
    runs_packed,
)
from membound.model.tokenizer import Tokenizer
from membound.sampling_params import SamplingParams

log = logging.getLogger("membound")

KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}  # kv_cache_dtype names, "auto" aside
MAX_GRAPH_BATCH = 512  # larger decode batches run eagerly: launch gaps no longer matter there


@dataclasses.dataclass
class EngineParts:
    config: EngineConfig
    device: torch.device
    dtype: torch.dtype
    backend: AttentionBackend
    source: ModelSource
    model_config: ModelConfig
    model: torch.nn.Module
    quantization: str
    tokenizer: Tokenizer | None
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    kv_spec: KVCacheSpec
    memory: MemoryPlan
    block_pool: BlockPool
    scheduler: Scheduler
    input_batch: InputBatch
    runner: ModelRunner
    core: EngineCore


def build_engine(config: EngineConfig) -> EngineParts:
    device = config.torch_device()
    source = resolve_model(config.model, config.load_format)
    t0 = time.perf_counter()
    threads = None
    if device.type == "cpu":
        # Before any op runs: the load and the warm-up already use the thread count.
        # Never more than the process was given (OMP_NUM_THREADS). Not torch's current count: another
        # engine's governor in this process (a multi-model server) may have lowered it for a while.
        cores = min(usable_cores(), omp_thread_limit() or usable_cores())
        # batch_invariant: fixed, since a BLAS may split a row's sums differently at another thread count.
        fixed = config.num_threads is not None or config.batch_invariant
        threads = ThreadGovernor(config.num_threads or cores, fixed=fixed)
    if config.batch_invariant and device.type != "cpu":
        raise ConfigError(
            "batch_invariant runs on the CPU only for now (the Triton kernels and CUDA graphs choose their "
            "work split by batch shape); use device='cpu' or leave batch_invariant off"
        )
    backend = get_backend(config.attention_backend, device, config.batch_invariant)
    gguf = open_gguf(source)
    mc = load_config(source, gguf)
    dtype = config.torch_dtype(device, runs_packed(resolve_quantization(config.quantization, source, gguf), gguf))
    if mc.gemma and dtype == torch.float16:
        # Gemma's activations pass fp16's range (HF and vLLM refuse it too).
        raise ConfigError(
            "Gemma 3 does not run in float16 (its activations overflow it); use dtype='bfloat16', or "
            "dtype='float32' with attention_backend='torch' where the device has no bf16"
        )
    if backend.name == "triton":
        from membound.kernels.decode_attention import check_shapes

        try:
            check_shapes(
                mc.num_heads, mc.num_kv_heads, config.block_size, dtype, config.kv_cache_dtype == "int8", mc.head_dim
            )
        except ValueError as e:
            raise ConfigError(str(e)) from e
    kv_dtype = KV_CACHE_DTYPES.get(config.kv_cache_dtype, dtype)
    if config.kv_cache_dtype not in ("auto", *costs.BACKEND_KV_DTYPES[backend.name]):
        raise ConfigError(
            f"kv_cache_dtype={config.kv_cache_dtype!r} runs on the PyTorch attention backend only for now; "
            f"use kv_cache_dtype={' or '.join(map(repr, costs.BACKEND_KV_DTYPES[backend.name]))} "
            f"with the {backend.name} backend"
        )
    # max_model_len="auto" is chosen from the KV budget, known only after loading and profiling:
    # until then everything is sized for the model's full context, an upper bound on the choice.
    auto_len = config.max_model_len == "auto"
    max_model_len = mc.max_position_embeddings if auto_len else config.max_model_len or mc.max_position_embeddings
    if max_model_len > mc.max_position_embeddings:
        log.warning(
            "max_model_len %d exceeds the model's context length %d; quality past it is not guaranteed",
            max_model_len,
            mc.max_position_embeddings,
        )
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="membound-tokenizer") as pool:
        # The tokenizer (mostly importing transformers) loads while the weights do.
        tokenizer_future = None
        if not config.skip_tokenizer_init and source.path is not None:
            tokenizer_future = pool.submit(Tokenizer.from_model_path, source.path)
        with loading_heap() if device.type == "cpu" else contextlib.nullcontext():
            loaded = load_model(source, backend, dtype, device, max_model_len, config.seed, gguf, config.quantization)
        tokenizer = None if tokenizer_future is None else tokenizer_future.result()
    model = loaded.model
    if config.batch_invariant:
        tiled = model.make_batch_invariant(config.max_num_batched_tokens, config.max_num_seqs)
        log.info("batch-invariant: every row alone in attention; %d matmuls on fixed row tiles", len(tiled))
    eos = set(mc.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    if tokenizer is not None:
        eos.update(tokenizer.special_token_ids(TURN_END_TOKENS.get(mc.family, ())))

    kv_spec = KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, config.block_size, kv_dtype)
    kv_options = kv_fit_options(kv_spec, backend.name, mc.num_heads, dtype) if auto_len else {}
    # Allocated before profiling, so the memory plan sees its per-slot rows as used.
    input_batch = InputBatch(config.max_num_seqs, max_model_len, config.block_size, mc.vocab_size, device, backend)
    # CUDA graphs need static shapes and no host syncs inside the forward: the Triton path has both.
    use_graphs = device.type == "cuda" and not config.enforce_eager and backend.name == "triton"
    # A KV precision still to be chosen: room for the hungriest candidate's steps.
    profiled = list(kv_options.values()) if auto_len and config.kv_cache_dtype == "auto" else [kv_spec]
    activation_peak = max(profile_activation_peak(model, s, config, max_model_len, device) for s in profiled)
    if device.type == "cuda":  # penalty counts grow at run time, up to one row per slot: keep room
        activation_peak += PenaltyRows.bytes_at_capacity(mc.vocab_size, config.max_num_seqs)
    graph_reserve = (
        max(profile_graph_memory(model, s, config, max_model_len, device) for s in profiled) if use_graphs else 0
    )
    reserved = activation_peak + graph_reserve
    budget = kv_budget_bytes(config, device, loaded.weight_bytes, reserved)
    if auto_len:
        fit = costs.fit_context(
            budget,
            {name: spec.bytes_per_token for name, spec in kv_options.items()},
            config.block_size,
            config.target_concurrency,
            mc.max_position_embeddings,
            choose_kv_dtype=config.kv_cache_dtype == "auto",
        )
        log.info("max_model_len=auto: %s", fit.describe())
        kv_spec = kv_options[fit.kv_dtype]
        if fit.max_model_len != max_model_len:  # block tables only as wide as the chosen context
            max_model_len = fit.max_model_len
            del input_batch
            input_batch = InputBatch(
                config.max_num_seqs, max_model_len, config.block_size, mc.vocab_size, device, backend
            )
    memory = plan_memory(config, kv_spec, device, loaded.weight_bytes, reserved, max_model_len, budget)
    try:
        # One block more than the pool hands out: the scratch block padded decode rows write to.
        kv_caches = allocate_kv_cache(kv_spec, memory.num_blocks + 1, device)
    except (torch.OutOfMemoryError, RuntimeError) as e:  # CPU allocators raise RuntimeError
        raise ConfigError(
            f"could not allocate the KV cache ({memory.kv_bytes / 2**30:.2f} GiB): {e}; "
            "lower kv_cache_memory_bytes / gpu_memory_utilization or max_model_len"
        ) from e
    pool = BlockPool(memory.num_blocks)
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size,
            enable_chunked_prefill=config.enable_chunked_prefill,
            enable_prefix_caching=config.enable_prefix_caching,
            long_prefill_token_threshold=config.prefill_chunk_cap(device),
        ),
        pool,
    )
    runner = ModelRunner(model, kv_caches, input_batch, device, config.seed)
    # The Triton kernels (attention, and the quantized matmuls on CUDA) compile now, not mid-serving.
    if backend.name == "triton" or (device.type == "cuda" and importlib.util.find_spec("triton")):
        t = time.perf_counter()
        warm_up_kernels(
            model, kv_caches, config.block_size, config.max_num_seqs, config.max_num_batched_tokens,
            max_model_len, memory.num_blocks,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        log.info("kernels warmed up in %.1fs", time.perf_counter() - t)
    if use_graphs:
        runner.graphs = decode_graphs(model, kv_caches, config, max_model_len, device)
        runner.graphs.capture()
    # Overlap host and device work where there is a device to overlap with.
    async_scheduling = device.type == "cuda" if config.async_scheduling is None else config.async_scheduling
    spec = config.speculative_config
    speculator = NgramSpeculator(spec) if spec is not None else None
    core = EngineCore(scheduler, runner, input_batch, async_scheduling, threads, speculator)
    log.info(
        "loaded %s (%s, %s) on %s in %.1fs; %s",
        source.name,
        mc.architecture,
        str(dtype).removeprefix("torch."),
        device,
        time.perf_counter() - t0,
        memory.describe(max_model_len),
    )
    return EngineParts(
        config, device, dtype, backend, source, mc, model, loaded.quantization, tokenizer, tuple(sorted(eos)),
        max_model_len, kv_spec, memory, pool, scheduler, input_batch, runner, core,
    )  # fmt: skip


def kv_fit_options(spec: KVCacheSpec, backend: str, num_heads: int, dtype: torch.dtype) -> dict[str, KVCacheSpec]:
    """The KV precisions max_model_len="auto" weighs: the one asked for (or the run dtype) first,
    then the others the attention backend reads (costs.BACKEND_KV_DTYPES) at this model's shape."""
    options = {costs.kv_dtype_name(spec.dtype): spec}
    for name in costs.BACKEND_KV_DTYPES[backend]:
        if backend == "triton":
            from membound.kernels.decode_attention import check_shapes

            try:
                check_shapes(num_heads, spec.num_kv_heads, spec.block_size, dtype, name == "int8", spec.head_dim)
            except ValueError:
                continue
        options.setdefault(name, dataclasses.replace(spec, dtype=KV_CACHE_DTYPES[name]))
    return options


def decode_graphs(model, kv_caches, config: EngineConfig, max_model_len: int, device: torch.device) -> DecodeGraphs:
    """Static decode buffers over a cache (the engine's or a scratch one); its last block is the pad."""
    pad = kv_caches[0][0].shape[1] - 1  # [kv_heads, blocks, block_size, head_dim]
    max_batch = min(config.max_num_seqs, MAX_GRAPH_BATCH)
    return DecodeGraphs(model, kv_caches, config.block_size, max_model_len, max_batch, pad, device)


def profile_graph_memory(model, kv_spec: KVCacheSpec, config: EngineConfig, max_model_len: int, device) -> int:
    """Bytes the captured graphs will hold: the largest batch's graph, captured once on a
    scratch cache (the smaller ones share its memory pool), plus every other size's output."""
    caches = allocate_kv_cache(kv_spec, 2, device)
    graphs = decode_graphs(model, caches, config, max_model_len, device)
    nbytes = graphs.capture([graphs.max_batch])
    row = model.config.hidden_size * next(model.parameters()).element_size()
    nbytes += sum(graphs.ladder[:-1]) * row
    del graphs, caches
    torch.cuda.empty_cache()
    return nbytes


@torch.inference_mode()
def run_profile_steps(model, config: EngineConfig, n: int, max_model_len: int, caches, meta, device) -> None:
    """The worst steps' shapes (`profile_activation_peak`), on any device. With speculation every
    drafting sequence has k + 1 sampling rows and they are verified too."""
    spec = config.speculative_config
    per_seq = 1 + (spec.num_speculative_tokens if spec is not None else 0)
    rows = min(config.max_num_seqs * per_seq, n)
    vocab = model.config.vocab_size
    for q_lens in ([n], [per_seq] * max(1, min(config.max_num_seqs, n // per_seq))):
        t = sum(q_lens)
        ids = torch.zeros(t, dtype=torch.int64, device=device)
        positions = torch.full((t,), max_model_len - 1, dtype=torch.int64, device=device)
        hidden = model(ids, positions, caches, meta(q_lens))
        r = min(rows, t)
        logits = model.compute_logits(hidden[:r])
        params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50)] * r
        batch = SamplingBatch.build(params, [None] * r, [[0]] * r, [1] * r, vocab, device)
        sample(logits, batch, None)
        if per_seq > 1 and r >= per_seq:
            batch.spec = tuple((i, per_seq - 1) for i in range(0, r - per_seq + 1, per_seq))
            verify_on_device(logits, ids[:r], batch, None)
        del hidden, logits


def profile_activation_peak(model, kv_spec: KVCacheSpec, config: EngineConfig, max_model_len: int, device) -> int:
    """Peak memory of the worst steps, measured (CUDA only; on CPU the KV budget is fixed).

    Two shapes: the last prefill chunk of a max_model_len prompt (largest attention mask),
    and a decode of max_num_seqs sequences all at max_model_len (largest K/V gather), each
    followed by sampling with truncation. Block tables wrap around a small scratch cache:
    the gathers cost the same memory as over a real one.
    """
    if device.type != "cuda":
        return 0
    bs = config.block_size
    n = min(config.max_num_batched_tokens, max_model_len)
    scratch = blocks_needed(n, bs) + 1
    caches = allocate_kv_cache(kv_spec, scratch, device)
    table_row = [i % scratch for i in range(blocks_needed(max_model_len, bs))]

    def meta(q_lens: list[int]) -> AttentionMetadata:
        return synthetic_metadata(model.attention_backend, q_lens, max_model_len, table_row, bs, device)

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run_profile_steps(model, config, n, max_model_len, caches, meta, device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del caches
    torch.cuda.empty_cache()
    return peak
