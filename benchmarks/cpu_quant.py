"""Weight formats on CPU, one run: decode tok/s and quality of SmolLM2-135M at fp32, gguf, int8, int4, fp8.

    python benchmarks/cpu_quant.py [--repeats 2] [--new-tokens 32] [--formats none,gguf,int8,int4,fp8]

fp32 is quantization="none" (the GGUF dequantized); gguf is the default for a GGUF file (its Q4_1
and Q8_0 blocks kept packed).

Decode rate = batch x (N - 1) / (t(N new tokens) - t(1 new token)) at batch 1 and 16, every
format in each repeat (order rotated), medians reported. Quality: mean KL divergence and top-1
agreement against fp32 over 96 tokens the fp32 model generated (fixed seed), as llama.cpp's
perplexity tool reports them. Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from membound import LLM, SamplingParams  # noqa: E402
from membound.bench.common import run_record, weight_bytes_per_step  # noqa: E402
from tests.conftest import full_logits  # noqa: E402

FORMATS = ["none", "gguf", "int8", "int4", "fp8"]


def decode_rate(llm: LLM, batch: int, n: int) -> float:
    prompts = [[(17 * i + j) % 5000 + 100 for j in range(64)] for i in range(batch)]

    def run(k: int) -> float:
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))
        return time.perf_counter() - t

    return batch * (n - 1) / (run(n) - run(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--output", default=None)
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated; none (fp32) is always run")
    a = ap.parse_args()
    formats = ["none"] + [f for f in a.formats.split(",") if f and f != "none"]
    llms = {
        "fp32" if f == "none" else f: LLM(max_model_len=256, kv_cache_memory_bytes=64 << 20, quantization=f)
        for f in formats
    }
    ref = llms["fp32"]
    text = ref.generate("Once upon a time, in a small village", SamplingParams(temperature=0.8, seed=1, max_tokens=96))
    ids = text[0].prompt_token_ids + text[0].outputs[0].token_ids
    p = torch.log_softmax(full_logits(ref.engine, ids), -1)
    rows = {}
    for name, llm in llms.items():
        q = torch.log_softmax(full_logits(llm.engine, ids), -1)
        rows[name] = {
            "format": name,
            "weight_bytes_per_step": weight_bytes_per_step(llm.engine),
            "kl": (p.exp() * (p - q)).sum(-1).mean().item(),
            "top1": (p.argmax(-1) == q.argmax(-1)).float().mean().item(),
            "rates": {1: [], 16: []},
        }
    names = list(llms)
    for rep in range(a.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            for b in (1, 16):
                rows[name]["rates"][b].append(decode_rate(llms[name], b, a.new_tokens))
            print(rep, name, {b: round(v[-1], 1) for b, v in rows[name]["rates"].items()}, flush=True)
    print("\n| format | MB read per step | KL vs fp32 | top-1 agreement | decode tok/s @1 | @16 | speed-up @1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = statistics.median(rows["fp32"]["rates"][1])
    for r in rows.values():
        r["tok_s_1"] = statistics.median(r["rates"][1])
        r["tok_s_16"] = statistics.median(r["rates"][16])
        print(f"| {r['format']} | {r['weight_bytes_per_step'] / 1e6:,.0f} | {r['kl']:.4f} | {r['top1']:.1%} | "
              f"{r['tok_s_1']:.1f} | {r['tok_s_16']:.1f} | {r['tok_s_1'] / base:.2f}x |")  # fmt: skip
    out = {"benchmark": "cpu_quant", "record": run_record(ref.engine), "args": vars(a), "rows": list(rows.values())}
    path = pathlib.Path(a.output or ROOT / "benchmarks" / "results" / f"cpu_quant_{datetime.date.today()}.json")
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
