"""A request's state inside the engine: its tokens, its KV blocks, its output so far.

State only: the scheduler moves it through its life, the input batch gives it a slot, the
output processor appends tokens, detokenizes and decides when it stops.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch

from membound.engine.kv_cache import extend_block_hashes
from membound.model.tokenizer import Detokenizer
from membound.outputs import PositionLogprobs, RequestMetrics
from membound.sampling_params import SamplingParams

# Request.sampling_flags bits: what a sampling batch must do for the request.
SAMPLES = 1  # temperature > 0
TRUNCATES = 2  # top-k / top-p / min-p on a sampled draw
SPECIAL = 4  # penalties, min_tokens, logprobs or a seed: handled row by row


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    # Slots: attribute reads and writes are the engine loop's inner loop (256 requests a step).
    __slots__ = (
        "request_id",
        "prompt",
        "prompt_token_ids",
        "params",
        "token_ids",
        "num_computed_tokens",
        "num_pending",
        "slot",
        "in_running",
        "prefilled",
        "block_ids",
        "block_hashes",
        "num_cached_blocks",
        "status",
        "metrics",
        "eos_token_ids",
        "max_output",
        "detokenizer",
        "generator",
        "text",
        "emitted_chars",
        "emitted_tokens",
        "logprobs",
        "cumulative_logprob",
        "prompt_logprobs",
        "finish_reason",
        "stop_reason",
        "error",
        "num_preemptions",
        "sampling_flags",
        "grammar",
        "spec_token_ids",
        "spec_history",
        "spec_wait",
    )

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        detokenizer: Detokenizer | None,
        generator: torch.Generator | None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.token_ids = list(prompt_token_ids)  # prompt + output, what the KV cache holds
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache or written by a launched step
        self.num_pending = 0  # tokens sampled by launched steps, not yet appended
        self.slot: int | None = None  # row of the persistent input batch while running
        self.in_running = False  # in the scheduler's running list (the scheduler keeps this)
        self.prefilled = False  # its prompt (or recompute) is done: it decodes one token a step
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # chained content hashes of full blocks of token_ids
        self.num_cached_blocks = 0  # leading blocks already registered in the prefix cache
        self.status = Status.WAITING
        self.metrics = RequestMetrics(arrival_time)
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        limit = max_model_len - len(prompt_token_ids)
        self.max_output = limit if params.max_tokens is None else min(params.max_tokens, limit)
        self.detokenizer = detokenizer
        self.generator = generator  # per-request RNG when a seed is given
        self.text = ""
        self.emitted_chars = 0  # how much of `text` step outputs have shown
        self.emitted_tokens = 0  # how many output tokens step outputs have shown
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0  # of the sampled tokens, with logprobs
        # Entry j: prompt token j's logprob; the first token has none (nothing precedes it).
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None  # why it ended, when finish_reason is "error"
        self.num_preemptions = 0
        self.sampling_flags = 0  # set by the input batch, which knows the vocabulary
        self.grammar = None  # structured outputs: the xgrammar matcher the engine gave it
        # Speculative decoding: drafts the next step verifies (set by the speculator each step), the
        # accepted count of its recent drafting steps.
        self.spec_token_ids: list[int] = []
        self.spec_history: list[int] = []
        self.spec_wait = 0  # steps since drafting was found not to pay for it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def full_block_hashes(self, block_size: int, salt: bytes) -> list[bytes]:
        """Hashes of every full block of `token_ids`, extended as tokens arrive (tokens never change)."""
        return extend_block_hashes(self.block_hashes, self.token_ids, block_size, salt)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def token_text(self) -> Callable[[int], str] | None:
        """A token's text for its logprobs' `decoded_token` (None without a tokenizer)."""
        return None if self.detokenizer is None else self.detokenizer.token_text

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet (so every prompt row must run)."""
        lp = self.prompt_logprobs
        return lp is not None and len(lp) < len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def set_sampling_flags(self, vocab_size: int) -> None:
        p = self.params
        truncates = p.top_p < 1 or p.min_p > 0 or 0 < p.top_k < vocab_size
        self.sampling_flags = (SAMPLES | (TRUNCATES if truncates else 0)) if p.temperature > 0 else 0
        special = p.logprobs is not None or self.generator is not None or p.logit_bias or self.grammar is not None
        if p.uses_penalties or p.min_tokens or special:
            self.sampling_flags |= SPECIAL

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
