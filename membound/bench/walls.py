"""`membound bench walls`: where one decode step goes (the second seed's four walls).

The step's parts come from the engine's own step timing (async scheduling off, so they do not
overlap): scheduling, input preparation, the model forward with sampling and the result's trip
to the host, output handling. Beside the measured parts, the bounds the hardware sets: memory time = bytes per
step / measured bandwidth, compute time = FLOPs per step / measured matmul rate. Launch
overhead is eager minus CUDA-graph step time, reported once decode runs through graphs.
"""

from __future__ import annotations

import contextlib
import random
import time

from membound import costs
from membound.bench.common import engine_decode_cost
from membound.engine.llm_engine import LLMEngine
from membound.plan.ceilings import Ceilings
from membound.sampling_params import SamplingParams


@contextlib.contextmanager
def _synchronous(engine: LLMEngine):
    """Phases are read one after another from each step's timing: with async scheduling they
    would overlap."""
    was_async = engine.async_scheduling
    engine.async_scheduling = False
    try:
        yield
    finally:
        engine.async_scheduling = was_async


def run(engine: LLMEngine, ceil: Ceilings, batch: int = 1, context: int = 128, steps: int = 16) -> dict:
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=steps + 3, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"w{i}", [rng.randrange(1, vocab) for _ in range(context)], params)
    while any((engine.num_output_tokens(r) or 0) < 2 for r in engine.request_ids()):
        engine.step()  # prefill, and one decode step to warm up
    ops = _cpu_op_split(engine) if engine.device.type == "cpu" else None
    spent = dict.fromkeys(("scheduling", "input_prep", "forward", "output"), 0.0)
    with _synchronous(engine):
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
            st = engine.last_step_timing
            spent["scheduling"] += st.schedule
            spent["input_prep"] += st.prepare
            spent["forward"] += st.launch + st.wait  # launch, then until the device finished
            spent["output"] += st.output
        step = (time.perf_counter() - t) / steps
    for rid in engine.request_ids():
        engine.abort_request(rid)
    engine.reset_prefix_cache()
    cost = engine_decode_cost(engine).step(batch, context + 1 + steps / 2)
    nbytes, flops = cost.bytes, cost.flops
    per = {k: v / steps for k, v in spent.items()}
    other = step - sum(per.values())
    rows = [
        ("host: scheduling", per["scheduling"], "token budget, blocks, preemption"),
        ("host: input preparation", per["input_prep"], "persistent batch updates and the packed index upload"),
        ("device: model forward + sampling", per["forward"], "launch until the result reached the host"),
        ("host: output handling", per["output"], "append, detokenization, stop checks, outputs, prefix cache"),
        ("host: other", other, "the engine loop around the parts"),
        (
            "bound: memory time",
            cost.memory_seconds(ceil.copy_bandwidth_gbs * costs.GB),
            f"{nbytes / 1e6:,.1f} MB / measured bandwidth",
        ),
        (
            "bound: compute time",
            cost.compute_seconds(ceil.matmul_tflops * 1e12),
            f"{flops / 1e9:,.2f} GFLOP / measured matmul rate",
        ),
        (
            "launch overhead",
            None,
            "decode replays CUDA graphs (eager vs graphs: benchmarks/gpu_session.py decode_smollm2)"
            if engine.uses_cuda_graphs
            else "decode runs eagerly here (CUDA graphs on GPUs unless --enforce-eager)",
        ),
    ]
    if ops is not None:
        rows.insert(
            3,
            (
                "  of which matmul kernels",
                ops["matmul_s"] * step / ops["step_s"],
                f"packed int4/int8 and dense matmuls; the other {ops['ops'] - ops['matmul_ops']:,} of "
                f"{ops['ops']:,} PyTorch ops per step (profiled, shares scaled to the step) make the rest",
            ),
        )
    return {
        "batch": batch,
        "ops_per_step": None if ops is None else ops["ops"],
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


# The CPU ops that do a layer's multiply-accumulates; everything else in a CPU step is op overhead and
# small elementwise work (issue 15: 7,451 ops a step once, ~250 per layer).
_MATMUL_OPS = ("aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm", "aten::mm", "aten::addmm", "aten::bmm")


def _cpu_op_split(engine: LLMEngine) -> dict:
    """One more decode step under torch.profiler: PyTorch ops it ran (nested ones included, as the
    profiler counts them) and the self time of the matmul kernels among them."""
    from torch.profiler import ProfilerActivity, profile

    with _synchronous(engine), profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        engine.step()
        step = time.perf_counter() - t
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    matmuls = [e for e in events if e.name in _MATMUL_OPS]
    return {
        "ops": len(events),
        "matmul_ops": len(matmuls),
        "matmul_s": sum(e.self_cpu_time_total for e in matmuls) / 1e6,
        "step_s": step,
    }
