"""The engine: add requests, step, get outputs. The server and `LLM` both drive this."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time

import torch

from membound.attention import get_backend
from membound.attention.base import AttentionMetadata
from membound.config import EngineConfig
from membound.engine.cuda_graphs import DecodeGraphs
from membound.engine.kv_cache import BlockAllocator, KVCacheSpec, allocate_kv_cache, blocks_needed
from membound.engine.memory import MemoryPlan, plan_memory
from membound.engine.model_runner import LaunchedStep, ModelRunner
from membound.engine.request import Request
from membound.engine.sampler import SamplingBatch, sample
from membound.engine.scheduler import ScheduledRequest, Scheduler, SchedulerConfig, SchedulerOutput
from membound.engine.transfer import to_device
from membound.engine.warmup import synthetic_metadata, warm_up_kernels
from membound.errors import ConfigError, InvalidRequestError
from membound.model.loader import load_config, load_model, open_gguf, resolve_model
from membound.model.tokenizer import Tokenizer
from membound.outputs import CompletionOutput, RequestOutput, TokenLogprob
from membound.sampling_params import SamplingParams

log = logging.getLogger("membound")

MAX_GRAPH_BATCH = 512  # larger decode batches run eagerly: launch gaps no longer matter there


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


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        source = resolve_model(config.model, config.load_format)
        t0 = time.perf_counter()
        self.backend = get_backend(config.attention_backend, self.device)
        gguf = open_gguf(source)
        mc = load_config(source, gguf)
        if self.backend.name == "triton":
            from membound.kernels.decode_attention import check_shapes

            try:
                check_shapes(
                    mc.num_heads, mc.num_kv_heads, config.block_size, self.dtype, config.kv_cache_dtype == "int8"
                )
            except ValueError as e:
                raise ConfigError(str(e)) from e
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            log.warning(
                "max_model_len %d exceeds the model's context length %d; quality past it is not guaranteed",
                self.max_model_len,
                mc.max_position_embeddings,
            )
        loaded = load_model(source, self.backend, self.dtype, self.device, self.max_model_len, config.seed, gguf)
        self.model = loaded.model
        weight_bytes = loaded.weight_bytes
        quantization = config.quantization
        if quantization == "auto":  # a GGUF file runs on its own blocks; anything else at `dtype`
            quantization = "gguf" if gguf is not None and source.kind == "gguf" else "none"
        self.quantization = quantization
        if quantization == "gguf":
            if gguf is None or source.kind != "gguf":
                raise ConfigError("quantization='gguf' keeps a GGUF file's blocks packed; the model is no GGUF file")
            from membound.quant.gguf_blocks import load_gguf_packed
            from membound.quant.linear import linear_weight_bytes

            counts = load_gguf_packed(self.model, gguf)
            weight_bytes = linear_weight_bytes(self.model)[0]
            left = counts.pop("dequantized", 0)
            log.info(
                "gguf: kept packed %s; %d quantized tensors dequantized instead; %.1f MB of weights",
                ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) or "nothing",
                left,
                weight_bytes / 1e6,
            )
        elif quantization != "none":
            from membound.quant.linear import linear_weight_bytes, quantize_model

            group, from_blocks = 128, 0
            if gguf is not None and gguf.layer_quant_types() & {"Q4_0", "Q4_1"}:
                group = 32  # what the file's own blocks use, for any matrix stored otherwise
                if quantization == "int4" and self.device.type == "cpu":
                    from membound.quant.gguf_blocks import load_int4_from_gguf

                    from_blocks = load_int4_from_gguf(self.model, gguf)
            rtn = quantize_model(self.model, quantization, group)
            weight_bytes = linear_weight_bytes(self.model)[0]
            log.info(
                "%s: %d linear layers from the GGUF's own 4-bit blocks, %d quantized by round-to-nearest",
                quantization,
                from_blocks,
                rtn,
            )
        self.model_config = mc
        self.source = source
        self.tokenizer = None
        if not config.skip_tokenizer_init and source.path is not None:
            self.tokenizer = Tokenizer.from_model_path(source.path)
        eos = set(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))

        kv_dtype = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}.get(config.kv_cache_dtype, self.dtype)
        if config.kv_cache_dtype == "fp8" and self.backend.name == "triton":
            raise ConfigError(
                "kv_cache_dtype='fp8' runs on the PyTorch attention backend only for now; "
                "use kv_cache_dtype='int8' with the Triton kernels"
            )
        self.kv_spec = KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, config.block_size, kv_dtype)
        # CUDA graphs need static shapes and no host syncs inside the forward: the Triton path has both.
        self.use_cuda_graphs = self.device.type == "cuda" and not config.enforce_eager and self.backend.name == "triton"
        activation_peak = self._profile_activation_peak()
        graph_reserve = self._profile_graph_memory() if self.use_cuda_graphs else 0
        self.memory: MemoryPlan = plan_memory(
            config, self.kv_spec, self.device, weight_bytes, activation_peak + graph_reserve, self.max_model_len
        )
        try:
            # One block more than the allocator hands out: the scratch block padded decode rows write to.
            kv_caches = allocate_kv_cache(self.kv_spec, self.memory.num_blocks + 1, self.device)
        except (torch.OutOfMemoryError, RuntimeError) as e:  # CPU allocators raise RuntimeError
            raise ConfigError(
                f"could not allocate the KV cache ({self.memory.kv_bytes / 2**30:.2f} GiB): {e}; "
                "lower kv_cache_memory_bytes / gpu_memory_utilization or max_model_len"
            ) from e
        self.allocator = BlockAllocator(self.memory.num_blocks)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                block_size=config.block_size,
                enable_chunked_prefill=config.enable_chunked_prefill,
                enable_prefix_caching=config.enable_prefix_caching,
            ),
            self.allocator,
        )
        self.runner = ModelRunner(self.model, kv_caches, config.block_size, self.device, config.seed)
        # The Triton kernels (attention, and the quantized matmuls on CUDA) compile now, not mid-serving.
        if self.backend.name == "triton" or (self.device.type == "cuda" and importlib.util.find_spec("triton")):
            self._warm_up_kernels()
        if self.use_cuda_graphs:
            self.runner.graphs = self._build_decode_graphs()
            self.runner.graphs.capture()
        self.requests: dict[str, Request] = {}
        # Overlap host and device work where there is a device to overlap with.
        auto = self.device.type == "cuda"
        self.async_scheduling = auto if config.async_scheduling is None else config.async_scheduling
        self._inflight: LaunchedStep | None = None
        self._prompt_tokens_computed = 0
        self._generation_tokens = 0
        log.info(
            "loaded %s (%s, %s) on %s in %.1fs; %s",
            source.name,
            mc.architecture,
            str(self.dtype).removeprefix("torch."),
            self.device,
            time.perf_counter() - t0,
            self.memory.describe(self.max_model_len),
        )

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. Raises InvalidRequestError (and queues nothing) if it is bad."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling params must be a SamplingParams")
        if request_id in self.requests:
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
        self.requests[request_id] = req
        self.scheduler.add(req)

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
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
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.remove(req)
        req.finish("abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and report every request that made progress.

        With async scheduling, a step's result is reported by the next call: while the device
        runs step N, the host schedules and launches step N+1 (every sequence of N decoding the
        token N sampled, read on the device), and only then waits for N's tokens, appends them,
        checks stops and builds the outputs. A sequence that N finished has its N+1 row dropped.
        Anything the look-ahead cannot do (new requests, prompts mid-prefill, preemption,
        penalties that need N's token) waits for N and is scheduled as usual.
        """
        inflight, self._inflight = self._inflight, None
        ahead = self._launch_ahead(inflight) if inflight is not None else None
        self._inflight = ahead  # set first: if finishing the previous step raises, this one is not lost
        outputs = self._finish(inflight) if inflight is not None else []
        if ahead is not None:
            return outputs
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return outputs
        now = time.time()
        for s in sched.scheduled:
            if s.request.metrics.first_scheduled_time is None:
                s.request.metrics.first_scheduled_time = now
        launched = self.runner.launch(sched)
        if self.async_scheduling:
            self._inflight = launched
            return outputs
        return outputs + self._finish(launched)

    def _launch_ahead(self, prev: LaunchedStep) -> LaunchedStep | None:
        """Launch the step after `prev` before its tokens reach the host, when that step is pure decode."""
        if not self.async_scheduling or prev.ids is None:
            return None
        sched_ = self.scheduler
        if sched_.waiting and len(sched_.running) < self.config.max_num_seqs:
            return None  # someone could be admitted: the scheduler decides
        if len(prev.sampling) != len(prev.sched.scheduled):
            return None  # a prompt is mid-prefill: the scheduler decides its next chunk
        in_prev = {id(r) for r in prev.sampling}
        if any(id(r) not in in_prev for r in sched_.running):
            return None  # a running request prev left out (budget): it must not starve
        reqs, rows = [], []
        for row, req in enumerate(prev.sampling):
            if req.is_finished:
                continue  # aborted meanwhile
            if req.params.uses_penalties:
                return None  # the penalty counts need the token on its way
            if req.num_output_tokens + 1 >= req.max_output:
                continue  # prev's token is its last
            if not self.scheduler.reserve(req, req.num_tokens + 1):
                return None  # the pool is short: the scheduler preempts
            reqs.append(req)
            rows.append(row)
        if not reqs:
            return None
        sched = SchedulerOutput([ScheduledRequest(r, 1) for r in reqs], len(reqs), [])
        return self.runner.launch(sched, (prev.ids, to_device(rows, torch.int64, self.device)))

    def _finish(self, launched: LaunchedStep) -> list[RequestOutput]:
        return self._update(launched.sched, self.runner.fetch(launched), launched.sampling)

    def _update(self, sched: SchedulerOutput, result, sampling: list[Request] | None = None) -> list[RequestOutput]:
        """Commit a step that ran and record its tokens; `sampling` are the requests behind the rows
        of `result` (by default those whose pending tokens the step completed)."""
        outputs = []
        now = time.time()
        if sampling is None:
            sampling = [s.request for s in sched.scheduled if s.samples]  # before commit moves the counts
        # A request finished (or aborted) while this step was in flight has no blocks left to commit.
        live = [s for s in sched.scheduled if not s.request.is_finished]
        self.scheduler.commit(dataclasses.replace(sched, scheduled=live))
        for row, req in enumerate(sampling):
            if req.is_finished:
                continue
            token = result.token_ids[row]
            lp = None
            if req.logprobs is not None:
                n = req.params.logprobs
                lp = TokenLogprob(
                    token,
                    result.logprobs[row],
                    dict(zip(result.top_ids[row][:n], result.top_logprobs[row][:n], strict=True)),
                )
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.append_token(token, lp)
            if req.is_finished:
                req.metrics.finished_time = now
                self.scheduler.remove(req)
                self.requests.pop(req.request_id, None)
            outputs.append(self.request_output(req))
        self._prompt_tokens_computed += sched.num_tokens - sched.num_decodes
        self._generation_tokens += len(outputs)
        return outputs

    def request_output(self, req: Request) -> RequestOutput:
        """The request's state now, with what changed since its last output as the deltas."""
        limit = req.stream_text_limit()
        delta_text = req.text[req.emitted_chars : limit]
        req.emitted_chars = limit
        delta_ids = req.output_token_ids[req.emitted_tokens :]
        # Copies, not the live list: outputs may be read on another thread while the engine goes on.
        logprobs = None if req.logprobs is None else list(req.logprobs)
        delta_logprobs = None if logprobs is None else logprobs[req.emitted_tokens :]
        req.emitted_tokens = req.num_output_tokens
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=0,
                    text=req.text,
                    token_ids=req.output_token_ids,
                    logprobs=logprobs,
                    finish_reason=req.finish_reason,
                    stop_reason=req.stop_reason,
                )
            ],
            finished=req.is_finished,
            metrics=req.metrics,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            delta_logprobs=delta_logprobs,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.allocator.usage,
            num_free_blocks=self.allocator.num_free,
            num_total_blocks=self.allocator.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
            num_cached_blocks=self.allocator.num_cached,
            prompt_tokens_computed=self._prompt_tokens_computed,
            generation_tokens=self._generation_tokens,
        )

    def reset_prefix_cache(self) -> None:
        """Forget all cached prefixes; later requests recompute them."""
        self.allocator.reset_cache()

    # ------------------------------------------------------------------ start-up

    def _build_decode_graphs(self, kv_caches=None) -> DecodeGraphs:
        """Static decode buffers over the engine's cache (or a scratch one); the last block is the pad."""
        caches = kv_caches if kv_caches is not None else self.runner.kv_caches
        pad = caches[0][0].shape[1] - 1  # [kv_heads, blocks, block_size, head_dim]
        return DecodeGraphs(
            self.model,
            caches,
            self.config.block_size,
            self.max_model_len,
            min(self.config.max_num_seqs, MAX_GRAPH_BATCH),
            pad,
            self.device,
        )

    def _profile_graph_memory(self) -> int:
        """Bytes the captured graphs will hold: the largest batch's graph, captured once on a
        scratch cache (the smaller ones share its memory pool), plus every other size's output."""
        caches = allocate_kv_cache(self.kv_spec, 2, self.device)
        graphs = self._build_decode_graphs(caches)
        nbytes = graphs.capture([graphs.max_batch])
        row = self.model_config.hidden_size * torch.empty((), dtype=self.dtype).element_size()
        nbytes += sum(graphs.ladder[:-1]) * row
        del graphs, caches
        torch.cuda.empty_cache()
        return nbytes

    def _warm_up_kernels(self) -> None:
        t0 = time.perf_counter()
        c = self.config
        warm_up_kernels(
            self.model, self.runner.kv_caches, c.block_size, c.max_num_seqs, c.max_num_batched_tokens,
            self.max_model_len, self.memory.num_blocks,
        )  # fmt: skip
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("kernels warmed up in %.1fs", time.perf_counter() - t0)

    @torch.inference_mode()
    def _profile_activation_peak(self) -> int:
        """Peak memory of the worst steps, measured (CUDA only; on CPU the KV budget is fixed).

        Two shapes: the last prefill chunk of a max_model_len prompt (largest attention mask),
        and a decode of max_num_seqs sequences all at max_model_len (largest K/V gather), each
        followed by sampling with truncation. Block tables wrap around a small scratch cache:
        the gathers cost the same memory as over a real one.
        """
        if self.device.type != "cuda":
            return 0
        dev, bs, max_len = self.device, self.config.block_size, self.max_model_len
        n = min(self.config.max_num_batched_tokens, max_len)
        scratch = blocks_needed(n, bs) + 1
        caches = allocate_kv_cache(self.kv_spec, scratch, dev)
        table_row = [i % scratch for i in range(blocks_needed(max_len, bs))]

        def meta(q_lens: list[int]) -> AttentionMetadata:
            return synthetic_metadata(q_lens, max_len, table_row, bs, dev)

        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        rows = min(self.config.max_num_seqs, n)
        for q_lens in ([n], [1] * rows):
            t = sum(q_lens)
            ids = torch.zeros(t, dtype=torch.int64, device=dev)
            positions = torch.full((t,), max_len - 1, dtype=torch.int64, device=dev)
            hidden = self.model(ids, positions, caches, meta(q_lens))
            logits = self.model.compute_logits(hidden[:rows])
            params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50)] * rows
            batch = SamplingBatch.build(
                params, [None] * rows, [[0]] * rows, [1] * rows, self.model_config.vocab_size, dev
            )
            sample(logits, batch, None)
            del hidden, logits
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del caches
        torch.cuda.empty_cache()
        return peak
