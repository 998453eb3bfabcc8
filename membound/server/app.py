"""The HTTP front: FastAPI routes, OpenAI-shaped errors, auth, disconnect handling, `run()`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import signal
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
from membound.errors import ConfigError, EngineDeadError, InvalidRequestError, QueueFullError, RequestFailedError
from membound.server.async_engine import AsyncEngine, EngineState, OutputStream
from membound.server.metrics import ServerMetrics
from membound.server.protocol import ChatCompletionRequest, CompletionRequest, error_body
from membound.server.serving import ServingContext, chat_job, completion_job

log = logging.getLogger("membound.server")


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()  # the first is reported; default: the model file or folder name
    api_key: str | None = None
    max_queued_requests: int = 1024  # waiting requests beyond this get 429 (never unbounded)
    log_interval: float = 5.0  # seconds between stats lines while busy
    shutdown_timeout: float = 30.0  # SIGTERM: how long in-flight requests may finish before they are aborted

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if (
            isinstance(self.max_queued_requests, bool)
            or not isinstance(self.max_queued_requests, int)
            or self.max_queued_requests < 1
        ):
            raise ConfigError(f"max_queued_requests must be a positive integer, got {self.max_queued_requests!r}")
        if self.log_interval <= 0 or self.shutdown_timeout < 0:
            raise ConfigError("log_interval must be > 0 and shutdown_timeout >= 0")
        self.served_model_names = tuple(self.served_model_names)
        if not all(isinstance(n, str) and n for n in self.served_model_names):
            raise ConfigError(f"served model names must be non-empty strings, got {self.served_model_names!r}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key must not be empty (leave it out to serve without a key)")


def _error(status: int, message: str, type_: str, param: str | None = None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request body is invalid", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if e.get("type") == "model_attributes_type" and not loc:
        return "the request body must be a JSON object", None
    where = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {e.get('msg', 'invalid value')}{more}", loc[0] if loc else None


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


def build_app(
    engine: AsyncEngine, server: ServerConfig, model_names: tuple[str, ...], max_model_len_hint: int | None
) -> FastAPI:
    """The FastAPI app around an (unstarted) AsyncEngine; the app's lifespan starts and stops it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="membound", version=membound.__version__, lifespan=lifespan)

    def context() -> ServingContext:
        if engine.state is not EngineState.READY:
            raise EngineDeadError(engine.unavailable_message())
        e = engine.engine
        return ServingContext(engine, e.tokenizer, model_names, e.max_model_len, e.config.max_num_seqs)

    # ---------------------------------------------------------------- errors

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError):
        return _error(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError):
        if engine.metrics is not None:
            engine.metrics.on_rejected("queue_full")
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

    # ---------------------------------------------------------------- auth

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if server.api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                return _error(
                    401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                    code="invalid_api_key",
                )  # fmt: skip
        return await call_next(request)

    # ---------------------------------------------------------------- routes

    @app.get("/health")
    async def health():
        if engine.state is EngineState.READY:
            return Response(status_code=200)
        return _error(503, engine.unavailable_message(), "service_unavailable")

    @app.get("/version")
    async def version():
        return {"version": membound.__version__}

    @app.get("/v1/models")
    async def models():
        max_len = engine.engine.max_model_len if engine.state is EngineState.READY else max_model_len_hint
        now = int(time.time())
        cards = [
            {"id": name, "object": "model", "created": now, "owned_by": "membound", "root": model_names[0]}
            for name in model_names
        ]
        return {"object": "list", "data": [{**c, "max_model_len": max_len} for c in cards]}

    @app.get("/metrics")
    async def metrics():
        data = generate_latest(engine.metrics.registry) if engine.metrics is not None else b""
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    async def respond(request: Request, job) -> Response:
        outputs = await engine.add(job.subs)
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
        return await respond(request, completion_job(context(), body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await respond(request, chat_job(context(), body))

    return app


def run(engine_config: EngineConfig, server: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM; 0 on a clean stop, 1 if the model failed to load."""
    from membound.model.loader import resolve_model

    source = resolve_model(engine_config.model, engine_config.load_format)  # bad paths fail before binding
    model_names = server.served_model_names or (source.name,)
    metrics = ServerMetrics(model_names[0])
    engine = AsyncEngine(
        lambda: LLMEngine(engine_config),
        server.max_queued_requests,
        metrics=metrics,
        log_interval=server.log_interval,
    )
    app = build_app(engine, server, model_names, engine_config.max_model_len)
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level="info",
        timeout_graceful_shutdown=server.shutdown_timeout,
        access_log=False,
    )
    uv = uvicorn.Server(config)

    def on_dead() -> None:
        if engine.engine is None:  # it never loaded: nothing to serve
            uv.should_exit = True

    engine.on_dead = on_dead
    # uvicorn re-raises the signal after a graceful stop; a no-op handler makes SIGTERM exit 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uv.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if engine.engine is None and engine.error:
        log.error("%s", engine.error)
        return 1
    return 0
