"""The engine on its own thread, and the asyncio side that talks to it.

One thread owns the `LLMEngine` and nothing else touches it: it loads the model, then
loops: take commands (add / abort) from a thread-safe queue, run one step, and hand the
step's outputs to the event loop in one `call_soon_threadsafe`. The HTTP side never
blocks on the engine, and every HTTP request shares the one continuous batch. Torch
releases the GIL inside kernels, so the front's Python work overlaps the model's
(benchmarks/cpu_serve.py measures the cost against the bare engine).

Several models in one server (server/models.py) are one `AsyncEngine` each, with a `name`, its own
CUDA stream, a `DeviceGate` around its steps and a `Residency` that may put it to sleep while it has
nothing to run, and wakes it before it steps again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from membound.engine.llm_engine import LLMEngine
from membound.errors import EngineDeadError, InvalidRequestError, MemboundError, QueueFullError
from membound.outputs import RequestOutput
from membound.sampling_params import RequestOutputKind, SamplingParams
from membound.server.metrics import ServerMetrics, StatsLogger

if TYPE_CHECKING:
    from membound.server.models import DeviceGate, Residency

log = logging.getLogger("membound.server")


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DEAD = "dead"  # failed to load, or a step raised
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True)
class SubRequest:
    """One sequence to generate: an HTTP request with n choices or several prompts has several."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    grammar: object | None = None  # structured outputs: its matcher, compiled off the engine thread


@dataclasses.dataclass
class _Add:
    subs: list[SubRequest]
    done: concurrent.futures.Future


@dataclasses.dataclass
class _Abort:
    request_ids: list[str]


@dataclasses.dataclass
class _Sleep:
    done: concurrent.futures.Future


_STOP = object()
_ABORT_ALL = object()
_NUDGE = object()  # another engine waits for a loaded slot: an idle one reconsiders now


class OutputCollector:
    """What the engine produced for a group of sub-requests and the reader has not taken yet.

    At most one pending output per request: a new one merges into it (deltas concatenated),
    so a reader that stops reading holds what was generated meanwhile, never a queue of
    per-step objects. Lives on the event loop."""

    def __init__(self, delta: dict[str, bool]) -> None:
        self._delta = delta  # request id -> its outputs are deltas
        self._pending: dict[str, RequestOutput] = {}
        self._error: BaseException | None = None
        self._event = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        prev = self._pending.get(out.request_id)
        self._pending[out.request_id] = out if prev is None else prev.merged_with(out, self._delta[out.request_id])
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    async def get(self) -> list[RequestOutput]:
        while not self._pending and self._error is None:
            self._event.clear()
            await self._event.wait()
        if self._pending:
            items, self._pending = list(self._pending.values()), {}
            return items
        raise self._error


class OutputStream:
    """Outputs of one group of sub-requests until all have finished."""

    def __init__(self, engine: AsyncEngine, ids: list[str], collector: OutputCollector) -> None:
        self._engine, self._collector = engine, collector
        self.pending = set(ids)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[RequestOutput]:
        try:
            while self.pending:
                try:
                    items = await self._collector.get()
                except EngineDeadError:
                    self.pending.clear()  # nothing left to abort (a cancelled reader still aborts below)
                    raise
                for item in items:
                    if item.finished:
                        self.pending.discard(item.request_id)
                    yield item
        finally:
            self.close()

    def close(self) -> None:
        """Abort what has not finished (no-op once everything has)."""
        if self.pending:
            ids, self.pending = list(self.pending), set()
            self._engine.forget_and_abort(ids)


