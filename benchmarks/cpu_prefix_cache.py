"""Prefix caching on vs off, in one run, on the embedded SmolLM2-135M (CPU).

    python benchmarks/cpu_prefix_cache.py [--requests 32] [--system-tokens 1000] [--question-tokens 50]
    python benchmarks/cpu_prefix_cache.py --workloads distinct --requests 16 --repeats 4

Workload "shared": every request is the same system prompt plus a distinct question, all
submitted at once. Reports mean / median time to first token and the total time.
Workload "distinct": no two prompts share even one block, so caching can only cost
(hashing, lookups); reports generated-token throughput, and the host time spent in the
scheduler (where all prefix-cache work happens) to show caching's own cost directly.
One engine serves both settings, its scheduler's caching switch flipped between runs, so
weights and KV pool sit at the same addresses for both (two engines differed by several
percent in either direction from placement alone). On and off alternate within each
repeat, in an order flipped every repeat; medians are reported and every run is kept in
the JSON written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import random
import statistics
import subprocess
import time

import torch

from membound import LLM, SamplingParams

WORDS = (
    "light energy matter wave particle field atom molecule cell gene river mountain ocean forest "
    "engine bridge printing telescope compass clock steam electric signal network city market harbor"
).split()


def token_prompt(llm: LLM, rng: random.Random, n_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += llm.tokenizer.encode(" " + " ".join(rng.choice(WORDS) for _ in range(50)))
    return ids[:n_tokens]


def time_scheduler(llm: LLM) -> dict[str, float]:
    """Wrap the scheduler's entry points with a clock: all prefix-cache work happens inside them."""
    spent = {"s": 0.0}
    sched = llm.engine.scheduler
    for name in ("schedule", "commit"):
        inner = getattr(sched, name)

        def timed(*args, _inner=inner):
            t = time.perf_counter()
            try:
                return _inner(*args)
            finally:
                spent["s"] += time.perf_counter() - t

        setattr(sched, name, timed)
    return spent


def set_caching(llm: LLM, on: bool) -> None:
    sched = llm.engine.scheduler
    sched.config = dataclasses.replace(sched.config, enable_prefix_caching=on)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, spent: dict[str, float]) -> dict:
    llm.reset_prefix_cache()  # every run starts cold
    spent["s"] = 0.0
    before = llm.engine.stats()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    total = time.perf_counter() - t0
    ttfts = [o.metrics.time_to_first_token for o in outs]
    after = llm.engine.stats()
    return {
        "total_s": total,
        "ttft_mean_s": statistics.mean(ttfts),
        "ttft_median_s": statistics.median(ttfts),
        "output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / total,
        "scheduler_host_s": spent["s"],
        "hit_tokens": after.prefix_cache_hits - before.prefix_cache_hits,
        "query_tokens": after.prefix_cache_queries - before.prefix_cache_queries,
    }


def report(summary: dict, a: argparse.Namespace) -> float | None:
    if "shared" in summary:
        s = summary["shared"]
        print(f"shared {a.system_tokens}-token system prompt, {a.requests} x {a.question_tokens}-token questions:")
        for name in ("on", "off"):
            r = s[name]
            print(
                f"  caching {name:3s}: TTFT mean {r['ttft_mean_s']:.2f}s median {r['ttft_median_s']:.2f}s, "
                f"total {r['total_s']:.2f}s, cache hits {r['hit_tokens']:.0f}/{r['query_tokens']:.0f} tokens"
            )
        print(
            f"  speed-up: TTFT mean {s['off']['ttft_mean_s'] / s['on']['ttft_mean_s']:.1f}x, "
            f"total {s['off']['total_s'] / s['on']['total_s']:.1f}x"
        )
    if "distinct" not in summary:
        return None
    d = summary["distinct"]
    ratio = d["on"]["output_tok_s"] / d["off"]["output_tok_s"]
    extra = d["on"]["scheduler_host_s"] - d["off"]["scheduler_host_s"]
    print(
        f"distinct prompts: output {d['on']['output_tok_s']:.2f} tok/s on vs {d['off']['output_tok_s']:.2f} off "
        f"({(ratio - 1) * 100:+.1f}%); scheduler host time {d['on']['scheduler_host_s'] * 1000:.1f} ms on vs "
        f"{d['off']['scheduler_host_s'] * 1000:.1f} ms off, so caching's own cost is "
        f"{extra / d['on']['total_s'] * 100:.3f}% of the run"
    )
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--question-tokens", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", default=["shared", "distinct"], choices=["shared", "distinct"])
    a = ap.parse_args()

    llm = LLM(max_model_len=2048, kv_cache_memory_bytes=2 << 30)
    clock = time_scheduler(llm)
    rng = random.Random(0)
    system = token_prompt(llm, rng, a.system_tokens)
    prompts = {
        "shared": [system + token_prompt(llm, rng, a.question_tokens) for _ in range(a.requests)],
        "distinct": [token_prompt(llm, rng, a.system_tokens + a.question_tokens) for _ in range(a.requests)],
    }
    params = SamplingParams(temperature=0, max_tokens=a.new_tokens, ignore_eos=True)

    runs: dict[str, dict[str, list[dict]]] = {w: {"on": [], "off": []} for w in a.workloads}
    for rep in range(a.repeats):
        for w in a.workloads:
            for name in ("on", "off") if rep % 2 == 0 else ("off", "on"):
                set_caching(llm, name == "on")
                runs[w][name].append(run(llm, prompts[w], params, clock))
                print(f"  repeat {rep} {w} caching {name}: {runs[w][name][-1]['total_s']:.1f}s", flush=True)

    summary = {
        w: {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in by.items()}
        for w, by in runs.items()
    }
    ratio = report(summary, a)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {
        "benchmark": "cpu_prefix_cache",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to fp32",
        "args": vars(a),
        "summary": summary,
        "distinct_throughput_ratio_on_over_off": ratio,
        "runs": runs,
    }
    name = "_".join(a.workloads)
    dest = pathlib.Path(__file__).parent / "results" / f"cpu_prefix_cache_{name}_{out['date']}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
