"""Does a long prompt poison the others' decode latency? (issue 14; seed 000)

The default model (SmolLM2-135M, packed Q4_1) on CPU: 8 sequences decode; then a 4,096-token
prompt arrives. Inter-token latency of the 8 = the engine's step time while all 8 decode. For
each `long_prefill_token_threshold` (0 = off: the prompt takes the whole step budget) the p50 /
p99 step time over a window of 60 steps from the prompt's arrival, against the same window with
no prompt; and how many steps the prompt's prefill took (its time to first token).

    python benchmarks/cpu_prefill_interference.py [--thresholds 0,256,64,32,16] [--output FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import random
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from membound import LLM, RequestOutputKind, SamplingParams  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def window(threshold: int, prompt_len: int | None, steps: int = 60) -> dict:
    llm = LLM(max_model_len=8192, kv_cache_memory_bytes=512 << 20, long_prefill_token_threshold=threshold)
    eng, rng = llm.engine, random.Random(0)
    vocab = eng.model_config.vocab_size
    p = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    for i in range(8):
        eng.add_request(f"d{i}", [rng.randrange(100, vocab) for _ in range(32)], p)
    for _ in range(12):
        eng.step()  # prefill and settle
    long_p = SamplingParams(temperature=0, max_tokens=1, output_kind=RequestOutputKind.DELTA)
    if prompt_len:
        eng.add_request("long", [rng.randrange(100, vocab) for _ in range(prompt_len)], long_p)
    times, ttft_steps, t0 = [], None, time.perf_counter()
    for k in range(steps):
        t = time.perf_counter()
        outs = eng.step()
        times.append(time.perf_counter() - t)
        if ttft_steps is None and any(o.request_id == "long" for o in outs):
            ttft_steps, ttft = k + 1, time.perf_counter() - t0
    return {
        "threshold": threshold,
        "prompt": prompt_len or 0,
        "p50_ms": statistics.median(times) * 1000,
        "p99_ms": pct(times, 0.99) * 1000,
        "max_ms": max(times) * 1000,
        "prefill_steps": ttft_steps,
        "ttft_s": ttft if ttft_steps else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thresholds", default="0,512,256,64,32,16")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    rows = [window(0, None, a.steps)]
    print(f"no prompt: p50 {rows[0]['p50_ms']:.1f} ms, p99 {rows[0]['p99_ms']:.1f} ms")
    for th in (int(x) for x in a.thresholds.split(",")):
        r = window(th, 4096, a.steps)
        r["p99_vs_no_prompt"] = r["p99_ms"] / rows[0]["p99_ms"]
        rows.append(r)
        print(
            f"threshold {th:>4}: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms "
            f"({r['p99_vs_no_prompt']:.2f}x), prompt prefilled in {r['prefill_steps']} steps / "
            f"{r['ttft_s'] or float('nan'):.1f} s"
        )
    result = {
        "benchmark": "cpu_prefill_interference",
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),  # fmt: skip
        "model": "SmolLM2-135M-Instruct Q4_1 (packed), 8 decodes, a 4,096-token prompt",
        "rows": rows,
    }
    path = pathlib.Path(a.output or ROOT / "benchmarks" / "results" / f"cpu_prefill_interference_{result['date']}.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
