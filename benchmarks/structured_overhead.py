"""What structured outputs and prompt scoring cost on the default model (issue 17), CPU, one process.

- TPOT (decode time per output token after the first) at batch 1 and 16: a JSON schema that needs a
  long string vs the same requests unconstrained;
- a 512-token prompt: prefill time with prompt_logprobs=1 (every row scored) vs plain prefill.
Alternated within each repeat; medians (min-max).

    python benchmarks/structured_overhead.py --repeats 3 --out benchmarks/results/structured_overhead_DATE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

from membound.config import EngineConfig
from membound.cpu import cpu_model_name
from membound.engine.llm_engine import LLMEngine
from membound.sampling_params import SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 400, "maxLength": 600}},
    "required": ["story"],
}
TOKENS = 48


def tpot_ms(engine: LLMEngine, batch: int, constrained: bool) -> float:
    so = StructuredOutputsParams(json=SCHEMA) if constrained else None
    for i in range(batch):
        params = SamplingParams(max_tokens=TOKENS, temperature=1.0, seed=i, ignore_eos=True, structured_outputs=so)
        engine.add_request(f"r{i}", f"Story {i}, as JSON:", params)
    while any(engine.num_output_tokens(f"r{i}") in (None, 0) for i in range(batch)):
        engine.step()
    t, tokens = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.delta_token_ids) for o in engine.step())
    return (time.perf_counter() - t) * 1000 / max(1, tokens / batch)


def prefill_ms(engine: LLMEngine, scored: bool) -> float:
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1 if scored else None)
    t = time.perf_counter()
    engine.add_request("p", list(range(1000, 1512)), params)
    while engine.has_unfinished_requests():
        engine.step()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    engine = LLMEngine(EngineConfig(max_model_len=1024, kv_cache_memory_bytes=256 << 20, enable_prefix_caching=False))
    runs: dict[str, list[float]] = {}
    for _ in range(a.repeats):
        for batch in (1, 16):
            for constrained in (False, True):
                key = f"tpot_ms_b{batch}_{'json' if constrained else 'free'}"
                runs.setdefault(key, []).append(tpot_ms(engine, batch, constrained))
        for scored in (False, True):
            runs.setdefault(f"prefill512_ms_{'scored' if scored else 'plain'}", []).append(prefill_ms(engine, scored))
    summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in runs.items()}
    for k, v in summary.items():
        print(f"{k}: {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})")
    for batch in (1, 16):
        free, js = summary[f"tpot_ms_b{batch}_free"]["median"], summary[f"tpot_ms_b{batch}_json"]["median"]
        print(f"batch {batch}: JSON schema TPOT {js / free:.3f}x unconstrained")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(
                {
                    "machine": {"cpu": cpu_model_name(), "threads": torch.get_num_threads()},
                    "torch": torch.__version__,
                    "commit": commit,
                    "date": time.strftime("%Y-%m-%d"),
                    "runs": runs,
                    "summary": summary,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
