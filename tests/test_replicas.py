"""`serve --replicas N`: engine replicas on Ray Serve behind the same ingress, routed by prefix.

CPU, a local Ray instance, the real SmolLM2 with a small KV pool, one engine thread per replica. Without
ray installed the Ray tests are skipped, except under CI=true, where that is a failure."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from membound.config import EngineConfig
from membound.entrypoints.cli import main
from membound.errors import ConfigError
from membound.server.app import ServedModel, ServerConfig, build_models_app


def test_replica_flags_are_checked_at_the_edge(capsys):
    assert main(["serve", "--ray-address", "auto"]) == 2
    assert "--ray-address needs --replicas" in capsys.readouterr().err
    assert main(["serve", "--replicas", "0"]) == 2
    assert "--replicas must be a positive integer" in capsys.readouterr().err
    assert main(["serve", "--routing", "pow2"]) == 2
    assert "--routing needs --replicas" in capsys.readouterr().err


def _need_ray() -> None:
    if importlib.util.find_spec("ray") is not None:
        return
    msg = "ray is not installed (it comes with the test extra: pip install -e '.[test]')"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {msg}")
    pytest.skip(msg)


def _config() -> EngineConfig:
    return EngineConfig(max_model_len=1024, kv_cache_memory_bytes=64 << 20, num_threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _served(engine, name: str = "smol"):
    """The server's app around `engine` (an AsyncEngine or a RemoteEngine), on uvicorn in a thread."""
    app = build_models_app([ServedModel((name,), engine, 1024)], ServerConfig())
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        assert time.monotonic() < deadline, "server not healthy"
        time.sleep(0.2)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def ray_local():
    _need_ray()
    import ray

    ray.init(num_cpus=6, namespace="membound-test", log_to_driver=False, include_dashboard=False)
    yield
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()


@contextlib.contextmanager
def _replicas(n: int, routing: str = "prefix", app: str = "membound", threshold: int = 4):
    from membound.server.replicas import RemoteEngine, ReplicaConfig

    rc = ReplicaConfig(n, routing=routing, app_name=app, namespace="membound-test", imbalance_threshold=threshold)
    engine = RemoteEngine(_config(), rc, 64, "smol")
    engine.start()
    if engine.load_error is not None:
        raise engine.load_error
    try:
        with _served(engine) as url:
            yield engine, url
    finally:
        engine.stop()


