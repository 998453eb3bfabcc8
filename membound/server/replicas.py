"""`membound serve MODEL --replicas N`: N engines as a Ray Serve application behind one ingress.

The ingress is this process: the same FastAPI app, middleware and jobs as the single-process server
(server/app.py, serving.py: validation, tokenization, chat templates, SSE), with a `RemoteEngine` in
place of the `AsyncEngine`. A request is tokenized here, once; its token ids, `SamplingParams` and its
block-hash chain go through a Ray Serve `DeploymentHandle` (streamed) to an `EngineReplica`, which runs
an `AsyncEngine` of its own and takes token ids as they are. Which replica is the custom request router's
choice (server/prefix_router.py). Ray is imported only here and there, so without `--replicas` nothing
loads it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
from typing import Any

from membound.config import EngineConfig
from membound.errors import ConfigError, EngineDeadError, InvalidRequestError, QueueFullError
from membound.server.async_engine import AsyncEngine, EngineState, SubRequest

log = logging.getLogger("membound.server")

_ENGINE_DEPLOYMENT = "engine"
POLICIES = ("prefix", "pow2", "round-robin")  # server/prefix_router.py's MemboundRouter
_FLUSH_INTERVAL = 0.2  # seconds between a replica's block-event flushes while it is busy
_METRICS_INTERVAL = 1.0  # seconds between a replica's metrics pushes (and the ingress's refresh)
_INDEX_TIMEOUT = 2.0  # seconds a block-event flush may take before it is retried with the next one
_DEAD_EXIT_S = 1.0  # a replica whose engine died exits this long after failing its requests


@dataclasses.dataclass
class ReplicaConfig:
    """`--replicas N` and what goes with it; validated here, at the edge."""

    num_replicas: int
    ray_address: str | None = None  # join this cluster; default: start a local Ray instance
    routing: str = "prefix"  # prefix | pow2 | round-robin
    imbalance_threshold: int = 4  # prefix choice dropped when its queue is this much longer than the shortest
    num_cpus: float = 1.0  # per replica
    num_gpus: float | None = None  # per replica; None: 1 on CUDA, 0 on CPU
    app_name: str = "membound"
    namespace: str = "membound"
    local_num_cpus: int | None = None  # the local Ray instance's CPUs (default: Ray's own count)

    def __post_init__(self) -> None:
        n = self.num_replicas
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"--replicas must be a positive integer, got {n!r}")
        if self.routing not in POLICIES:
            raise ConfigError(f"--routing must be one of {', '.join(POLICIES)}, got {self.routing!r}")
        t = self.imbalance_threshold
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ConfigError(f"--routing-imbalance-threshold must be an integer >= 0, got {t!r}")
        if not (math.isfinite(self.num_cpus) and self.num_cpus >= 0):
            raise ConfigError(f"replica num_cpus must be a finite number >= 0, got {self.num_cpus!r}")
        if self.num_gpus is not None and not (math.isfinite(self.num_gpus) and self.num_gpus >= 0):
            raise ConfigError(f"replica num_gpus must be a finite number >= 0, got {self.num_gpus!r}")
        if self.ray_address is not None and not self.ray_address:
            raise ConfigError("--ray-address must not be empty")


def check_replica_flags(replicas: int | None, ray_address: str | None, routing: str | None) -> None:
    """The CLI's rule: --ray-address and --routing only mean something with --replicas."""
    if replicas is None and ray_address is not None:
        raise ConfigError("--ray-address needs --replicas N (it says which Ray cluster runs the replicas)")
    if replicas is None and routing is not None:
        raise ConfigError("--routing needs --replicas N")


@dataclasses.dataclass(frozen=True)
class ReplicaInfo:
    """What the ingress needs to know of the engines (all replicas are built from one config)."""

    max_model_len: int
    max_num_seqs: int
    block_size: int
    cache_salt: bytes
    vocab_size: int


# ---------------------------------------------------------------------- the replica


class _BlockEvents:
    """The prefix-cache events of one engine's `BlockPool` (its cache listener): a block cached (`+`),
    evicted (`-`), the cache reset. Appended on the engine thread, drained on the replica's event loop."""

    def __init__(self, pool) -> None:
        self.queue: collections.deque = collections.deque()
        pool.add_cache_listener(lambda event, block_hash: self.queue.append((event, block_hash)))

    def put_back(self, events: list) -> None:
        self.queue.extendleft(reversed(events))

    def drain(self) -> list:
        out = []
        while self.queue:
            out.append(self.queue.popleft())
        return out


