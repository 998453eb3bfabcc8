"""The engine: add requests, step, get outputs. The server and `LLM` both drive this."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import types
from collections.abc import Mapping

import torch

from membound.config import EngineConfig
from membound.engine.builder import build_engine, decode_graphs
from membound.engine.core import StepTiming
from membound.engine.kv_cache import release_kv_cache, restore_kv_cache
from membound.engine.model_runner import OffloadedWeights, reload_weights
from membound.engine.model_runner import offload_weights as _offload_weights
from membound.engine.output import make_output
from membound.engine.request import Request
from membound.engine.structured import StructuredOutputs
from membound.errors import InvalidRequestError
from membound.outputs import RequestOutput
from membound.sampling_params import SamplingParams, StructuredOutputsParams

log = logging.getLogger("membound")


@dataclasses.dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of blocks in use
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens whose KV was reused
    num_cached_blocks: int  # blocks whose content is indexed (held or free)
    prompt_tokens_computed: int  # cumulative prefill tokens run through the model (recomputes included)
    generation_tokens: int  # cumulative sampled tokens
    num_steps: int = 0  # model steps launched
    num_steps_launched_ahead: int = 0  # of those, launched before the previous step's result was in
    num_threads: int | None = None  # CPU intra-op threads in force (None on a GPU)
    num_thread_changes: int = 0  # times the CPU thread count was changed for other processes' load
    # Speculative decoding (cumulative; zero when off): drafting steps, drafts, accepted drafts, and
    # accepted drafts by position in the draft.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()


class LLMEngine:
    """Requests in, outputs out. The parts come from the builder; the loop is the core."""

    def __init__(self, config: EngineConfig) -> None:
        parts = build_engine(config)
        self.config = config
        self.parts = parts
        self.device, self.dtype, self.backend = parts.device, parts.dtype, parts.backend
        self.source, self.model_config, self.model = parts.source, parts.model_config, parts.model
        self.quantization, self.tokenizer, self.eos_token_ids = parts.quantization, parts.tokenizer, parts.eos_token_ids
        self.max_model_len, self.kv_spec, self.memory = parts.max_model_len, parts.kv_spec, parts.memory
        self.allocator, self.scheduler, self.runner = parts.block_pool, parts.scheduler, parts.runner
        self.core = parts.core
        self._structured: StructuredOutputs | None = None  # made with the first constrained request
        self._structured_lock = threading.Lock()
        self.stream: torch.cuda.Stream | None = None  # `use_own_stream`: this engine's CUDA stream
        self._asleep: _Asleep | None = None  # `sleep`: what `wake` restores
        self._host_weights: OffloadedWeights | None = None  # host copies kept from the last sleep

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        grammar=None,
    ) -> None:
        """Queue a request. Raises InvalidRequestError (and queues nothing) if it is bad.
        grammar: a matcher from `compile_grammar(params.structured_outputs)` made beforehand
        (elsewhere, say on another thread); by default it is compiled here."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling params must be a SamplingParams")
        if request_id in self.core.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this engine has no tokenizer; pass prompt token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, list | tuple):
            ids = list(prompt)
        else:
            raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        self._check_prompt(ids, params)
        if params.structured_outputs is None:
            grammar = None
        elif grammar is None:
            grammar = self.compile_grammar(params.structured_outputs)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        detok = None
        if self.tokenizer is not None:
            detok = self.tokenizer.detokenizer(ids, params.skip_special_tokens)
        req = Request(
            request_id,
            text,
            ids,
            params,
            arrival_time or time.time(),
            self.eos_token_ids,
            self.max_model_len,
            detok,
            generator,
        )
        req.grammar = grammar
        self.core.add(req)

    def compile_grammar(self, spec: StructuredOutputsParams):
        """A fresh grammar matcher for `spec` (InvalidRequestError if it does not compile). Safe to call
        from other threads than the one stepping the engine; the compiler is made on first use."""
        if self.tokenizer is None:
            raise InvalidRequestError("structured outputs need a tokenizer; this engine has none")
        with self._structured_lock:
            if self._structured is None:
                self._structured = StructuredOutputs(self.tokenizer.hf, self.model_config.vocab_size)
            structured = self._structured
        return structured.matcher(spec)

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise InvalidRequestError(
                f"logit_bias has token id {max(params.logit_bias)}; token ids are integers in [0, {vocab})",
                param="logit_bias",
            )
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}; "
                "it must be shorter to leave room for at least one generated token"
            )
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and len(ids) > budget:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but max_num_batched_tokens is {budget} "
                "and chunked prefill is off; shorten the prompt or enable chunked prefill"
            )
        if params.max_tokens is not None and params.min_tokens > self.max_model_len - len(ids):
            raise InvalidRequestError(
                f"min_tokens={params.min_tokens} cannot fit: the prompt has {len(ids)} tokens "
                f"and max_model_len is {self.max_model_len}"
            )

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks at once. False if it is unknown or done."""
        return self.abort(request_id) is not None

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV blocks; its final (aborted) output, None if it is unknown or done."""
        req = self.core.abort(request_id)
        return None if req is None else make_output(req, force=True)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.core.requests)

    @property
    def requests(self) -> Mapping[str, Request]:
        """The unfinished requests by id, read-only (for inspection: tests, debugging)."""
        return types.MappingProxyType(self.core.requests)

    def request_ids(self) -> list[str]:
        """Ids of the requests not finished yet."""
        return list(self.core.requests)

    def num_output_tokens(self, request_id: str) -> int | None:
        """Tokens a running request has generated so far (None if unknown or done)."""
        req = self.core.requests.get(request_id)
        return None if req is None else req.num_output_tokens

    @property
    def async_scheduling(self) -> bool:
        """Whether a step is launched before the previous step's tokens reach the host."""
        return self.core.async_scheduling

    @async_scheduling.setter
    def async_scheduling(self, on: bool) -> None:
        self.core.async_scheduling = bool(on)  # a step in flight is still processed by the next step()

    @property
    def uses_cuda_graphs(self) -> bool:
        """Pure decode steps replay captured CUDA graphs."""
        g = self.runner.graphs
        return g is not None and bool(g.graphs)

    @property
    def step_in_flight(self) -> bool:
        """A launched step's result has not been processed yet (async scheduling)."""
        return self.core.step_in_flight

    def use_static_decode_buffers(self) -> None:
        """Run pure decode steps through the static, padded CUDA-graph buffers (captured on CUDA,
        eager elsewhere): how the CPU tests check the graph path's padding."""
        graphs = decode_graphs(self.model, self.runner.kv_caches, self.config, self.max_model_len, self.device)
        self.runner.graphs = graphs

    @property
    def last_step_timing(self) -> StepTiming:
        """Where the last `step()` spent its time."""
        return self.core.last_timing

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and report every request that made progress
        (in each request's output kind; final-only requests only when they finish).

        With async scheduling a step's result is reported by the next call: while the device
        runs step N, the host schedules and launches step N+1, and only then waits for N's
        tokens (core.py). An engine asleep wakes first."""
        if self.stream is None and self._asleep is None:
            return self.core.step()
        with self.stream_scope():
            if self._asleep is not None:
                self.wake()
            return self.core.step()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=self.allocator.usage,
            num_free_blocks=self.allocator.num_free,
            num_total_blocks=self.allocator.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
            num_cached_blocks=self.allocator.num_cached,
            prompt_tokens_computed=self.core.prompt_tokens_computed,
            generation_tokens=self.core.generation_tokens,
            num_steps=self.core.num_steps,
            num_steps_launched_ahead=self.core.num_steps_launched_ahead,
            num_threads=None if self.core.threads is None else self.core.threads.threads,
            num_thread_changes=0 if self.core.threads is None else self.core.threads.changes,
            **self._spec_stats(),
        )

    def _spec_stats(self) -> dict:
        sp = self.core.speculator
        if sp is None:
            return {}
        return dict(
            spec_num_drafts=sp.num_drafts,
            spec_num_draft_tokens=sp.num_draft_tokens,
            spec_num_accepted_tokens=sp.num_accepted_tokens,
            spec_accepted_per_pos=tuple(sp.accepted_per_pos),
        )

    def reset_prefix_cache(self) -> None:
        """Forget all cached prefixes; later requests recompute them."""
        self.allocator.reset_cache()

    # ------------------------------------------------------------------ several engines in one process

    def use_own_stream(self) -> None:
        """Run this engine's device work on a CUDA stream of its own (`stream_scope`), so engines
        sharing a GPU overlap; ordered after everything queued so far. No-op on CPU."""
        if self.device.type == "cuda" and self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def stream_scope(self) -> contextlib.AbstractContextManager:
        """The engine's stream as the current one (`use_own_stream`), else nothing."""
        return contextlib.nullcontext() if self.stream is None else torch.cuda.stream(self.stream)

    @property
    def sleeping(self) -> bool:
        return self._asleep is not None

    def sleep(self, offload_weights: bool | None = None) -> float:
        """Give this engine's memory back while it has nothing to run: the KV cache is freed (its
        content, and so the prefix cache, is forgotten), and with `offload_weights` (default: on
        CUDA) the weights move to pinned host memory and captured CUDA graphs are dropped.
        `wake()` (or the next `step()`) undoes it. Seconds taken; RuntimeError with requests still
        unfinished (they would lose their KV)."""
        if self._asleep is not None:
            return 0.0
        if self.has_unfinished_requests():
            raise RuntimeError(f"cannot sleep with {self.num_unfinished_requests} requests unfinished")
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        offload = cuda if offload_weights is None else offload_weights
        with self.stream_scope():
            self.core.drain()  # a step launched ahead: only wasted rows, but it still reads the cache
            if cuda:  # this engine's work done (other engines' streams run on)
                torch.cuda.current_stream(self.device).synchronize()
            # Every block is free once nothing runs; their cached content is about to go.
            self.allocator.reset_cache()
            graphs = self.runner.graphs
            recapture = graphs is not None and bool(graphs.graphs)  # captured over the old addresses
            if recapture:
                self.runner.graphs = None
            del graphs
            kv = release_kv_cache(self.runner.kv_caches)
            weights = None
            if offload:
                weights = _offload_weights(self.model, self.device, self._host_weights)
                self._host_weights = weights
            if cuda:
                torch.cuda.empty_cache()
        self._asleep = _Asleep(kv, weights, recapture)
        return time.perf_counter() - t0

    def wake(self) -> float:
        """Undo `sleep`: weights back on the device, a zeroed KV cache, CUDA graphs captured again.
        Seconds taken (0 if awake)."""
        asleep = self._asleep
        if asleep is None:
            return 0.0
        t0 = time.perf_counter()
        with self.stream_scope():
            if asleep.weights is not None:
                reload_weights(asleep.weights)
            restore_kv_cache(asleep.kv)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            if asleep.recapture:
                graphs = decode_graphs(self.model, self.runner.kv_caches, self.config, self.max_model_len, self.device)
                graphs.capture()
                self.runner.graphs = graphs
        self._asleep = None
        return time.perf_counter() - t0


@dataclasses.dataclass
class _Asleep:
    kv: list  # the KV storages released and their sizes (kv_cache.release_kv_cache)
    weights: OffloadedWeights | None  # None: the weights stayed on the device
    recapture: bool  # CUDA graphs were dropped and are captured again on wake
