"""Replicas on Ray Serve: 1 replica vs 2, prefix routing vs round-robin, on a multi-turn workload.

The same totals on every side: one replica with 2 threads and 128 MiB of KV cache, or two replicas
with 1 thread and 64 MiB each (this machine has 2 cores). Each setup is a `membound serve --replicas
N --routing R` process (its own local Ray instance); setups alternate over repeats. Workload: C
conversations of T turns with a long system prompt each, interleaved (turn t of every conversation
at once, then t + 1), greedy, streamed. Reported: output tokens/s over the whole run, time to first
token (median, p90) of turns after the first (the ones a prefix cache can serve), and the
prompt-token prefix hit rate.

    python benchmarks/replicas.py --repeats 2 --out benchmarks/results/replicas_DATE.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.server_utils import ServerProcess  # noqa: E402

# Equal totals on every side: 2 cores and 128 MiB of KV cache.
SETUPS = {
    "1 replica x 2 threads": ["--replicas", "1", "--num-threads", "2", "--kv-cache-memory", "128"],
    "2 replicas x 1 thread, prefix": ["--replicas", "2", "--num-threads", "1", "--kv-cache-memory", "64",
                                      "--routing", "prefix"],
    "2 replicas x 1 thread, round-robin": ["--replicas", "2", "--num-threads", "1", "--kv-cache-memory", "64",
                                           "--routing", "round-robin"],
}  # fmt: skip


async def conversations(url: str, n_conv: int, turns: int, max_tokens: int, tag: str) -> dict:
    persona = "Answer briefly, kindly and precisely, and never repeat the question back. " * 8
    history = [[{"role": "system", "content": f"You are assistant {i} of run {tag}. {persona}"}] for i in range(n_conv)]
    ttfts: list[float] = []
    tokens = 0

    async def turn(client: httpx.AsyncClient, i: int, t: int) -> None:
        nonlocal tokens
        history[i].append({"role": "user", "content": f"Question {t} of conversation {i}: what is {i} plus {t}?"})
        body = {"messages": history[i], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        t0, first, text = time.perf_counter(), None, []
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens += chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    if c["delta"].get("content"):
                        first = first or time.perf_counter()
                        text.append(c["delta"]["content"])
        if t > 0 and first is not None:
            ttfts.append(first - t0)
        history[i].append({"role": "assistant", "content": "".join(text)})

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for t in range(turns):
            await asyncio.gather(*(turn(client, i, t) for i in range(n_conv)))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "output_tok_s": tokens / wall, "ttft_s": ttfts}


def hit_rate(url: str, finished: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + 20
    while True:  # the replicas' metrics reach the ingress a second or two late
        sums: dict[str, float] = {}
        for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
            for s in fam.samples:
                sums[s.name] = sums.get(s.name, 0.0) + s.value
        if sums.get("membound:request_success_total", 0) >= finished or time.monotonic() > deadline:
            return sums.get("membound:prefix_cache_hits_total", 0) / max(
                1.0, sums.get("membound:prefix_cache_queries_total", 0)
            )
        time.sleep(0.5)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", type=pathlib.Path)
    a = ap.parse_args()
    common = ["--max-model-len", "2048", "--log-interval", "60"]
    runs: dict[str, list[dict]] = {k: [] for k in SETUPS}
    names = list(SETUPS)
    with tempfile.TemporaryDirectory() as logdir:
        for r in range(a.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                server = ServerProcess([*SETUPS[name], *common], pathlib.Path(logdir) / f"{r}.log", timeout=600)
                try:
                    res = asyncio.run(conversations(server.url, a.conversations, a.turns, a.max_tokens, f"{r}"))
                    res["hit_rate"] = hit_rate(server.url, a.conversations * a.turns)
                finally:
                    server.stop()
                ttft = res.pop("ttft_s")
                res.update(ttft_median_s=statistics.median(ttft), ttft_p90_s=pct(ttft, 0.9))
                print(name, json.dumps(res), flush=True)
                runs[name].append(res)
    summary = {
        name: {
            k: {
                "median": statistics.median(v[k] for v in rs),
                "min": min(v[k] for v in rs),
                "max": max(v[k] for v in rs),
            }
            for k in rs[0]
        }  # fmt: skip
        for name, rs in runs.items()
    }
    print(json.dumps(summary, indent=1))
    if a.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        a.out.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "commit": commit, "cpu": cpu,
            "python": platform.python_version(),
            "workload": {"conversations": a.conversations, "turns": a.turns, "max_tokens": a.max_tokens},
            "repeats": a.repeats, "summary": summary, "runs": runs,
        }, indent=1) + "\n")  # fmt: skip
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
