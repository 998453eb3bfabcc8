"""`membound bench serve`: load any OpenAI-compatible server and report what its users feel.

TTFT, TPOT (time per output token after the first), ITL and end-to-end latency (mean, median,
p90, p99), request and token throughput, goodput under SLOs, and a concurrency sweep
(users vs aggregate tok/s).
"""

from __future__ import annotations

import asyncio
import random

import httpx

from membound.bench.common import percentiles
from membound.bench.load import LoadResult, run_load
from membound.errors import ConfigError

_WORDS = (
    "time light water river stone cloud field market story engine signal garden window voice paper "
    "mountain winter music letter ocean forest bridge number system"
).split()


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 0.5, "tpot": 0.05} (seconds)."""
    slo = {}
    for spec in specs or []:
        name, _, ms = spec.partition(":")
        if name not in ("ttft", "tpot", "e2e") or not ms:
            raise ConfigError(f"--goodput takes ttft:MS, tpot:MS or e2e:MS, got {spec!r}")
        try:
            slo[name] = float(ms) / 1000
        except ValueError:
            raise ConfigError(f"--goodput {spec!r}: {ms!r} is not a number of milliseconds") from None
    return slo


def model_name(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"cannot list models at {base_url}/v1/models ({e}); pass --served-model NAME") from e


def bodies(n: int, input_words: int, output_len: int, model: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "model": model,
            "prompt": " ".join(rng.choice(_WORDS) for _ in range(input_words)),
            "max_tokens": output_len,
            "temperature": 0,
            "ignore_eos": True,
        }
        for _ in range(n)
    ]


def summarize(result: LoadResult, slo: dict[str, float]) -> dict:
    ok = result.ok
    tpot = [(r.e2e - r.ttft) / (r.completion_tokens - 1) for r in ok if r.completion_tokens > 1]
    good = [
        r
        for r in ok
        if r.ttft <= slo.get("ttft", float("inf"))
        and r.e2e <= slo.get("e2e", float("inf"))
        and (r.completion_tokens <= 1 or (r.e2e - r.ttft) / (r.completion_tokens - 1) <= slo.get("tpot", float("inf")))
    ]
    out_tokens = sum(r.completion_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)

    def ms(values):
        return {k: v * 1000 for k, v in percentiles(values).items()}

    return {
        "concurrency": result.concurrency,
        "requests": len(result.records),
        "failed": len(result.records) - len(ok),
        "errors": sorted({r.error for r in result.records if not r.ok})[:5],
        "duration_s": result.duration,
        "request_throughput": len(ok) / result.duration,
        "output_tok_s": out_tokens / result.duration,
        "total_tok_s": (in_tokens + out_tokens) / result.duration,
        "per_user_tok_s": (out_tokens / result.duration) / max(1, result.concurrency or len(ok)),
        "goodput": len(good) / result.duration if slo else None,
        "ttft_ms": ms([r.ttft for r in ok]),
        "tpot_ms": ms(tpot),
        "itl_ms": ms([x for r in ok for x in r.itl]),
        "e2e_ms": ms([r.e2e for r in ok]),
    }


def run(
    base_url: str,
    concurrencies: list[int],
    num_prompts: int | None,
    input_words: int,
    output_len: int,
    request_rate: float | None,
    slo: dict[str, float],
    api_key: str | None,
    model: str | None,
    seed: int = 0,
) -> list[dict]:
    base_url = base_url.rstrip("/").removesuffix("/v1")
    model = model or model_name(base_url, api_key)
    rows = []
    for c in concurrencies:
        n = num_prompts or max(4 * c, 8)
        load = run_load(base_url, bodies(n, input_words, output_len, model, seed + c), c, api_key, request_rate, seed)
        rows.append(summarize(asyncio.run(load), slo))
    return rows
