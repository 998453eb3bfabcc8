"""What batch_invariant buys and costs on the default model (issue 20, finding 3).

Buys: of 16 seeded requests at temperature 1-2 (every sampling setting), how many give other tokens
under staggered, chunked, preempting load than alone; default vs batch_invariant.
Costs: a 512-token prefill (time to the first token) and decode tok/s at batch 1 and 8, both engines
loaded in this process and alternated within each repeat; medians (min-max).

    python benchmarks/batch_invariant.py --repeats 3 --out benchmarks/results/batch_invariant_DATE.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from membound.config import EngineConfig
from membound.cpu import cpu_model_name
from membound.engine.llm_engine import LLMEngine
from membound.sampling_params import SamplingParams

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum old songs of the sea".split()
SHARED = "You are a helpful assistant. Answer briefly and truthfully, then stop. " * 2


def requests(n: int = 16):
    out = []
    for i in range(n):
        r = (i * 3) % len(WORDS)
        prompt = (SHARED if i % 2 else "") + " ".join(WORDS[r:] + WORDS[:r]) * (1 + i % 3)
        params = SamplingParams(
            temperature=1.0 + (i % 5) * 0.25, seed=1000 + i, max_tokens=32, ignore_eos=True,
            top_p=0.9 if i % 3 == 0 else 1.0, top_k=40 if i % 4 == 1 else 0, min_p=0.05 if i % 5 == 2 else 0.0,
            repetition_penalty=1.1 if i % 2 else 1.0, presence_penalty=0.5 if i % 6 == 3 else 0.0,
        )  # fmt: skip
        out.append((prompt, params))
    return out


def differing(invariant: bool) -> list[str]:
    reqs = requests()
    alone_e = LLMEngine(EngineConfig(max_model_len=256, kv_cache_memory_bytes=64 << 20, batch_invariant=invariant))
    alone = {}
    for i, (p, sp) in enumerate(reqs):
        alone_e.reset_prefix_cache()
        alone_e.add_request(f"r{i}", p, sp)
        while alone_e.has_unfinished_requests():
            for o in alone_e.step():
                if o.finished:
                    alone[o.request_id] = list(o.outputs[0].token_ids)
    kv = (3 << 20) * EngineConfig().torch_dtype(torch.device("cpu"), True).itemsize
    e = LLMEngine(
        EngineConfig(
            max_model_len=256, kv_cache_memory_bytes=kv, max_num_batched_tokens=40, max_num_seqs=8,
            batch_invariant=invariant,
        )
    )  # fmt: skip
    loaded, i, step = {}, 0, 0
    while i < len(reqs) or e.has_unfinished_requests():
        if i < len(reqs) and step % 2 == 0:
            e.add_request(f"r{i}", *reqs[i])
            i += 1
        step += 1
        for o in e.step():
            if o.finished:
                loaded[o.request_id] = list(o.outputs[0].token_ids)
    return [k for k in alone if alone[k] != loaded[k]]


def prefill_ms(e: LLMEngine, n: int = 512) -> float:
    t = time.perf_counter()
    e.add_request("p", list(range(1000, 1000 + n)), SamplingParams(max_tokens=1, temperature=0))
    while e.has_unfinished_requests():
        e.step()
    return (time.perf_counter() - t) * 1000


def decode_tok_s(e: LLMEngine, batch: int, tokens: int = 32) -> float:
    for i in range(batch):
        prompt = [1000 + i * 7 + j for j in range(64)]
        e.add_request(f"d{i}", prompt, SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=1.0, seed=i))
    while any(e.num_output_tokens(f"d{i}") in (None, 0) for i in range(batch)):
        e.step()  # prefills done, every sequence has its first token
    t, steps = time.perf_counter(), 0
    while e.has_unfinished_requests():
        e.step()
        steps += 1
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    diffs = {mode: differing(mode == "batch_invariant") for mode in ("default", "batch_invariant")}
    engines = {
        mode: LLMEngine(
            EngineConfig(
                max_model_len=1024, kv_cache_memory_bytes=256 << 20, enable_prefix_caching=False,
                batch_invariant=mode == "batch_invariant",
            )
        )
        for mode in ("default", "batch_invariant")
    }  # fmt: skip
    runs = {m: {"prefill512_ms": [], "decode_b1_tok_s": [], "decode_b8_tok_s": []} for m in engines}
    for _ in range(a.repeats):
        for mode, e in engines.items():  # alternated: drift in the machine hits both alike
            runs[mode]["prefill512_ms"].append(prefill_ms(e))
            runs[mode]["decode_b1_tok_s"].append(decode_tok_s(e, 1))
            runs[mode]["decode_b8_tok_s"].append(decode_tok_s(e, 8))
    summary = {
        m: {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in r.items()}
        for m, r in runs.items()
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "machine": {"cpu": cpu_model_name(), "threads": torch.get_num_threads(), "python": platform.python_version()},
        "torch": torch.__version__,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "dtype": str(engines["default"].config.torch_dtype(torch.device("cpu"), True)),
        "differing_of_16": {m: d for m, d in diffs.items()},
        "runs": runs,
        "summary": summary,
    }
    for m, s in summary.items():
        line = ", ".join(f"{k} {v['median']:.1f} ({v['min']:.1f}-{v['max']:.1f})" for k, v in s.items())
        print(f"{m}: {len(diffs[m])}/16 differ; {line}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
