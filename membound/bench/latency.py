"""`membound bench latency`: prefill latency by prompt length, and decode tok/s over a grid of
batch sizes x context lengths, each point with the bytes it moves and its share of the roofline."""

from __future__ import annotations

import dataclasses
import random
import time

import torch
from tqdm.auto import tqdm

from membound import costs
from membound.bench.common import engine_decode_cost, peak_memory
from membound.engine.kv_cache import blocks_needed
from membound.engine.llm_engine import LLMEngine
from membound.plan.ceilings import Ceilings
from membound.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class LatencyConfig:
    prompt_lens: tuple[int, ...]
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    decode_steps: int = 16
    seed: int = 0

    @classmethod
    def default(cls, device: torch.device) -> LatencyConfig:
        if device.type == "cuda":
            return cls((128, 512, 2048, 8192), (1, 4, 16, 64, 128), (512, 4096, 16384, 32768))
        return cls((32, 128, 512), (1, 4, 16), (128, 512))


def _sync(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def _prompts(rng: random.Random, vocab: int, n: int, length: int) -> list[list[int]]:
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]


def _drain(engine: LLMEngine) -> None:
    for rid in engine.request_ids():
        engine.abort_request(rid)
    engine.reset_prefix_cache()


def prefill_point(engine: LLMEngine, rng: random.Random, length: int) -> dict:
    prompt = _prompts(rng, engine.model_config.vocab_size, 1, length)[0]
    _sync(engine)
    t = time.perf_counter()
    engine.add_request("prefill", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    _sync(engine)
    dt = time.perf_counter() - t
    _drain(engine)
    return {"prompt_len": length, "ms": dt * 1000, "tok_s": length / dt}


def decode_point(engine: LLMEngine, rng: random.Random, batch: int, context: int, steps: int, ceil: Ceilings) -> dict:
    point = {"batch": batch, "context": context}
    need = batch * blocks_needed(context + steps + 1, engine.config.block_size)
    if context + steps + 1 > engine.max_model_len:
        return {**point, "skipped": f"context + {steps + 1} tokens exceeds max_model_len {engine.max_model_len}"}
    if need > engine.allocator.num_blocks or batch > engine.config.max_num_seqs:
        return {**point, "skipped": f"needs {need} KV blocks, the pool has {engine.allocator.num_blocks}"}
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    for i, p in enumerate(_prompts(rng, engine.model_config.vocab_size, batch, context)):
        engine.add_request(f"d{i}", p, params)
    while any(engine.num_output_tokens(r) == 0 for r in engine.request_ids()):
        engine.step()  # prefill everyone; each then holds its first token
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    _sync(engine)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(engine)
    dt = (time.perf_counter() - t) / steps
    peak, total = peak_memory(engine.device)
    _drain(engine)
    cost = engine_decode_cost(engine).step(batch, context + steps / 2)  # the mean context over the run
    nbytes, kv, flops = cost.bytes, cost.kv_bytes, cost.flops
    bw, peak_flops = ceil.copy_bandwidth_gbs * costs.GB, ceil.matmul_tflops * 1e12
    return {
        **point,
        "step_ms": dt * 1000,
        "tok_s": batch / dt,
        "per_request_tok_s": 1 / dt,
        "weight_bytes_per_step": nbytes - kv,
        "kv_bytes_per_step": kv,
        "bytes_per_step": nbytes,
        "flops_per_step": flops,
        "achieved_gbs": nbytes / dt / costs.GB,
        "roofline_share": nbytes / dt / bw,
        "bound_tok_s": costs.roofline_tok_s(cost, batch, bw, peak_flops),
        "peak_memory_bytes": peak,
        "total_memory_bytes": total,
        "headroom_bytes": total - peak,
    }


def run(engine: LLMEngine, cfg: LatencyConfig, ceil: Ceilings, progress: bool = True) -> dict:
    rng = random.Random(cfg.seed)
    # One short request first: allocator warm-up and lazy initialization stay out of the numbers.
    prefill_point(engine, rng, min(16, engine.max_model_len - 2))
    total = len(cfg.prompt_lens) + len(cfg.batches) * len(cfg.contexts)
    prefill, decode = [], []
    with tqdm(total=total, desc="bench latency", disable=not progress) as bar:
        for n in cfg.prompt_lens:
            if n < engine.max_model_len:
                prefill.append(prefill_point(engine, rng, n))
            else:
                prefill.append({"prompt_len": n, "skipped": f"not shorter than max_model_len {engine.max_model_len}"})
            bar.update(1)
        for c in cfg.contexts:
            for b in cfg.batches:
                decode.append(decode_point(engine, rng, b, c, cfg.decode_steps, ceil))
                bar.update(1)
    return {"prefill": prefill, "decode": decode}