def _metrics(url: str) -> dict[tuple, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _settled(url: str, finished: int, timeout: float = 15.0) -> dict[tuple, float]:
    """/metrics once the replicas' pushes count `finished` finished requests (they lag by a second or two)."""
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(url)
        if _sum(m, "membound:request_success_total") >= finished or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def _sum(m: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def _sdk_outputs(url: str) -> list:
    import openai

    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    msgs = [{"role": "user", "content": "Name three planets."}]
    chat = c.chat.completions.create(model="smol", messages=msgs, max_tokens=12, temperature=0)
    stream = c.chat.completions.create(model="smol", messages=msgs, max_tokens=12, temperature=0, stream=True)
    chat_streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    comp = c.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
    s2 = c.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
    comp_streamed = "".join(ch.choices[0].text for ch in s2 if ch.choices)
    return [chat.choices[0].message.content, chat_streamed, comp.choices[0].text, comp_streamed]


@pytest.mark.slow
def test_two_replicas_serve_the_openai_sdk_as_one_process_does(ray_local):
    from membound.engine.llm_engine import LLMEngine
    from membound.server.async_engine import AsyncEngine
    from membound.server.metrics import ServerMetrics
    from membound.server.prefix_router import block_hash_chain

    single = AsyncEngine(lambda: LLMEngine(_config()), 64, metrics=ServerMetrics("smol"))
    with _served(single) as url:
        want = _sdk_outputs(url)
    with _replicas(2) as (engine, url):
        got = _sdk_outputs(url)
        assert got == want
        assert all(got)
        # The router's chain is the engine's: the replica that ran the prompt reports its very hashes.
        ids = engine.engine.tokenizer.encode("The capital of France is " * 8)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": ids, "max_tokens": 1}, timeout=60)
        assert r.status_code == 200
        chain = block_hash_chain(ids, engine.info.block_size, engine.info.cache_salt)
        assert chain
        # Until both replicas have served something (power of two may pick one for the first few).
        for i in range(40):
            per = {
                dict(ls).get("replica")
                for (n, ls), v in _metrics(url).items()
                if n == "membound:router_requests_total" and v
            }
            if len(per - {None, "ingress"}) >= 2:
                break
            httpx.post(f"{url}/v1/completions", json={"prompt": f"Story {i}:", "max_tokens": 1}, timeout=60)
        m = _settled(url, 5)
        replicas = {dict(ls).get("replica") for (n, ls) in m if n == "membound:request_success_total"}
        assert len(replicas - {None}) == 2, replicas
        assert _sum(m, "membound:router_requests_total") >= 5
        assert _sum(m, "membound:request_success_total") >= 5
        import ray

        held = ray.get(engine._index.match.remote(chain, sorted(replicas - {None})))
        assert max(held.values()) == len(chain), held


def _conversations(url: str, n_conv: int = 16, turns: int = 4, tag: str = "") -> None:
    """n_conv conversations of `turns` turns, interleaved: turn t of every conversation, then t + 1."""
    history = [
        [{"role": "system", "content": f"You are assistant number {i}{tag}. " + "Answer briefly and kindly. " * 6}]
        for i in range(n_conv)
    ]

    async def turn(client, i, t):
        history[i].append({"role": "user", "content": f"Question {t} of conversation {i}: what is {i} plus {t}?"})
        r = await client.post("/v1/chat/completions", json={"messages": history[i], "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        history[i].append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            for t in range(turns):
                await asyncio.gather(*(turn(client, i, t) for i in range(n_conv)))

    asyncio.run(run())


def _hit_rate(url: str) -> float:
    m = _settled(url, 64)
    return _sum(m, "membound:prefix_cache_hits_total") / max(1.0, _sum(m, "membound:prefix_cache_queries_total"))


@pytest.mark.slow
def test_prefix_routing_keeps_conversations_hits(ray_local):
    rates = {}
    for name, n, routing in (("single", 1, "prefix"), ("prefix", 2, "prefix"), ("round-robin", 2, "round-robin")):
        with _replicas(n, routing, app=f"hits-{name}") as (_, url):
            _conversations(url)
            rates[name] = _hit_rate(url)
    print(f"prompt-token prefix hit rate: {rates}")
    assert rates["prefix"] >= 0.9 * rates["single"], rates
    assert rates["prefix"] > rates["round-robin"] + 0.05, rates


@pytest.mark.slow
def test_one_shared_prefix_still_spreads_load(ray_local):
    shared = "You are a helpful assistant. " * 30
    with _replicas(2, "prefix", app="skew", threshold=1) as (_, url):

        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                body = {"prompt": shared, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
                await client.post("/v1/completions", json=body)  # the prefix is cached on one replica
                rs = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(16)))
                assert all(r.status_code == 200 for r in rs)

        asyncio.run(run())
        m = _settled(url, 17)
        per = {}
        for (n, ls), v in m.items():
            if n == "membound:router_requests_total":
                per[dict(ls)["replica"]] = per.get(dict(ls)["replica"], 0) + v
        print(f"requests per replica: {per}")
        assert len(per) == 2 and max(per.values()) <= 0.7 * sum(per.values()), per


@pytest.mark.slow
def test_a_killed_replica_fails_its_requests_and_recovers(ray_local):
    import ray

    with _replicas(2, "round-robin", app="death") as (engine, url):
        # Long enough that all four still run when the kill comes, on a fast machine too.
        body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True}

        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                tasks = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(4)]
                await asyncio.sleep(3.0)  # all four running, two on each replica
                from ray import serve

                status = serve.status().applications["death"].deployments["engine"]
                assert status is not None
                actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "death#engine" in a["name"]]
                victim = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
                ray.kill(victim, no_restart=True)
                return await asyncio.wait_for(asyncio.gather(*tasks), 120)

        rs = asyncio.run(run())
        codes = sorted(r.status_code for r in rs)
        print(f"status codes after a kill: {codes}")
        ok = [r for r in rs if r.status_code == 200]
        failed = [r for r in rs if r.status_code != 200]
        assert ok and failed, codes
        assert all(r.json()["usage"]["completion_tokens"] == 400 for r in ok)
        assert all(r.status_code == 503 and "replica" in r.json()["error"]["message"] for r in failed)
        deadline = time.monotonic() + 90  # Ray restarts the replica; the app serves both again
        while True:
            r = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}, timeout=60)
            if r.status_code == 200:
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(1)


def test_replica_config_rejects_nonsense():
    _need_ray()
    from membound.server.replicas import ReplicaConfig

    with pytest.raises(ConfigError, match="--replicas"):
        ReplicaConfig(0)
    with pytest.raises(ConfigError, match="--routing"):
        ReplicaConfig(2, routing="random")


def test_router_routes_by_load_when_the_prefix_index_is_gone():
    """An exception in choose_replicas would leave the request unrouted for good (Serve drops the
    routing task): a dead or slow index must cost only the prefix match."""
    from types import SimpleNamespace

    from membound.server.prefix_router import MemboundRouter

    class DeadIndex:
        class match:  # noqa: N801 - shaped like a Ray actor method
            @staticmethod
            def remote(*_):
                async def fail():
                    raise RuntimeError("actor died")

                return fail()

    router = MemboundRouter.__new__(MemboundRouter)  # the routing logic alone, no Serve controller
    router._index, router._policy, router._threshold, router._next, router._decisions = DeadIndex, "prefix", 4, 0, {}
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=u)) for u in ("a", "b")]
    pending = SimpleNamespace(
        metadata=SimpleNamespace(internal_request_id="r1"),
        kwargs={"block_hashes": [b"h1", b"h2"]},
        routing_context=SimpleNamespace(should_backoff=False),
    )
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    assert [sorted(r.replica_id.unique_id for r in rank) for rank in ranks] == [["a", "b"]]
    assert pending.routing_context.should_backoff and router._decisions["r1"][0] == "load"