class EngineReplica:
    """One engine in a Ray Serve replica: an `AsyncEngine` (its own thread) fed token ids."""

    def __init__(self, engine_config: EngineConfig, max_queued_requests: int, model_name: str, index_name: str,
                 namespace: str) -> None:  # fmt: skip
        import ray
        from ray import serve

        from membound.engine.llm_engine import LLMEngine
        from membound.server.metrics import ServerMetrics

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._index = ray.get_actor(index_name, namespace=namespace)
        self.engine = AsyncEngine(
            lambda: LLMEngine(engine_config), max_queued_requests, metrics=ServerMetrics(model_name), log_interval=30.0
        )
        # A dead engine answers at once with an empty queue: the router would prefer it. Its blocks
        # leave the index, and the process exits (after its requests' errors go out), so Serve
        # replaces it now rather than after three failed health checks.
        self.engine.on_dead = self._on_engine_dead
        self.engine.start()
        self.engine.wait_loaded()
        if self.engine.load_error is not None:
            raise self.engine.load_error
        e = self.engine.engine
        self._events = _BlockEvents(e.allocator)
        self._index.apply.remote(self.replica_id, [("reset", None)])
        self.info_ = ReplicaInfo(
            e.max_model_len, e.config.max_num_seqs, e.scheduler.config.block_size, e.scheduler.config.cache_salt,
            e.model_config.vocab_size,
        )  # fmt: skip
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._background: asyncio.Task | None = None

    def _on_engine_dead(self) -> None:
        with contextlib.suppress(Exception):
            self._index.apply.remote(self.replica_id, [("reset", None)])
        timer = threading.Timer(_DEAD_EXIT_S, os._exit, (1,))
        timer.daemon = True
        timer.start()

    def _on_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self.engine.attach(loop)
            self._flush_lock = asyncio.Lock()
            self._background = loop.create_task(self._report())

    async def _flush(self) -> None:
        assert self._flush_lock is not None
        async with self._flush_lock:  # in order: a block's + and - must not swap
            events = self._events.drain()
            if not events:
                return
            try:
                await asyncio.wait_for(self._index.apply.remote(self.replica_id, events), _INDEX_TIMEOUT)
            except Exception:
                self._events.put_back(events)  # sent with the next flush, still in order
                raise

    async def _report(self) -> None:
        from prometheus_client import generate_latest

        last_metrics = 0.0
        while True:
            await asyncio.sleep(_FLUSH_INTERVAL)
            with contextlib.suppress(Exception):
                await self._flush()
                now = time.monotonic()
                if now - last_metrics >= _METRICS_INTERVAL and self.engine.metrics is not None:
                    last_metrics = now
                    text = generate_latest(self.engine.metrics.registry).decode()
                    await self._index.put_metrics.remote(self.replica_id, text)

    async def info(self) -> ReplicaInfo:
        self._on_loop()
        return self.info_

    async def generate(self, subs: list[SubRequest], block_hashes: list[bytes] | None = None):
        """Messages: first ("queued",) or a refusal ("queue_full" | "invalid" | "dead", message, param);
        then ("out", RequestOutput) until every sub-request finished, or ("dead", message). Cancelled
        (the client went away): the stream closes, which aborts what has not finished."""
        self._on_loop()
        try:
            stream = await self.engine.add(subs)
        except QueueFullError as e:
            yield ("queue_full", str(e), None)
            return
        except InvalidRequestError as e:
            yield ("invalid", str(e), e.param)
            return
        except EngineDeadError as e:
            yield ("dead", f"replica {self.replica_id}: {e}", None)
            return
        try:
            yield ("queued",)
            async for out in stream:
                if out.finished:  # the index knows this request's blocks before its client does
                    with contextlib.suppress(Exception):  # an index that is gone costs routing only
                        await self._flush()
                yield ("out", out)
        except EngineDeadError as e:
            yield ("dead", f"replica {self.replica_id}: {e}", None)
        finally:
            stream.close()

    def check_health(self) -> None:
        if self.engine.state is not EngineState.READY:
            raise RuntimeError(self.engine.unavailable_message())


