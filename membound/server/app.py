"""The HTTP front: FastAPI routes, OpenAI-shaped errors, auth, disconnect handling, `run()`.

One model (`build_app`, `run`) or several (`build_models_app`, `run_models`: one engine each, a
request routed by its `model` field; server/models.py splits the device between them)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import hmac
import logging
import math
import os
import signal
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import membound
from membound.config import EngineConfig
from membound.engine.llm_engine import LLMEngine
from membound.errors import (
    ConfigError,
    EngineDeadError,
    InvalidRequestError,
    MemboundError,
    QueueFullError,
    RequestFailedError,
)
from membound.server.async_engine import AsyncEngine, EngineState, OutputStream
from membound.server.metrics import MetricFamilies, ServerMetrics
from membound.server.models import Budget, DeviceGate, ModelNotFoundError, PlannedModel, Residency, describe_split
from membound.server.protocol import ChatCompletionRequest, CompletionRequest, error_body, validation_message
from membound.server.serving import ServingContext, chat_job, completion_job
from membound.server.tokenize import (
    DetokenizeRequest,
    TokenizeRequest,
    detokenize_job,
    tokenize_job,
    tokenizer_info_job,
)
from membound.server.tools import PARSERS, pick_parser

log = logging.getLogger("membound.server")

_JOB_THREADS = 4  # requests tokenized at once; the tokenizer releases the GIL while it encodes
_UVICORN_GRACE = 5.0  # seconds uvicorn waits past --shutdown-timeout, for the aborted requests' last chunks


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()  # the first is reported; default: the model file or folder name
    api_key: str | None = None
    max_queued_requests: int = 1024  # waiting requests beyond this get 429 (never unbounded)
    log_interval: float = 5.0  # seconds between stats lines while busy
    shutdown_timeout: float = 30.0  # SIGTERM: how long in-flight requests may finish before they are aborted
    # Bodies beyond this get 413. Room for max_model_len tokens as text or as token ids several times over
    # (128k ids are ~1 MB of JSON); the cap bounds what parsing one body costs the event loop (JSON and
    # pydantic run there: ~0.5 s for 4 MiB of the most expensive shapes, nested empty lists).
    max_request_body_bytes: int = 4 << 20
    tool_call_parser: str = "auto"  # auto: the format the chat template writes (server/tools.py)

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if (
            isinstance(self.max_queued_requests, bool)
            or not isinstance(self.max_queued_requests, int)
            or self.max_queued_requests < 1
        ):
            raise ConfigError(f"max_queued_requests must be a positive integer, got {self.max_queued_requests!r}")
        finite = all(math.isfinite(x) for x in (self.log_interval, self.shutdown_timeout))
        if not finite or self.log_interval <= 0 or self.shutdown_timeout < 0:
            raise ConfigError(
                f"log_interval must be a finite number > 0 and shutdown_timeout one >= 0, got "
                f"{self.log_interval!r} and {self.shutdown_timeout!r}"
            )
        b = self.max_request_body_bytes
        if isinstance(b, bool) or not isinstance(b, int) or b < 1024:
            raise ConfigError(
                f"max_request_body_bytes (--max-request-body-mb) must be an integer of at least 1024 bytes, got {b!r}"
            )
        if self.tool_call_parser not in ("auto", *PARSERS):
            raise ConfigError(
                f"tool_call_parser must be auto or one of {', '.join(PARSERS)}, got {self.tool_call_parser!r}"
            )
        self.served_model_names = tuple(self.served_model_names)
        if not all(isinstance(n, str) and n for n in self.served_model_names):
            raise ConfigError(f"served model names must be non-empty strings, got {self.served_model_names!r}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key must not be empty (leave it out to serve without a key)")


def _error(status: int, message: str, type_: str, param: str | None = None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# Outside /v1 but keyed too: vLLM serves its tokenizer routes at the root (/health, /version, /metrics stay open).
_KEYED_ROOT_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})


def _needs_key(path: str) -> bool:
    return path.startswith("/v1") or path.rstrip("/") in _KEYED_ROOT_PATHS


class _ApiKey:
    """401 for a /v1 or tokenizer request without 'Authorization: Bearer <key>' (/health and /metrics stay open)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _needs_key(scope["path"]):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.want):
                return await _error(
                    401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                    code="invalid_api_key",
                )(scope, receive, send)  # fmt: skip
        await self.app(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class _BodyLimit:
    """413 for a request body over the limit: by its Content-Length before any of it is read, and
    by counting a chunked body's bytes as they arrive. Pure ASGI, so it sees the raw receive."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit
        hint = f"this server's limit of {limit} bytes (--max-request-body-mb)"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            # Answered unread: uvicorn then discards the body as it arrives and keeps the connection.
            msg = f"the request body is {int(declared)} bytes, over {hint}"
            return await _error(413, msg, "invalid_request_error")(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised inside the body read: FastAPI re-raises HTTP exceptions, the handler answers.
                    raise _BodyTooLarge(f"the request body exceeds {hint}")
            return message

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _BodyTooLarge as e:  # read outside a route's body parsing: answer here if still possible
            if started:
                raise
            await _error(413, e.detail, "invalid_request_error")(scope, receive, send)


class _AbortingStreamingResponse(StreamingResponse):
    """Streams SSE; whatever way the response ends, the engine requests behind it end too."""

    def __init__(self, content, outputs: OutputStream) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._outputs = outputs

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._outputs.close()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclasses.dataclass
class ServedModel:
    """One model behind the server: its names (the first is reported) and its engine."""

    names: tuple[str, ...]
    engine: AsyncEngine
    max_model_len_hint: int | str | None = None  # /v1/models before the engine is ready
    _context: ServingContext | None = None  # made when first needed: it caches the tokenizer's bound


def build_app(
    engine: AsyncEngine, server: ServerConfig, model_names: tuple[str, ...], max_model_len_hint: int | None
) -> FastAPI:
    """The FastAPI app around an (unstarted) AsyncEngine; the app's lifespan starts and stops it."""
    return build_models_app([ServedModel(tuple(model_names), engine, max_model_len_hint)], server)


def build_models_app(models: list[ServedModel], server: ServerConfig) -> FastAPI:
    """The app around one engine per model (their names distinct). A request goes to the model its
    `model` field names (none: the first model); with several models an unknown name is a 404 naming
    them (with one, the 400 it has always been). The lifespan starts engines not started yet, and
    stops them all."""
    multi = len(models) > 1
    by_name = {n: m for m in models for n in m.names}
    if len(by_name) != sum(len(m.names) for m in models):
        raise ConfigError("two served models share a name")
    engines = [m.engine for m in models]
    first = models[0].engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for engine in engines:
            if engine.started:  # `run()` loaded the model before serving
                engine.attach(asyncio.get_running_loop())
            else:
                engine.start(asyncio.get_running_loop())
        # Jobs (the big fields' validation, tokenization, chat templates) are built here, off the loop.
        app.state.jobs = concurrent.futures.ThreadPoolExecutor(_JOB_THREADS, thread_name_prefix="membound-job")
        try:
            yield
        finally:
            app.state.jobs.shutdown(wait=False, cancel_futures=True)
            await asyncio.gather(*(asyncio.to_thread(engine.stop) for engine in engines))

    app = FastAPI(title="membound", version=membound.__version__, lifespan=lifespan)

    def pick(name: str | None) -> ServedModel:
        if name is None or not multi:
            return models[0]  # one model: the job checks the name (400), as it always has
        m = by_name.get(name)
        if m is None:
            raise ModelNotFoundError(f"model {name!r} is not served here; this server serves {', '.join(by_name)}")
        return m

    def unavailable(m: ServedModel) -> str:
        message = m.engine.unavailable_message()
        return f"model {m.names[0]}: {message}" if multi else message

    def context(m: ServedModel) -> ServingContext:
        engine = m.engine
        if engine.state is not EngineState.READY:
            raise EngineDeadError(unavailable(m))
        if m._context is None:
            e = engine.engine
            template = e.tokenizer.chat_template if e.tokenizer is not None else None
            m._context = ServingContext(
                engine, e.tokenizer, m.names, e.max_model_len, e.config.max_num_seqs,
                pick_parser(template, server.tool_call_parser),
            )  # fmt: skip
        return m._context

    async def build(make_job, body, m: ServedModel):
        job = asyncio.wrap_future(app.state.jobs.submit(make_job, context(m), body))
        closing = asyncio.ensure_future(m.engine.closing.wait())
        try:
            await asyncio.wait({job, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        if not job.done():  # past --shutdown-timeout while still tokenizing: answered now, its result dropped
            job.cancel()
            raise EngineDeadError(unavailable(m))
        return job.result()

    # ---------------------------------------------------------------- errors

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError):
        return _error(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(ModelNotFoundError)
    async def _no_model(request: Request, exc: ModelNotFoundError):
        return _error(404, str(exc), "invalid_request_error", exc.param, code="model_not_found")

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError):
        return _error(429, str(exc), "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError):
        return _error(503, str(exc), "service_unavailable", headers={"Retry-After": "5"})

    @app.exception_handler(RequestFailedError)
    async def _failed(request: Request, exc: RequestFailedError):
        return _error(500, str(exc), "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error", headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    # ---------------------------------------------------------------- middleware (pure ASGI: no task
    # group around receive, so an error raised while a body is read reaches FastAPI's handlers as is)

    if server.api_key is not None:
        app.add_middleware(_ApiKey, key=server.api_key)
    app.add_middleware(_BodyLimit, limit=server.max_request_body_bytes)  # outermost: first to see a body

    # ---------------------------------------------------------------- routes

    @app.get("/health")
    async def health():
        down = [m for m in models if m.engine.state is not EngineState.READY]
        if not down:  # (a model asleep is ready: its next request wakes it)
            return Response(status_code=200)
        return _error(503, "; ".join(unavailable(m) for m in down), "service_unavailable")

    @app.get("/version")
    async def version():
        return {"version": membound.__version__}

    @app.get("/v1/models")
    async def list_models():
        now = int(time.time())
        cards = []
        for m in models:
            ready = m.engine.state is EngineState.READY
            hint = m.max_model_len_hint if isinstance(m.max_model_len_hint, int) else None
            max_len = m.engine.engine.max_model_len if ready else hint
            cards += [
                {"id": name, "object": "model", "created": now, "owned_by": "membound", "root": m.names[0],
                 "max_model_len": max_len}
                for name in m.names
            ]  # fmt: skip
        return {"object": "list", "data": cards}

    @app.get("/metrics")
    async def metrics():
        # Several models share one registry (MetricFamilies), each sample labelled by model_name.
        data = generate_latest(first.metrics.registry) if first.metrics is not None else b""
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    async def respond(request: Request, job, m: ServedModel) -> Response:
        engine = m.engine
        try:
            outputs = await engine.add(job.subs)
        except QueueFullError:
            if engine.metrics is not None:
                engine.metrics.on_rejected("queue_full")
            raise
        if job.body.stream:
            return _AbortingStreamingResponse(job.stream(outputs), outputs)
        collect = asyncio.ensure_future(job.full_response(outputs))
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():
                collect.cancel()
            outputs.close()  # client gone (or we were cancelled): free the KV blocks now
        if not collect.done() or collect.cancelled():
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        return JSONResponse(collect.result())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        m = pick(body.model)
        return await respond(request, await build(completion_job, body, m), m)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        m = pick(body.model)
        return await respond(request, await build(chat_job, body, m), m)

    # vLLM's tokenizer routes, at the root as vLLM serves them and under /v1 too (left out of the schema).
    @app.post("/tokenize")
    @app.post("/v1/tokenize", include_in_schema=False)
    async def tokenize(body: TokenizeRequest):
        return JSONResponse(await build(tokenize_job, body, pick(body.model)))

    @app.post("/detokenize")
    @app.post("/v1/detokenize", include_in_schema=False)
    async def detokenize(body: DetokenizeRequest):
        return JSONResponse(await build(detokenize_job, body, pick(body.model)))

    @app.get("/tokenizer_info")
    @app.get("/v1/tokenizer_info", include_in_schema=False)
    async def tokenizer_info(request: Request):  # several models: ?model=NAME (default: the first)
        return JSONResponse(await build(tokenizer_info_job, None, pick(request.query_params.get("model"))))

    return app


class _Server(uvicorn.Server):
    """uvicorn, plus: the sockets bound before the model loaded, and a shutdown that ends what is
    still running past --shutdown-timeout itself (a last chunk, an error), before uvicorn would
    cancel it (a cut stream, a plain-text 500, tracebacks)."""

    def __init__(self, config: uvicorn.Config, engines: list[AsyncEngine], shutdown_timeout: float) -> None:
        super().__init__(config)
        self._engines, self._shutdown_timeout = engines, shutdown_timeout

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and sockets:  # uvicorn says where it runs only for sockets it bound itself
            for sock in sockets:
                host, port = sock.getsockname()[:2]
                where = f"[{host}]" if ":" in host else host
                logging.getLogger("uvicorn.error").info(
                    "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", where, port
                )

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self._shutdown_timeout, self._past_timeout)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _past_timeout(self) -> None:
        t = self._shutdown_timeout
        log.warning("requests still running %gs after the stop signal (--shutdown-timeout): aborting them", t)
        for engine in self._engines:
            engine.abort_all(
                f"the server is shutting down: this request was still running {t:g}s after the stop signal "
                "(--shutdown-timeout) and was aborted; retry it elsewhere or later"
            )


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Bind host:port (uvicorn listens on the sockets once the model is ready), so a port in use
    fails at once, not after loading, and no connection is accepted while the model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot bind to host {host!r}: {e.strerror}") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does: TIME_WAIT is no conflict
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:  # every address on the one port the OS picked for the first
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
    except OSError as e:
        for sock in socks:
            sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use; stop what holds it or pick another --port"
            ) from None
        raise ConfigError(f"cannot bind {host}:{port}: {e.strerror}") from None
    return socks


def run(engine_config: EngineConfig, server: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM; 0 on a clean stop (a stop while loading exits the process at once).

    In order: the model path, the port (bound, not yet listening), the model (loaded on the
    engine thread while this one waits), then uvicorn. A bad path, a port in use or a model
    that fails to load raises its MemboundError before anything listens (the CLI prints it in
    one line, exit code 2)."""
    from membound.model.loader import resolve_model

    source = resolve_model(engine_config.model, engine_config.load_format)
    model_names = server.served_model_names or (source.name,)
    engine = AsyncEngine(
        lambda: LLMEngine(engine_config),
        server.max_queued_requests,
        metrics=ServerMetrics(model_names[0]),
        log_interval=server.log_interval,
    )
    return _serve([ServedModel(model_names, engine, engine_config.max_model_len)], server)


def run_models(planned: list[PlannedModel], budget: Budget, server: ServerConfig) -> int:
    """`run` for several models (server/models.py `plan_models`): every path checked, the port bound,
    then the engines built one after another (each memory plan sees what the others hold; past
    `budget.max_loaded` the least recently used one sleeps before the next loads), the memory split
    logged, then uvicorn."""
    from membound.model.loader import resolve_model

    for p in planned:
        try:
            resolve_model(p.config.model, p.config.load_format)
        except MemboundError as e:
            raise ConfigError(f"model {p.name!r}: {e}") from None
    families = MetricFamilies()  # one registry; every sample labelled by its model_name
    cuda = planned[0].config.torch_device().type == "cuda"
    gate = DeviceGate(exclusive_steps=not cuda)
    residency = Residency(budget.max_loaded, gate) if budget.max_loaded < len(planned) else None
    models = [
        ServedModel(
            p.names,
            AsyncEngine(
                functools.partial(LLMEngine, p.config),
                server.max_queued_requests,
                metrics=ServerMetrics(p.name, families=families),
                log_interval=server.log_interval,
                name=p.name,
                residency=residency,
                gate=gate,
                own_stream=True,
            ),
            p.config.max_model_len,
        )
        for p in planned
    ]

    def before_load(i: int) -> None:
        if residency is not None and residency.num_awake() >= budget.max_loaded:
            victim = residency.least_recently_used()
            if victim is not None:
                victim.request_sleep().result()

    def after_load() -> None:
        for line in describe_split([(p, m.engine.engine) for p, m in zip(planned, models, strict=True)], budget):
            log.info("%s", line)

    return _serve(models, server, before_load, after_load)


def _serve(models: list[ServedModel], server: ServerConfig, before_load=None, after_load=None) -> int:
    engines = [m.engine for m in models]
    multi = len(models) > 1
    stop = threading.Event()  # a stop signal while loading: handled from before the port is bound
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    sockets: list[socket.socket] = []
    try:
        sockets = bind_sockets(server.host, server.port)
        for i, m in enumerate(models):  # one after another: each memory plan sees what the others hold
            engine = m.engine
            if before_load is not None:
                before_load(i)
            engine.start()
            while engine.loading and not stop.is_set():
                engine.wait_loaded(0.1)
            if stop.is_set() and engine.loading:
                log.info("stopped while the model was loading")
                logging.shutdown()
                # The engine thread is inside the load (native code) and can be neither stopped nor joined;
                # letting the interpreter tear down under it aborts the process (exit -6).
                os._exit(0)
            if engine.load_error is not None:
                e = engine.load_error
                if multi and isinstance(e, MemboundError):
                    raise ConfigError(f"model {m.names[0]!r}: {e}") from None
                raise e
            if stop.is_set():  # the signal came as the load finished: a clean stop, nothing served
                return 0
        if after_load is not None:
            after_load()
        for sock in sockets:
            try:
                # Bound before loading, listening only now. Two servers loading at once can both bind
                # (SO_REUSEADDR, neither listening yet); the second finds out here.
                sock.listen(2048)
            except OSError as e:
                where = f"port {server.port} on {server.host}"
                raise ConfigError(
                    f"{where} is already in use ({e.strerror}); stop what holds it or pick another --port"
                ) from None
        app = build_models_app(models, server)
        config = uvicorn.Config(
            app,
            log_level="info",
            timeout_graceful_shutdown=server.shutdown_timeout + _UVICORN_GRACE,
            access_log=False,
        )
        uv = _Server(config, engines, server.shutdown_timeout)
        # From here a stop signal is uvicorn's; it re-raises the signal after a graceful stop, which
        # lands here again and does nothing, so the process exits 0.
        for sig in handlers:
            signal.signal(sig, uv.handle_exit)
        uv.should_exit = stop.is_set()  # a signal since the model loaded
        uv.run(sockets=sockets)
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        for sock in sockets:
            sock.close()
        for engine in engines:
            engine.stop(timeout=0 if engine.loading else 10.0)
    return 0