class AsyncEngine:
    """Start with `start(loop)`; then `generate(...)` from coroutines on that loop."""

    def __init__(
        self,
        make_engine: Callable[[], LLMEngine],
        max_queued_requests: int,
        metrics: ServerMetrics | None = None,
        log_interval: float = 5.0,
        idle_poll: float = 0.5,
        name: str | None = None,
        residency: Residency | None = None,
        gate: DeviceGate | None = None,
        own_stream: bool = False,
    ) -> None:
        self._make_engine = make_engine
        self.max_queued_requests = max_queued_requests
        self.metrics = metrics
        self.name = name  # several models in one server: whose engine this is (logs)
        self._residency = residency
        self._gate = gate
        self._own_stream = own_stream
        self._stats_logger = StatsLogger(log_interval, prefix=f"{name}: " if name else "")
        self._idle_poll = idle_poll
        self._commands: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # orders state changes against command submission
        self._state = EngineState.LOADING
        self.error: str | None = None
        self.load_error: BaseException | None = None  # what loading raised, for a caller that reports it
        self._log_load_error = True
        self._closing: str | None = None  # set by abort_all: why new requests are refused
        self.closing = asyncio.Event()  # set by abort_all, for waiters on the event loop
        self.engine: LLMEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        # Event-loop side only: request id -> the collector its outputs go to.
        self._queues: dict[str, OutputCollector] = {}
        self.on_dead: Callable[[], None] | None = None  # called on the loop when the engine dies

    @property
    def state(self) -> EngineState:
        return self._state

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Load the model on the engine thread. Without a loop, the caller waits (`wait_loaded`),
        reports a failed load itself (`load_error`, not logged here) and `attach`es a loop to serve."""
        self._loop = loop
        self._log_load_error = loop is not None
        self._thread = threading.Thread(target=self._run, name="membound-engine", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop outputs go to; before the first `add` (nothing is delivered until then)."""
        self._loop = loop

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading finished (either way); True if the engine is ready."""
        self._ready.wait(timeout)
        return self._state is EngineState.READY

    @property
    def loading(self) -> bool:
        return not self._ready.is_set()

    def abort_all(self, message: str) -> None:
        """Refuse new requests with `message` and abort every one in flight: each waiter gets its
        final output (finish_reason "abort") at the next engine iteration. For a shutdown past its
        timeout, so every stream ends with a last chunk instead of being cut. Call on the event loop."""
        self.closing.set()
        with self._lock:
            self._closing = message
            if self._state is EngineState.READY:
                self._commands.put(_ABORT_ALL)

    def nudge(self) -> None:
        """Wake the engine thread from its idle wait (to reconsider sleeping). Any thread."""
        self._commands.put(_NUDGE)

    def request_sleep(self) -> concurrent.futures.Future:
        """Put the (idle) engine to sleep on its thread; the future is done once it is asleep. Any thread."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._state is not EngineState.READY or self._residency is None:
                done.set_exception(EngineDeadError(self.unavailable_message()))
                return done
            self._commands.put(_Sleep(done))
        return done

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left, stop the thread. Safe to call more than once."""
        with self._lock:
            if self._state in (EngineState.READY, EngineState.LOADING):
                self._state = EngineState.STOPPED
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ event-loop side

    async def add(self, subs: list[SubRequest]) -> OutputStream:
        """Queue `subs` (all or none) and return the stream of their outputs.

        Raises QueueFullError / InvalidRequestError / EngineDeadError with nothing queued.
        The caller must iterate the stream to the end or `close()` it: closing aborts
        whatever has not finished, which frees its KV blocks.
        """
        q = OutputCollector({s.request_id: s.params.output_kind is RequestOutputKind.DELTA for s in subs})
        ids = [s.request_id for s in subs]
        for rid in ids:
            self._queues[rid] = q
        done: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._submit(_Add(subs, done))
            await asyncio.wrap_future(done)
        except BaseException as e:
            self._forget(ids)
            if not isinstance(e, QueueFullError | InvalidRequestError | EngineDeadError):
                self._abort_ids(ids)  # cancelled, maybe after the engine queued them: nothing stays behind
            raise
        return OutputStream(self, ids, q)

    def _submit(self, command: _Add | _Abort) -> None:
        with self._lock:
            if self._state is not EngineState.READY or self._closing is not None:
                raise EngineDeadError(self.unavailable_message())
            self._commands.put(command)

    def forget_and_abort(self, ids: list[str]) -> None:
        """Stop delivering outputs for these sub-requests and abort what has not finished."""
        self._forget(ids)
        self._abort_ids(ids)

    def _abort_ids(self, ids: list[str]) -> None:
        with self._lock:
            if self._state is EngineState.READY:
                self._commands.put(_Abort(ids))

    def _forget(self, ids: list[str]) -> None:
        for rid in ids:
            self._queues.pop(rid, None)

    def unavailable_message(self) -> str:
        if self._closing is not None:
            return self._closing
        if self._state is EngineState.LOADING:
            return "the model is still loading; retry shortly"
        if self._state is EngineState.STOPPED:
            return "the server is shutting down"
        return f"the engine is not running: {self.error}"

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put(out)
                if out.finished:
                    del self._queues[out.request_id]

    def _fail_all(self, message: str) -> None:
        queues, self._queues = self._queues, {}
        for q in {id(q): q for q in queues.values()}.values():
            q.fail(EngineDeadError(message))
        if self.on_dead is not None:
            self.on_dead()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            engine = self._gate.run(self._make_engine) if self._gate is not None else self._make_engine()
            self.engine = engine
        except BaseException as e:  # noqa: BLE001 - any load failure must reach /health and the log
            self.load_error = e
            if self._log_load_error:  # else the caller reports it (`serve`: one line, exit code 2)
                if isinstance(e, MemboundError):  # what is wrong with the model: one line says it
                    log.error("loading the model failed: %s", e)
                else:
                    log.exception("loading the model failed")
            self._die(f"loading the model failed: {e}")
            self._ready.set()
            return
        with self._lock:
            if self._state is EngineState.LOADING:
                self._state = EngineState.READY
        if self._own_stream:
            engine.use_own_stream()
        if self._residency is not None:
            self._residency.loaded(self)
        self._ready.set()
        log.info("engine ready" if self.name is None else f"engine ready: model {self.name}")
        try:
            with engine.stream_scope():
                self._loop_forever(engine)
        except BaseException as e:  # noqa: BLE001 - a bug in a step: fail requests loudly, don't hang them
            log.exception("the engine loop failed")
            self._die(f"{type(e).__name__}: {e}")
            return
        finally:
            if self._residency is not None:
                self._residency.remove(self)
        # Stopped: abort everything still in flight so every waiter gets its final output.
        with engine.stream_scope():
            self._drain_commands(engine, block=False)
            for rid in engine.request_ids():
                self._abort(engine, rid)

    def _loop_forever(self, engine: LLMEngine) -> None:
        while True:
            if not self._drain_commands(engine, block=not engine.has_unfinished_requests()):
                return
            if engine.has_unfinished_requests():
                # Asleep and no loaded slot free: ensure_awake waited a moment; commands (aborts) apply meanwhile.
                if self._residency is None or self._residency.ensure_awake(self, engine):
                    self._step(engine)
            elif self._residency is not None and self._commands.empty():
                self._residency.idle(self, engine)  # may sleep now: another model waits for its slot
            self._after_step(engine)

    def _step(self, engine: LLMEngine) -> None:
        outputs = self._gate.run(engine.step) if self._gate is not None else engine.step()
        now = time.time()
        if outputs:
            if self.metrics is not None:
                self.metrics.on_outputs(outputs, now)
            self._to_loop(self._deliver, outputs)

    def _after_step(self, engine: LLMEngine) -> None:
        stats = engine.stats()
        if self.metrics is not None:
            self.metrics.on_stats(stats)
        self._stats_logger.maybe_log(stats)

    def _drain_commands(self, engine: LLMEngine, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        try:
            cmd = self._commands.get(timeout=self._idle_poll) if block else self._commands.get_nowait()
        except queue.Empty:
            return self._state is EngineState.READY
        while True:
            if cmd is _STOP:
                return False
            if cmd is _ABORT_ALL:
                for rid in engine.request_ids():
                    self._abort(engine, rid)
            elif isinstance(cmd, _Add):
                self._add(engine, cmd)
            elif isinstance(cmd, _Sleep):
                self._sleep(engine, cmd)
            elif cmd is _NUDGE:
                pass  # back in the loop, an idle engine reconsiders sleeping
            else:
                for rid in cmd.request_ids:
                    self._abort(engine, rid)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, engine: LLMEngine, cmd: _Add) -> None:
        if not cmd.done.set_running_or_notify_cancel():
            return
        waiting = engine.stats().num_waiting
        if waiting + len(cmd.subs) > self.max_queued_requests:
            cmd.done.set_exception(
                QueueFullError(
                    f"the server is at capacity: {waiting} requests are waiting "
                    f"(--max-queued-requests {self.max_queued_requests}); retry later"
                )
            )
            return
        added = []
        try:
            for s in cmd.subs:
                engine.add_request(s.request_id, s.prompt_token_ids, s.params, s.arrival_time, grammar=s.grammar)
                added.append(s.request_id)
        except BaseException as e:  # noqa: BLE001 - the error goes back to the HTTP request that sent it
            for rid in added:
                engine.abort_request(rid)
            # Bad input is the client's (400); anything else is ours and surfaces as a 500.
            cmd.done.set_exception(InvalidRequestError(str(e)) if isinstance(e, ValueError) else e)
            return
        cmd.done.set_result(None)

    def _sleep(self, engine: LLMEngine, cmd: _Sleep) -> None:
        if not cmd.done.set_running_or_notify_cancel():
            return
        try:
            assert self._residency is not None
            self._residency.sleep_now(self, engine)
        except BaseException as e:  # noqa: BLE001 - the caller decides what a failed sleep means
            cmd.done.set_exception(e)
            return
        cmd.done.set_result(None)

    def _abort(self, engine: LLMEngine, request_id: str) -> None:
        out = engine.abort(request_id)  # the final, aborted state, for a waiter still listening
        if out is not None:
            if self.metrics is not None:
                self.metrics.on_abort(request_id, out.metrics, time.time())
            self._to_loop(self._deliver, [out])

    def _die(self, message: str) -> None:
        with self._lock:
            self._state = EngineState.DEAD
            self.error = message
        # Adds that slipped in before the state changed would otherwise wait forever.
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add | _Sleep) and cmd.done.set_running_or_notify_cancel():
                cmd.done.set_exception(EngineDeadError(message))
        self._to_loop(self._fail_all, message)

    def _to_loop(self, fn: Callable, arg) -> None:
        if self._loop is None:  # no loop yet (loading failed before serving): nobody is waiting
            return
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the event loop has closed: nobody is left to tell
            pass