# ---------------------------------------------------------------------- the ingress side


class _IngressModel:
    """What the serving jobs read of `AsyncEngine.engine`, at the ingress: the tokenizer, the limits,
    and grammar checks (compiled here for a 400 now; the replica compiles its own matcher)."""

    def __init__(self, tokenizer, info: ReplicaInfo) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = info.max_model_len
        self.config = _Limits(info.max_num_seqs)
        self._vocab_size = info.vocab_size
        self._structured = None
        self._lock = threading.Lock()

    def compile_grammar(self, spec):
        from membound.engine.structured import StructuredOutputs

        if self.tokenizer is None:
            raise InvalidRequestError("structured outputs need a tokenizer; this engine has none")
        with self._lock:
            if self._structured is None:
                self._structured = StructuredOutputs(self.tokenizer.hf, self._vocab_size)
        self._structured.matcher(spec)  # raises InvalidRequestError for a bad one
        return None  # matchers do not travel: the replica compiles again (its compiler caches)


@dataclasses.dataclass(frozen=True)
class _Limits:
    max_num_seqs: int


class RemoteStream:
    """`OutputStream` over a replica's response stream; closing it cancels the call (the replica aborts)."""

    def __init__(self, gen, ids: list[str], on_close=None) -> None:
        self._gen = gen
        self.pending = set(ids)
        self._on_close = on_close

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        try:
            while self.pending:
                try:
                    msg = await self._gen.__anext__()
                except StopAsyncIteration:
                    raise EngineDeadError("the replica ended this request's stream early; retry it") from None
                except Exception as e:  # noqa: BLE001 - a replica that died: this request fails, clearly
                    raise _replica_failed(e) from None
                if msg[0] == "dead":
                    raise EngineDeadError(msg[1])
                out = msg[1]
                if out.finished:
                    self.pending.discard(out.request_id)
                yield out
        finally:
            self.close()

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close(self)
        if self.pending:
            self.pending = set()
            with contextlib.suppress(Exception):
                self._gen.cancel()


def _replica_failed(e: BaseException) -> EngineDeadError:
    return EngineDeadError(
        f"the replica serving this request failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
        "Ray restarts it; retry the request"
    )


class IngressMetrics:
    """`/metrics` at the ingress: the replicas' membound metrics with a `replica` label, the routing
    counters, and the ingress's own refusals. A snapshot refreshed from the index once a second."""

    def __init__(self, model_name: str) -> None:
        from prometheus_client import CollectorRegistry

        self.model_name = model_name
        self.snapshot: dict[str, Any] = {}
        self._rejected: collections.Counter = collections.Counter()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def on_rejected(self, reason: str) -> None:
        self._rejected[reason] += 1

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[str, Any] = {}
        for replica, text in sorted(self.snapshot.get("metrics", {}).items()):
            for fam in text_string_to_metric_families(text):
                fam.samples = [s._replace(labels={**s.labels, "replica": replica}) for s in fam.samples]
                if fam.name in families:
                    families[fam.name].samples.extend(fam.samples)
                else:
                    families[fam.name] = fam
        rejected = families.get("membound:request_rejected")
        if self._rejected:
            if rejected is None:
                rejected = CounterMetricFamily("membound:request_rejected", "Requests refused before queueing.")
                families[rejected.name] = rejected
            for reason, n in self._rejected.items():
                labels = {"model_name": self.model_name, "reason": reason, "replica": "ingress"}
                rejected.add_sample("membound:request_rejected_total", labels, n)
        yield from families.values()
        routed = CounterMetricFamily(
            "membound:router_requests", "Requests routed, by replica and why (prefix match or load).",
            labels=["replica", "routed_by"],
        )  # fmt: skip
        for (replica, kind), n in sorted(self.snapshot.get("routed", {}).items()):
            routed.add_metric([replica, kind], n)
        yield routed
        matched = CounterMetricFamily(
            "membound:router_matched_blocks", "Prefix blocks the chosen replica held.", labels=["replica"]
        )
        for replica, n in sorted(self.snapshot.get("matched", {}).items()):
            matched.add_metric([replica], n)
        yield matched
        events = CounterMetricFamily("membound:router_block_events", "Block cache/evict events received.")
        events.add_metric([], self.snapshot.get("num_events", 0))
        yield events
        hashes = GaugeMetricFamily("membound:router_indexed_blocks", "Distinct block hashes in the router's index.")
        hashes.add_metric([], self.snapshot.get("num_hashes", 0))
        yield hashes


