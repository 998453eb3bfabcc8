"""A load generator for any OpenAI-compatible server: streams completions at a fixed concurrency
and records, per request, the time to first token, the gaps between tokens and the total time."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import time

import httpx


@dataclasses.dataclass
class RequestRecord:
    ok: bool
    ttft: float = 0.0  # seconds from sending to the first content chunk
    e2e: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)  # gaps between content chunks
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclasses.dataclass
class LoadResult:
    concurrency: int
    duration: float
    records: list[RequestRecord]

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    @property
    def output_tokens_per_s(self) -> float:
        return sum(r.completion_tokens for r in self.ok) / self.duration

    def percentile(self, what: str, q: float) -> float:
        values = sorted(v for r in self.ok for v in ([getattr(r, what)] if what != "itl" else r.itl))
        if not values:
            return float("nan")
        return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]

    def summary(self) -> dict:
        ok = self.ok
        return {
            "concurrency": self.concurrency,
            "requests": len(self.records),
            "failed": len(self.records) - len(ok),
            "duration_s": self.duration,
            "output_tok_s": self.output_tokens_per_s,
            "ttft_p50_s": self.percentile("ttft", 50),
            "ttft_p99_s": self.percentile("ttft", 99),
            "ttft_mean_s": statistics.fmean(r.ttft for r in ok) if ok else float("nan"),
            "itl_p50_s": self.percentile("itl", 50),
            "itl_p99_s": self.percentile("itl", 99),
            "e2e_p50_s": self.percentile("e2e", 50),
        }


async def _one(client: httpx.AsyncClient, body: dict) -> RequestRecord:
    rec = RequestRecord(ok=False)
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.error = chunk["error"]["message"]
                    return rec
                if chunk.get("usage"):
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    rec.completion_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        rec.ttft = now - t0
                    else:
                        rec.itl.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.e2e = time.perf_counter() - t0
    if not rec.completion_tokens:  # a server without include_usage: count content chunks
        rec.completion_tokens = len(rec.itl) + (1 if last is not None else 0)
    rec.ok = True
    return rec


async def run_load(
    base_url: str,
    bodies: list[dict],
    concurrency: int | None,
    api_key: str | None = None,
    request_rate: float | None = None,
    seed: int = 0,
) -> LoadResult:
    """Send every body to /v1/completions (streamed, with usage), at most `concurrency` at a time
    (None: no limit); with `request_rate`, requests start at Poisson arrival times."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    width = concurrency or len(bodies) or 1
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    sem = asyncio.Semaphore(width)
    extra = {"stream_options": {"include_usage": True}}
    rng = random.Random(seed)

    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600, limits=limits) as client:

        async def guarded(body: dict) -> RequestRecord:
            async with sem:
                return await _one(client, {**body, **extra})

        t0 = time.perf_counter()
        tasks = []
        for b in bodies:
            if request_rate:
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.ensure_future(guarded(b)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return LoadResult(concurrency or 0, duration, list(records))
