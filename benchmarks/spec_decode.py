"""Speculative decoding (n-gram drafts) vs off, side by side in one process on the default model.

Workloads (chat template, greedy unless said):
- grounded, batch 1: answers that copy from the prompt (repeat a passage, rename a variable in code,
  fix one word in a paragraph): where prompt lookup pays;
- open, batch 1 and batch 16: open-ended chat at temperature 0.8 (ignore_eos, fixed length): little
  to match, where speculation must not cost (the adaptive off-switch).
The two engines alternate over repeats; medians and min-max of output tokens/s, and the mean
acceptance length (tokens emitted per drafting step) of the speculating engine.

    python benchmarks/spec_decode.py --repeats 5 --out benchmarks/results/spec_decode_DATE.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from membound import LLM, SamplingParams

PASSAGE = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations "
    "in it, and what is the use of a book, thought Alice, without pictures or conversations?"
)
CODE = """def mean(values):
    total = 0
    for v in values:
        total = total + v
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for v in values:
        total = total + (v - m) ** 2
    return total / len(values)
"""
GROUNDED = [
    f"Repeat the following text exactly, word for word:\n\n{PASSAGE}",
    f"Rewrite this Python code, renaming the variable `total` to `acc`. Output only the code.\n\n{CODE}",
    f"Copy this paragraph but replace the word 'sister' with 'brother':\n\n{PASSAGE}",
]
OPEN = [
    "Write a short story about a robot who learns to paint.",
    "What are three tips for staying productive when working from home?",
    "Describe your ideal holiday in a few sentences.",
    "Explain why the sky is blue to a child.",
]
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def run(llm: LLM, convs: list, params: SamplingParams) -> tuple[float, float, int]:
    """(output tokens/s end to end, decode tokens/s after each request's first token, tokens)."""
    t = time.perf_counter()
    outs = llm.chat(convs, params)
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    first = min(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.finished_time for o in outs)
    return n / dt, (n - len(outs)) / (last - first), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    kw = dict(max_model_len=2048, kv_cache_memory_bytes=512 << 20)
    engines = {"off": LLM(**kw), "ngram": LLM(speculative_config=SPEC, **kw)}
    greedy = SamplingParams(temperature=0, max_tokens=160)
    sampled = SamplingParams(temperature=0.8, max_tokens=96, ignore_eos=True)
    cases = {f"grounded[{i}] b1": ([[{"role": "user", "content": p}]], greedy) for i, p in enumerate(GROUNDED)}
    cases["open b1"] = ([[{"role": "user", "content": OPEN[0]}]], sampled)
    cases["open b16"] = ([[{"role": "user", "content": OPEN[i % len(OPEN)]}] for i in range(16)], sampled)
    for llm in engines.values():  # warm up
        llm.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(max_tokens=8))
    results: dict = {}
    for name, (convs, params) in cases.items():
        rates: dict[str, list[float]] = {k: [] for k in engines}
        decode: dict[str, list[float]] = {k: [] for k in engines}
        tokens: dict[str, list[int]] = {k: [] for k in engines}
        sp = engines["ngram"].engine.core.speculator
        d0, a0 = sp.num_drafts, sp.num_accepted_tokens
        for r in range(a.repeats):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for k in order:
                rate, dec, n = run(engines[k], convs, params)
                rates[k].append(rate)
                decode[k].append(dec)
                tokens[k].append(n)
        drafts, accepted = sp.num_drafts - d0, sp.num_accepted_tokens - a0
        row = {
            k: {
                "tok_s_median": statistics.median(v),
                "tok_s_min": min(v),
                "tok_s_max": max(v),
                "decode_tok_s_median": statistics.median(decode[k]),
                "decode_tok_s_min": min(decode[k]),
                "decode_tok_s_max": max(decode[k]),
                "tokens": tokens[k],
            }
            for k, v in rates.items()
        }
        row["speedup_median"] = row["ngram"]["tok_s_median"] / row["off"]["tok_s_median"]
        row["decode_speedup_median"] = row["ngram"]["decode_tok_s_median"] / row["off"]["decode_tok_s_median"]
        row["mean_acceptance_length"] = 1 + accepted / drafts if drafts else None
        row["drafting_steps"] = drafts
        results[name] = row
        print(
            f"{name:14s} off {row['off']['tok_s_median']:6.1f} tok/s  ngram {row['ngram']['tok_s_median']:6.1f} tok/s"
            f"  x{row['speedup_median']:.2f} (decode x{row['decode_speedup_median']:.2f})"
            f"  acceptance length {row['mean_acceptance_length'] or 0:.2f}"
            f"  ({drafts} drafting steps)",
            flush=True,
        )
    if a.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "commit": commit,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "repeats": a.repeats,
            "spec": SPEC,
        }
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