class RemoteEngine:
    """The `AsyncEngine` face app.py and serving.py use, over the replicas. `start()` starts (or joins)
    Ray, deploys the application and waits for every replica to load; `stop()` tears it down."""

    def __init__(
        self, engine_config: EngineConfig, replicas: ReplicaConfig, max_queued_requests: int, model_name: str
    ) -> None:
        self.engine_config = engine_config
        self.replicas = replicas
        self.max_queued_requests = max_queued_requests
        self.model_name = model_name
        self.metrics = IngressMetrics(model_name)
        self.name = None
        self.engine: _IngressModel | None = None
        self.info: ReplicaInfo | None = None
        self.error: str | None = None
        self.load_error: BaseException | None = None
        self.closing = asyncio.Event()
        self._closing: str | None = None
        self._state = EngineState.LOADING
        self._handle = None
        self._index = None
        self._ray_started_here = False
        self._streams: set[RemoteStream] = set()
        self._refresh: asyncio.Task | None = None
        self.started = False

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def loading(self) -> bool:
        return self._state is EngineState.LOADING and self.load_error is None

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._state is EngineState.READY

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Deploy (blocking: the caller's thread waits for the replicas to load). A failure is in
        `load_error`, as `AsyncEngine` reports a failed load."""
        self.started = True
        try:
            self._deploy()
        except BaseException as e:  # noqa: BLE001 - reported by the caller (serve: one line, exit 2)
            self.load_error = e
            self.error = f"deploying the replicas failed: {e}"
            self._state = EngineState.DEAD
            return
        self._state = EngineState.READY
        if loop is not None:
            self.attach(loop)

    def _deploy(self) -> None:
        import ray
        from ray import serve
        from ray.serve.config import RequestRouterConfig

        from membound.model.loader import resolve_model
        from membound.model.tokenizer import Tokenizer
        from membound.server.prefix_router import PrefixIndex

        r = self.replicas
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"namespace": r.namespace, "log_to_driver": False}
            if r.ray_address is not None:
                kwargs["address"] = r.ray_address
            else:  # a fresh local instance: never a cluster found through RAY_ADDRESS or /tmp/ray
                kwargs["address"] = "local"
                if r.local_num_cpus is not None:
                    kwargs["num_cpus"] = r.local_num_cpus
            ray.init(**kwargs)
            # Only what this process started is shut down: on a joined cluster, only this app goes.
            self._ray_started_here = r.ray_address is None
        serve.start(proxy_location="Disabled")
        index_name = f"{r.app_name}-prefix-index"
        with contextlib.suppress(ValueError):  # left over from an earlier run of this app
            ray.kill(ray.get_actor(index_name, namespace=r.namespace))
        self._index = (
            ray.remote(PrefixIndex).options(name=index_name, namespace=r.namespace, num_cpus=0).remote()
        )  # fmt: skip
        cuda = self.engine_config.torch_device().type == "cuda"
        num_gpus = r.num_gpus if r.num_gpus is not None else (1 if cuda else 0)
        # Serve's own admission limit is set past the engine's, so the replica's 429 is the one clients see.
        max_ongoing = self.max_queued_requests + self.engine_config.max_num_seqs + 16
        deployment = serve.deployment(
            EngineReplica,
            name=_ENGINE_DEPLOYMENT,
            num_replicas=r.num_replicas,
            ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": num_gpus},
            max_ongoing_requests=max_ongoing,
            health_check_period_s=2,
            health_check_timeout_s=30,
            request_router_config=RequestRouterConfig(
                request_router_class="membound.server.prefix_router.MemboundRouter",
                request_router_kwargs={
                    "index_name": index_name,
                    "namespace": r.namespace,
                    "policy": r.routing,
                    "imbalance_threshold": r.imbalance_threshold,
                },  # fmt: skip
            ),
        )
        app = deployment.bind(self.engine_config, self.max_queued_requests, self.model_name, index_name, r.namespace)
        self._handle = serve.run(app, name=r.app_name, route_prefix=None)
        self.info = self._handle.info.remote().result()
        source = resolve_model(self.engine_config.model, self.engine_config.load_format)
        tokenizer = None
        if not self.engine_config.skip_tokenizer_init and source.path is not None:
            tokenizer = Tokenizer.from_model_path(source.path)
        self.engine = _IngressModel(tokenizer, self.info)
        log.info("%d replicas ready (app %s, routing %s)", r.num_replicas, r.app_name, r.routing)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._refresh is None and self._index is not None:
            self._refresh = loop.create_task(self._refresh_metrics())

    async def _refresh_metrics(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self.metrics.snapshot = await self._index.snapshot.remote()
            await asyncio.sleep(_METRICS_INTERVAL)

    async def refresh_metrics_now(self) -> None:
        self.metrics.snapshot = await self._index.snapshot.remote()

    def unavailable_message(self) -> str:
        if self._closing is not None:
            return self._closing
        if self._state is EngineState.LOADING:
            return "the replicas are still loading; retry shortly"
        if self._state is EngineState.STOPPED:
            return "the server is shutting down"
        return f"the replicas are not running: {self.error}"

    def block_hashes(self, token_ids: list[int]) -> list[bytes]:
        from membound.server.prefix_router import block_hash_chain

        assert self.info is not None
        return block_hash_chain(token_ids, self.info.block_size, self.info.cache_salt)

    async def add(self, subs: list[SubRequest]) -> RemoteStream:
        if self._state is not EngineState.READY or self._closing is not None:
            raise EngineDeadError(self.unavailable_message())
        # One HTTP request, one replica: its choices share the prompt. Routed on the first prompt's chain.
        hashes = self.block_hashes(subs[0].prompt_token_ids) if self.replicas.routing == "prefix" else None
        gen = self._handle.options(stream=True).generate.remote(subs, block_hashes=hashes)
        try:
            first = await gen.__anext__()
        except BaseException as e:
            with contextlib.suppress(Exception):
                gen.cancel()
            if isinstance(e, asyncio.CancelledError | KeyboardInterrupt):
                raise
            raise _replica_failed(e) from None
        kind = first[0]
        if kind == "queue_full":
            raise QueueFullError(first[1])
        if kind == "invalid":
            raise InvalidRequestError(first[1], param=first[2])
        if kind == "dead":
            raise EngineDeadError(first[1])
        stream = RemoteStream(gen, [s.request_id for s in subs], self._streams.discard)
        self._streams.add(stream)
        return stream

    def abort_all(self, message: str) -> None:
        self.closing.set()
        self._closing = message
        streams, self._streams = self._streams, set()
        for s in streams:
            s.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self._state in (EngineState.READY, EngineState.LOADING):
            self._state = EngineState.STOPPED
        if self._refresh is not None:  # maybe from another thread (the lifespan stops engines on one)
            with contextlib.suppress(RuntimeError):
                self._refresh.get_loop().call_soon_threadsafe(self._refresh.cancel)
            self._refresh = None
        if self._handle is None:
            return
        if threading.current_thread() is not threading.main_thread():
            # The app's lifespan stops engines on a worker thread; Serve's teardown from there hangs.
            # `_serve` (and a test) call stop() again on the main thread, which tears down.
            return
        import ray
        from ray import serve

        self._handle = None
        with contextlib.suppress(Exception):
            serve.delete(self.replicas.app_name)
        with contextlib.suppress(Exception):
            ray.kill(self._index)
        if self._ray_started_here:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


def run_replicas(engine_config: EngineConfig, server, replicas: ReplicaConfig) -> int:
    """`serve --replicas N`: the port bound, the replicas deployed (each loads its model), then uvicorn
    serving the same app as `run()` with the replicas behind it."""
    from membound.model.loader import resolve_model
    from membound.server.app import ServedModel, _serve

    source = resolve_model(engine_config.model, engine_config.load_format)  # a bad path: one line, before Ray
    names = server.served_model_names or (source.name,)
    engine = RemoteEngine(engine_config, replicas, server.max_queued_requests, names[0])
    return _serve([ServedModel(names, engine, engine_config.max_model_len)], server)
