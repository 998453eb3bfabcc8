"""`membound bench walls`: where one decode step goes (the second seed's four walls).

The step is timed with its parts instrumented: scheduling (schedule + commit), input
preparation, the model forward, sampling with the result's trip to the host. On CUDA the
forward is followed by a synchronize so its device time lands in it, not in the sampler's
transfer. Beside the measured parts, the bounds the hardware sets: memory time = bytes per
step / measured bandwidth, compute time = FLOPs per step / measured matmul rate. Launch
overhead is eager minus CUDA-graph step time, reported once decode runs through graphs.
"""

from __future__ import annotations

import contextlib
import random
import time

import torch

import membound.engine.model_runner as model_runner
from membound.bench.common import decode_step_cost
from membound.engine.llm_engine import LLMEngine
from membound.plan.ceilings import Ceilings
from membound.sampling_params import SamplingParams


@contextlib.contextmanager
def _instrument(engine: LLMEngine, spent: dict[str, float]):
    sync = engine.device.type == "cuda"
    patches = []

    def wrap(obj, name: str, key: str, after_sync: bool = False):
        inner = getattr(obj, name)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                out = inner(*a, **kw)
                if after_sync and sync:
                    torch.cuda.synchronize(engine.device)
                return out
            finally:
                spent[key] += time.perf_counter() - t

        setattr(obj, name, timed)
        patches.append((obj, name, inner))

    wrap(engine.scheduler, "schedule", "scheduling")
    wrap(engine.scheduler, "commit", "scheduling")
    wrap(engine.runner, "prepare", "input_prep")
    wrap(engine.runner, "forward_logits", "forward", after_sync=True)
    wrap(engine.runner, "_graph_decode", "forward", after_sync=True)
    wrap(model_runner, "sample_on_device", "sampling_transfer")
    wrap(engine.runner, "fetch", "sampling_transfer")
    # Phases are timed one after another: with async scheduling they would overlap.
    was_async, engine.async_scheduling = engine.async_scheduling, False
    try:
        yield
    finally:
        engine.async_scheduling = was_async
        for obj, name, inner in reversed(patches):
            setattr(obj, name, inner)


def run(engine: LLMEngine, ceil: Ceilings, batch: int = 1, context: int = 128, steps: int = 16) -> dict:
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"w{i}", [rng.randrange(1, vocab) for _ in range(context)], params)
    while any(r.num_output_tokens < 2 for r in engine.requests.values()):
        engine.step()  # prefill, and one decode step to warm up
    spent = dict.fromkeys(("scheduling", "input_prep", "forward", "sampling_transfer"), 0.0)
    with _instrument(engine, spent):
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        step = (time.perf_counter() - t) / steps
    for rid in list(engine.requests):
        engine.abort_request(rid)
    engine.reset_prefix_cache()
    weights, kv, flops = decode_step_cost(engine, batch, context + 1 + steps / 2)
    nbytes = weights + kv
    per = {k: v / steps for k, v in spent.items()}
    other = step - sum(per.values())
    rows = [
        ("host: scheduling", per["scheduling"], "schedule + commit (block tables, prefix cache)"),
        ("host: input preparation", per["input_prep"], "index tensors built and copied to the device"),
        ("host: sampling + result transfer", per["sampling_transfer"], "sampler and the ids' trip to the host"),
        ("host: output handling", other, "detokenization, stop checks, outputs"),
        ("device: model forward", per["forward"], "measured (on CUDA: until the GPU finished)"),
        (
            "bound: memory time",
            nbytes / (ceil.copy_bandwidth_gbs * 1e9),
            f"{nbytes / 1e6:,.1f} MB / measured bandwidth",
        ),
        (
            "bound: compute time",
            flops / (ceil.matmul_tflops * 1e12),
            f"{flops / 1e9:,.2f} GFLOP / measured matmul rate",
        ),
        (
            "launch overhead",
            None,
            "decode replays CUDA graphs (eager vs graphs: benchmarks/gpu_session.py decode_smollm2)"
            if engine.runner.graphs is not None
            else "decode runs eagerly here (CUDA graphs on GPUs unless --enforce-eager)",
        ),
    ]
    return {
        "batch": batch,
        "context": context,
        "step_ms": step * 1000,
        "tok_s": batch / step,
        "bytes_per_step": nbytes,
        "flops_per_step": flops,
        "walls": [
            {
                "wall": w,
                "ms": None if v is None else v * 1000,
                "share_of_step": None if v is None else v / step,
                "what": d,
            }
            for w, v, d in rows
        ],
    }
