"""Prefix caching on vs off, in one run, on the embedded SmolLM2-135M (CPU).

    python benchmarks/cpu_prefix_cache.py [--requests 32] [--system-tokens 1000] [--question-tokens 50]

Workload "shared": every request is the same system prompt plus a distinct question, all
submitted at once. Reports mean / median time to first token and the total time.
Workload "distinct": no two prompts share even one block, so caching can only cost
(hashing, lookups); reports generated-token throughput. The two engines (caching on and
off, same weights) alternate within each repeat; medians are reported and every repeat is
kept in the JSON written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
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


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def token_prompt(llm: LLM, rng: random.Random, n_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += llm.tokenizer.encode(" " + random_text(rng, 50))
    return ids[:n_tokens]


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    llm.reset_prefix_cache()  # every repeat starts cold
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
        "hit_tokens": after.prefix_cache_hits - before.prefix_cache_hits,
        "query_tokens": after.prefix_cache_queries - before.prefix_cache_queries,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--question-tokens", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    common = dict(max_model_len=2048, kv_cache_memory_bytes=2 << 30)
    engines = {"on": LLM(**common), "off": LLM(**common, enable_prefix_caching=False)}
    rng = random.Random(0)
    tok = engines["on"]
    system = token_prompt(tok, rng, a.system_tokens)
    shared = [system + token_prompt(tok, rng, a.question_tokens) for _ in range(a.requests)]
    distinct = [token_prompt(tok, rng, a.system_tokens + a.question_tokens) for _ in range(a.requests)]
    params = SamplingParams(temperature=0, max_tokens=a.new_tokens, ignore_eos=True)

    results: dict[str, dict[str, list[dict]]] = {w: {"on": [], "off": []} for w in ("shared", "distinct")}
    for _ in range(a.repeats):
        for workload, prompts in (("shared", shared), ("distinct", distinct)):
            for name, llm in engines.items():
                results[workload][name].append(run(llm, prompts, params))

    def med(workload: str, name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[workload][name])

    summary = {}
    for w in ("shared", "distinct"):
        summary[w] = {name: {k: med(w, name, k) for k in results[w][name][0]} for name in ("on", "off")}
    s, d = summary["shared"], summary["distinct"]
    print(f"shared {a.system_tokens}-token system prompt, {a.requests} requests x {a.question_tokens}-token questions:")
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
    ratio = d["on"]["output_tok_s"] / d["off"]["output_tok_s"]
    print(
        f"distinct prompts: output {d['on']['output_tok_s']:.1f} tok/s on vs {d['off']['output_tok_s']:.1f} off "
        f"({(ratio - 1) * 100:+.1f}%)"
    )

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
        "runs": results,
    }
    dest = pathlib.Path(__file__).parent / "results" / f"cpu_prefix_cache_{out['date']}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
