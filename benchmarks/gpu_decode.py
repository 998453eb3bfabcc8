"""Decode benchmarks for the GPU check (scripts/gpu_check.sh); `--smoke` runs tiny sizes on CPU.

    python benchmarks/gpu_decode.py [--output FILE]

Dummy weights with real shapes, bf16. Roofline share = (weight bytes read per step + KV
bytes read per step) / step time, against the copy bandwidth measured on the same device
(and against the datasheet where the GPU is in membound's table).
1. batch-1 decode tok/s, Llama-3-8B and SmolLM2-135M shapes, with CUDA graphs and async
   scheduling (the defaults); SmolLM2 also eager, and graphs without async scheduling;
2. the decode attention kernel alone, batch 32 x 8k context, Llama-3-8B layer shape;
3. time per decode step with 1, 64 and 256 running sequences with async scheduling off and
   on, and the host's share of it (scheduler, input building, output processing): how much
   of the host time the overlap hides.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if "--smoke" in sys.argv:  # CPU: Triton kernels run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from membound.config import EngineConfig  # noqa: E402
from membound.engine.llm_engine import LLMEngine  # noqa: E402
from membound.plan.ceilings import measure  # noqa: E402
from membound.plan.gpus import match_device_name  # noqa: E402
from membound.plan.planner import shape_weight_bytes  # noqa: E402
from membound.sampling_params import SamplingParams  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def engine_for(preset: str, dev: str, max_len: int, kv_bytes: int | None, **kw) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=preset,
            load_format="dummy",
            device=dev,
            dtype="bfloat16" if dev == "cuda" else "float32",
            max_model_len=max_len,
            skip_tokenizer_init=True,
            kv_cache_memory_bytes=kv_bytes,
            max_num_seqs=256,
            max_num_batched_tokens=4096,
            **kw,
        )
    )


def decode_batch1(preset: str, dev: str, prompt_len: int, steps: int, bw_gbs: float, kv_bytes, **kw) -> dict:
    eng = engine_for(preset, dev, prompt_len + steps + 8, kv_bytes, **kw)
    device = eng.device
    cfg = eng.model_config
    eng.add_request("warm", [1] * prompt_len, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    eng.add_request("r", [2] * prompt_len, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
    eng.step()  # prefill + first token
    sync(device)
    t0 = time.perf_counter()
    n = 0
    while eng.has_unfinished_requests():
        eng.step()
        n += 1
    sync(device)
    dt = (time.perf_counter() - t0) / n
    weights = shape_weight_bytes(cfg, "bf16" if dev == "cuda" else "fp32").per_step
    kv = (prompt_len + steps / 2) * eng.kv_spec.bytes_per_token  # the average context over the run
    nbytes = weights + kv
    out = {
        "model": preset,
        "cuda_graphs": eng.runner.graphs is not None and bool(eng.runner.graphs.graphs),
        "async_scheduling": eng.async_scheduling,
        "tok_s": 1 / dt,
        "step_ms": dt * 1000,
        "bytes_per_step": nbytes,
        "achieved_gbs": nbytes / dt / 1e9,
        "roofline_share_measured": nbytes / dt / 1e9 / bw_gbs,
    }
    del eng
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def attention_kernel(dev: str, batch: int, context: int, bw_gbs: float) -> dict:
    from membound.kernels.decode_attention import paged_decode_attention

    heads, kvh, d, bs = 32, 8, 128, 16
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    pages = context // bs
    k = torch.randn(kvh, batch * pages, bs, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    table = torch.randperm(batch * pages, device=dev, dtype=torch.int64).to(torch.int32).view(batch, pages)
    lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    q = torch.randn(batch, heads, d, device=dev, dtype=dtype)
    fn = lambda: paged_decode_attention(q, k, v, table, lens, d**-0.5)  # noqa: E731
    fn()
    device = torch.device(dev)
    sync(device)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    nbytes = 2 * batch * context * kvh * d * k.element_size()
    return {"batch": batch, "context": context, "ms": dt * 1000, "gbs": nbytes / dt / 1e9,
            "share_measured": nbytes / dt / 1e9 / bw_gbs}  # fmt: skip


def host_time(preset: str, dev: str, running: list[int], kv_bytes) -> list[dict]:
    """Step time with async scheduling off and on, and the host time inside a synchronous step."""
    rows = []
    for n in running:
        row = {"running": n}
        for mode in (False, True):
            eng = engine_for(preset, dev, 256, kv_bytes, async_scheduling=mode)
            spent = {"host": 0.0}
            # Host phases of a step: scheduling, building inputs + launching, output processing.
            for obj, name in ((eng.scheduler, "schedule"), (eng, "_finish"), (eng.runner, "prepare")):
                inner = getattr(obj, name)

                def timed(*a, _inner=inner, spent=spent):
                    t = time.perf_counter()
                    try:
                        return _inner(*a)
                    finally:
                        spent["host"] += time.perf_counter() - t

                setattr(obj, name, timed)
            for i in range(n):
                eng.add_request(f"{n}-{i}", [3] * 32, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
            for _ in range(6):
                eng.step()  # prefill everyone, then a few decodes (async: the pipeline fills)
            sync(eng.device)
            spent["host"] = 0.0
            t0, steps = time.perf_counter(), 24
            for _ in range(steps):
                eng.step()
            sync(eng.device)
            dt = (time.perf_counter() - t0) / steps
            key = "async" if mode else "sync"
            row[f"{key}_step_ms"] = dt * 1000
            if not mode:  # in a synchronous step _finish includes the wait for the device
                row["sync_host_ms_upper"] = spent["host"] / steps * 1000
            del eng
        row["hidden_ms"] = row["sync_step_ms"] - row["async_step_ms"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script itself")
    a = ap.parse_args()
    dev = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    if dev == "cpu" and not a.smoke:
        sys.exit("no CUDA GPU: run with --smoke for a CPU check of the script")
    kv_bytes = 64 << 20 if dev == "cpu" else None
    ceil = measure(dev, quick=a.smoke)
    spec = match_device_name(ceil.device) if dev == "cuda" else None
    result = {
        "benchmark": "gpu_decode",
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "device": ceil.device,
        "host": platform.node(),
        "torch": torch.__version__,
        "ceilings": ceil.__dict__,
        "spec_bandwidth_gbs": spec.bandwidth_gbs if spec else None,
    }
    presets = ["smollm2-135m"] if a.smoke else ["llama-3-8b", "smollm2-135m"]
    steps = 8 if a.smoke else 128
    bw = ceil.copy_bandwidth_gbs
    result["decode_batch1"] = [decode_batch1(p, dev, 128, steps, bw, kv_bytes) for p in presets]
    # Launch gaps and host stalls matter most for the small model: graphs off, and async off.
    result["decode_batch1"] += [
        decode_batch1("smollm2-135m", dev, 128, steps, bw, kv_bytes, enforce_eager=True, async_scheduling=False),
        decode_batch1("smollm2-135m", dev, 128, steps, bw, kv_bytes, async_scheduling=False),
    ]
    for r in result["decode_batch1"]:
        if spec:
            r["roofline_share_spec"] = r["achieved_gbs"] / spec.bandwidth_gbs
    result["attention_kernel"] = attention_kernel(dev, 4 if a.smoke else 32, 256 if a.smoke else 8192,
                                                  ceil.copy_bandwidth_gbs)  # fmt: skip
    result["host_time"] = host_time("smollm2-135m", dev, [1, 8] if a.smoke else [1, 64, 256], kv_bytes)

    print(f"device {ceil.device}: copy {ceil.copy_bandwidth_gbs:,.0f} GB/s, matmul {ceil.matmul_tflops:,.1f} TFLOPS")
    for r in result["decode_batch1"]:
        mode = ("graphs" if r["cuda_graphs"] else "eager") + ("+async" if r["async_scheduling"] else "")
        print(f"decode batch 1 {r['model']:>14} {mode:>12}: {r['tok_s']:8,.1f} tok/s, {r['achieved_gbs']:7,.1f} GB/s, "
              f"{r['roofline_share_measured']:.0%} of measured bandwidth")  # fmt: skip
    k = result["attention_kernel"]
    print(f"decode attention b{k['batch']} x {k['context']}: {k['ms']:.3f} ms, {k['gbs']:,.0f} GB/s "
          f"({k['share_measured']:.0%} of measured)")  # fmt: skip
    for r in result["host_time"]:
        print(f"{r['running']:>4} running: step {r['sync_step_ms']:.2f} ms sync, {r['async_step_ms']:.2f} ms async "
              f"(hidden {r['hidden_ms']:.2f} ms; host phases of a sync step "
              f"<= {r['sync_host_ms_upper']:.2f} ms)")  # fmt: skip
    path = pathlib.Path(a.output or ROOT / "benchmarks" / "results" / f"gpu_decode_{result['date']}.json")
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
