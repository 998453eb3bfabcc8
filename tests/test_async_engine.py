"""The engine thread and its asyncio bridge, in process: loading, queue limits, a dying engine."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from starlette.testclient import TestClient

from membound.errors import EngineDeadError, QueueFullError
from membound.sampling_params import SamplingParams
from membound.server import AsyncEngine, EngineState, ServerConfig, SubRequest, build_app
from tests.conftest import tiny_llm


def _subs(n: int, prefix: str = "r", max_tokens: int = 8) -> list[SubRequest]:
    p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [SubRequest(f"{prefix}{i}", [1, 2, 3, i + 4], p, time.time()) for i in range(n)]


async def _collect(engine: AsyncEngine, subs: list[SubRequest]) -> dict[str, list[int]]:
    out = {}
    async for o in await engine.add(subs):
        out[o.request_id] = o.outputs[0].token_ids
    return out


def test_outputs_match_the_bare_engine_and_queue_limit_is_all_or_nothing(tmp_path):
    llm = tiny_llm(tmp_path)
    subs = _subs(3)
    outs = llm.generate([s.prompt_token_ids for s in subs], subs[0].params)
    want = {s.request_id: o.outputs[0].token_ids for s, o in zip(subs, outs, strict=True)}
    engine = AsyncEngine(lambda: llm.engine, max_queued_requests=3)

    async def main():
        engine.start(asyncio.get_running_loop())
        assert await asyncio.to_thread(engine.wait_loaded, 30)
        assert await _collect(engine, _subs(3)) == want
        with pytest.raises(QueueFullError, match="max-queued-requests 3"):
            await engine.add(_subs(4, "big"))
        assert not llm.engine.has_unfinished_requests()  # nothing of the refused group was queued
        # A stream closed early aborts its requests and frees their blocks.
        stream = await engine.add(_subs(2, "early", max_tokens=100))
        async for _ in stream:
            break
        stream.close()
        for _ in range(100):
            if llm.engine.stats().num_free_blocks == llm.engine.stats().num_total_blocks:
                break
            await asyncio.sleep(0.02)
        assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_total_blocks
        assert not llm.engine.requests

    try:
        asyncio.run(main())
    finally:
        engine.stop()


def test_a_failing_step_fails_waiters_and_marks_the_engine_dead(tmp_path):
    llm = tiny_llm(tmp_path)
    real_step, calls = llm.engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom in step")
        return real_step()

    llm.engine.step = flaky_step
    engine = AsyncEngine(lambda: llm.engine, max_queued_requests=8)

    async def main():
        engine.start(asyncio.get_running_loop())
        assert await asyncio.to_thread(engine.wait_loaded, 30)
        with pytest.raises(EngineDeadError, match="boom in step"):
            await _collect(engine, _subs(2, max_tokens=50))
        assert engine.state is EngineState.DEAD
        with pytest.raises(EngineDeadError, match="not running: RuntimeError: boom"):
            await engine.add(_subs(1, "late"))

    try:
        asyncio.run(main())
    finally:
        engine.stop()


def test_health_is_503_while_loading_and_when_dead(tmp_path):
    release = threading.Event()
    llm = tiny_llm(tmp_path)

    def slow_load():
        release.wait(30)
        return llm.engine

    engine = AsyncEngine(slow_load, max_queued_requests=8)
    app = build_app(engine, ServerConfig(), ("tiny",), 128)
    with TestClient(app) as http:
        r = http.get("/health")
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"prompt": [1, 2, 3]})
        assert r.status_code == 503 and r.headers["retry-after"]
        release.set()
        assert engine.wait_loaded(30)
        assert http.get("/health").status_code == 200
        r = http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4

    def broken_load():
        raise OSError("weights are unreadable")

    dead = AsyncEngine(broken_load, max_queued_requests=8)
    with TestClient(build_app(dead, ServerConfig(), ("tiny",), 128)) as http:
        assert not dead.wait_loaded(30)
        r = http.get("/health")
        assert r.status_code == 503 and "weights are unreadable" in r.json()["error"]["message"]
