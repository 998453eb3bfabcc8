"""The sampler's draw: inverse CDF (now) vs the exponential race it replaced, side by side.

One engine on the default model; sampled decode (temperature 0.8, 96 tokens, ignore_eos) at batch 1
and 16, the two draws alternating over repeats (the old one patched in for its turns). Reports
decode tokens/s after the first token, median and min-max, and the ratio.

    python benchmarks/sampler_draw.py --repeats 5 --out benchmarks/results/sampler_draw_DATE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from unittest import mock

import torch

from membound import LLM, SamplingParams
from membound.engine import sampler


def exponential_race(weights, generator, generators=()):
    """The draw before: argmax of p / E, E ~ Exp(1) over the whole vocabulary."""
    noise = torch.empty_like(weights).exponential_(generator=generator)
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    return (weights / noise).argmax(dim=-1)


def decode_rate(llm: LLM, batch: int) -> float:
    convs = [[{"role": "user", "content": f"Tell me a story about the number {i}."}] for i in range(batch)]
    outs = llm.chat(convs, SamplingParams(temperature=0.8, max_tokens=96, ignore_eos=True))
    first = min(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.finished_time for o in outs)
    return sum(len(o.outputs[0].token_ids) - 1 for o in outs) / (last - first)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    llm = LLM(max_model_len=1024, kv_cache_memory_bytes=256 << 20)
    decode_rate(llm, 2)  # warm up
    results = {}
    for batch in (1, 16):
        rates: dict[str, list[float]] = {"inverse_cdf": [], "exponential_race": []}
        for r in range(a.repeats):
            for name in list(rates) if r % 2 == 0 else list(reversed(rates)):
                if name == "exponential_race":
                    with mock.patch.object(sampler, "draw", exponential_race):
                        rates[name].append(decode_rate(llm, batch))
                else:
                    rates[name].append(decode_rate(llm, batch))
        row = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in rates.items()}
        row["ratio_median"] = row["inverse_cdf"]["median"] / row["exponential_race"]["median"]
        results[f"b{batch}"] = row
        print(
            f"batch {batch:2d}: inverse CDF {row['inverse_cdf']['median']:.1f} tok/s "
            f"({row['inverse_cdf']['min']:.1f}-{row['inverse_cdf']['max']:.1f}), exponential race "
            f"{row['exponential_race']['median']:.1f} ({row['exponential_race']['min']:.1f}-"
            f"{row['exponential_race']['max']:.1f}): x{row['ratio_median']:.2f}",
            flush=True,
        )
    if a.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "threads": torch.get_num_threads()}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
