"""`membound serve` under load vs the bare engine, on the embedded SmolLM2-135M (CPU).

    python benchmarks/cpu_serve.py [--concurrency 1 8 32] [--requests-per-client 2] [--repeats 2]

For each concurrency c, the same workload (c x requests-per-client requests; random
token-id prompts of 32-256 tokens, 64 greedy output tokens each, ignore_eos) runs twice:
- served: through a `membound serve` process on 127.0.0.1, c streaming HTTP clients
  (membound.bench.load), so the engine thread, HTTP, SSE and detokenization are all in;
- bare: through an `LLMEngine` in this process, kept at exactly c requests in flight
  (add one as one finishes), the same closed loop the clients make, no HTTP at all.
served / bare output tok/s is what the HTTP front and the engine's own thread cost.
Both alternate within each repeat; medians are reported and every run goes to the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import time

import httpx
import torch

from membound.bench.load import run_load
from membound.config import EngineConfig
from membound.engine.llm_engine import LLMEngine
from membound.sampling_params import SamplingParams

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENGINE_ARGS = {"max_model_len": 1024, "kv_cache_memory_bytes": 256 << 20}


def workload(n: int, vocab: int, max_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    # Token ids from the ordinary-word range of the vocab, so no prompt shares a block with another.
    return [
        {"prompt": [rng.randrange(1000, vocab) for _ in range(rng.randint(32, 256))], "max_tokens": max_tokens}
        for _ in range(n)
    ]


def bare(engine: LLMEngine, bodies: list[dict], concurrency: int) -> dict:
    params = {
        b["max_tokens"]: SamplingParams(temperature=0, max_tokens=b["max_tokens"], ignore_eos=True) for b in bodies
    }
    todo = list(enumerate(bodies))
    ttft, tokens, in_flight = [], 0, {}
    t0 = time.perf_counter()
    while todo or in_flight:
        while todo and len(in_flight) < concurrency:
            i, b = todo.pop(0)
            engine.add_request(f"b{i}", b["prompt"], params[b["max_tokens"]])
            in_flight[f"b{i}"] = time.perf_counter()
        for out in engine.step():
            if len(out.outputs[0].token_ids) == 1:
                ttft.append(time.perf_counter() - in_flight[out.request_id])
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
                del in_flight[out.request_id]
    duration = time.perf_counter() - t0
    ttft.sort()
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "duration_s": duration,
        "output_tok_s": tokens / duration,
        "ttft_p50_s": ttft[len(ttft) // 2],
        "ttft_p99_s": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
    }


def start_server(port: int, log: pathlib.Path):
    cmd = [sys.executable, "-m", "membound.entrypoints.cli", "serve", "--port", str(port)]
    cmd += ["--max-model-len", "1024", "--kv-cache-memory", "256", "--log-interval", "10"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--port", type=int, default=8391)
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    engine = LLMEngine(EngineConfig(**ENGINE_ARGS, enable_prefix_caching=False))
    vocab = engine.model_config.vocab_size
    log = pathlib.Path("/tmp/membound-cpu-serve.log")
    proc, url = start_server(a.port, log)
    runs = []
    try:
        # One warm-up request each, so first-call costs (allocations, thread pools) stay out.
        bare(engine, workload(1, vocab, 4, 99), 1)
        asyncio.run(run_load(url, workload(1, vocab, 4, 99), 1))
        for rep in range(a.repeats):
            for c in a.concurrency:
                bodies = workload(c * a.requests_per_client, vocab, a.max_tokens, seed=1000 * rep + c)
                order = ["served", "bare"] if (rep + c) % 2 == 0 else ["bare", "served"]
                for mode in order:
                    if mode == "bare":
                        r = bare(engine, bodies, c)
                    else:
                        bodies_ = [{**b, "ignore_eos": True, "temperature": 0} for b in bodies]
                        result = asyncio.run(run_load(url, bodies_, c))
                        assert not [x for x in result.records if not x.ok], [x.error for x in result.records][:3]
                        r = result.summary()
                    runs.append({"mode": mode, "repeat": rep, **r})
                    print(f"rep {rep} c={c:>2} {mode:>6}: {r['output_tok_s']:6.1f} tok/s, "
                          f"TTFT p50 {r['ttft_p50_s']:.3f}s p99 {r['ttft_p99_s']:.3f}s", flush=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(60)

    table = []
    for c in a.concurrency:
        row = {"concurrency": c}
        for mode in ("served", "bare"):
            rs = [r for r in runs if r["mode"] == mode and r["concurrency"] == c]
            for k in ("output_tok_s", "ttft_p50_s", "ttft_p99_s"):
                row[f"{mode}_{k}"] = statistics.median(r[k] for r in rs)
        row["served_over_bare"] = row["served_output_tok_s"] / row["bare_output_tok_s"]
        table.append(row)
    print("\n| clients | served tok/s | bare engine tok/s | served/bare | TTFT p50 | TTFT p99 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['concurrency']} | {r['served_output_tok_s']:.1f} | {r['bare_output_tok_s']:.1f} | "
              f"{r['served_over_bare']:.2f}x | {r['served_ttft_p50_s'] * 1000:.0f} ms | "
              f"{r['served_ttft_p99_s'] * 1000:.0f} ms |")  # fmt: skip

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    out = {
        "benchmark": "cpu_serve",
        "date": datetime.date.today().isoformat(),
        "commit": commit.stdout.strip(),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (fp32)",
        "args": vars(a),
        "table": table,
        "runs": runs,
    }
    path = pathlib.Path(a.output or ROOT / "benchmarks" / "results" / f"cpu_serve_{out['date']}.json")
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
