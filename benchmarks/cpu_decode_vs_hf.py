"""Decode tok/s of membound vs HF transformers `generate`, same weights, same prompts, one run.

    python benchmarks/cpu_decode_vs_hf.py [--new-tokens 64] [--prompt-len 64] [--repeats 3]

The default SmolLM2-135M-Instruct GGUF is loaded by membound (dequantized to fp32); the HF
model gets the very same tensors. Decode rate = batch x (N - 1) / (t(N new tokens) - t(1 new
token)), which cancels prefill for both engines. Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import subprocess
import time

import torch
import transformers

from membound import LLM, SamplingParams
from membound.bench import hf as bench_hf


def hf_twin(llm: LLM) -> transformers.LlamaForCausalLM:
    return bench_hf.hf_twin(llm.engine)


def time_membound(llm: LLM, prompts: list[list[int]], n: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == n for o in outs)
    return dt


@torch.inference_mode()
def time_hf(hf, prompts: list[list[int]], n: int) -> float:
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    out = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    dt = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + n
    return dt


def decode_rates(timers: dict, prompts, n: int, repeats: int) -> dict[str, list[float]]:
    """Decode rate of each repeat per engine; engines alternate within a repeat so drift hits both."""
    rates: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            t1 = timer(prompts, 1)
            tn = timer(prompts, n)
            rates[name].append(len(prompts) * (n - 1) / (tn - t1))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    a = ap.parse_args()

    llm = LLM(max_model_len=1024, kv_cache_memory_bytes=512 << 20)
    hf = hf_twin(llm)
    text = "The history of the printing press begins in the fifteenth century, when " * 20
    base = llm.tokenizer.encode(text)
    # Same greedy output from both, on one prompt: the comparison is apples to apples.
    p0 = base[: a.prompt_len]
    ours = llm.generate(p0, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0].token_ids
    with torch.inference_mode():
        theirs = hf.generate(torch.tensor([p0]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(p0) :]
    assert ours == theirs.tolist(), "membound and HF disagree on greedy output"

    rows = []
    for b in a.batches:
        prompts = [base[i : i + a.prompt_len] for i in range(b)]  # distinct prompts of equal length
        timers = {"membound": lambda p, n: time_membound(llm, p, n), "hf": lambda p, n: time_hf(hf, p, n)}
        got = decode_rates(timers, prompts, a.new_tokens, a.repeats)
        ours, theirs = statistics.median(got["membound"]), statistics.median(got["hf"])
        rows.append(
            {
                "concurrency": b,
                "membound_tok_s": ours,
                "hf_tok_s": theirs,
                "ratio": ours / theirs,
                "membound_runs": got["membound"],
                "hf_runs": got["hf"],
            }
        )
        print(
            f"concurrency {b:3d}: membound {ours:8.1f} tok/s   HF generate {theirs:8.1f} tok/s   "
            f"ratio {ours / theirs:.2f}x"
        )

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "cpu_decode_vs_hf",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to fp32",
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "rows": rows,
    }
    dest = pathlib.Path(__file__).parent / "results" / f"cpu_decode_vs_hf_{result['date']}.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
