"""Host time per decode step with 1, 64 and 256 running sequences (CPU; issue 5).

A tiny dummy model (2 layers, hidden 64) makes the forward pass nearly free, so what is left of a
step is host work: scheduling, building the inputs and the sampling batch, and processing the
outputs (append, detokenize-free stop checks, RequestOutput objects). With async scheduling on a
GPU all of it except the launch calls runs while the device computes the previous step; this
script measures how large it is. Each phase is timed by wrapping the method that does it.

    python benchmarks/cpu_host_overhead.py [--output FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from membound.config import EngineConfig  # noqa: E402
from membound.engine import model_runner, sampler  # noqa: E402
from membound.engine.llm_engine import LLMEngine  # noqa: E402
from membound.sampling_params import SamplingParams  # noqa: E402

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 4096,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
}


def measure(n: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        (pathlib.Path(d) / "config.json").write_text(json.dumps(CONFIG))
        eng = LLMEngine(
            EngineConfig(
                model=d, load_format="dummy", skip_tokenizer_init=True, max_model_len=512, max_num_seqs=256,
                max_num_batched_tokens=4096, kv_cache_memory_bytes=256 << 20, async_scheduling=False,
            )
        )  # fmt: skip
    spent: dict[str, float] = {}

    def wrap(obj, name, phase):
        inner = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - t

        setattr(obj, name, timed)

    wrap(eng.scheduler, "schedule", "schedule")
    wrap(eng.runner, "prepare", "build inputs")
    wrap(eng.runner, "forward_logits", "forward (device)")
    wrap(eng, "_update", "process outputs")
    wrap(model_runner, "sample_on_device", "sample (device)")
    wrap(sampler.SamplingBatch, "build", "build sampling batch")
    # (the wrapper around the bound classmethod is a plain function on the class: called as before)
    for i in range(n):
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=steps + 20, ignore_eos=True)
        eng.add_request(str(i), [1 + i % 100] * 32, params)
    for _ in range(4):
        eng.step()  # prefills, then decodes
    spent.clear()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    step = statistics.mean(times)
    per = {k: v / steps * 1000 for k, v in spent.items()}
    device = per.get("forward (device)", 0) + per.get("sample (device)", 0)
    return {"running": n, "step_ms": step * 1000, "phases_ms": per, "host_ms": step * 1000 - device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=None)
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    rows = [measure(n, a.steps) for n in (1, 64, 256)]
    result = {
        "benchmark": "cpu_host_overhead",
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),  # fmt: skip
        "model": "dummy llama, 2 layers, hidden 64, vocab 4096 (forward nearly free)",
        "rows": rows,
    }
    for r in rows:
        phases = ", ".join(f"{k} {v:.3f}" for k, v in r["phases_ms"].items())
        print(f"{r['running']:>4} running: step {r['step_ms']:.2f} ms, host {r['host_ms']:.2f} ms ({phases})")
    path = pathlib.Path(a.output or ROOT / "benchmarks" / "results" / f"cpu_host_overhead_{result['date']}.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
