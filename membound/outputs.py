"""What the engine returns for a request."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(slots=True)
class Logprob:
    """One token's log-probability at one position, under the model's raw distribution (vLLM's shape).

    A position's logprobs are a `dict[int, Logprob]` (token id -> entry): the sampled (or prompt)
    token first, then the top-k by rank; k + 1 entries when that token is not among the top k."""

    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None  # the token's text (None without a tokenizer)


PositionLogprobs = dict[int, Logprob]


def position_logprobs(
    token_id: int,
    logprob: float,
    rank: int,
    top_ids: list[int],
    top_logprobs: list[float],
    text: Callable[[int], str] | None,
) -> PositionLogprobs:
    """One position's entry: the token itself, then the top alternatives (ranks 1..k)."""
    out = {token_id: Logprob(logprob, rank, text(token_id) if text else None)}
    for r, (t, v) in enumerate(zip(top_ids, top_logprobs, strict=True), start=1):
        if t not in out:
            out[t] = Logprob(v, r, text(t) if text else None)
    return out


@dataclasses.dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclasses.dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None  # one per token in token_ids, when asked for
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    # The sum of every sampled token's logprob so far (deltas too), when logprobs were asked for.
    cumulative_logprob: float | None = None


@dataclasses.dataclass(slots=True)
class RequestOutput:
    """A request's state after a step. `outputs[0]` holds everything generated so far;
    `delta_text` / `delta_token_ids` / `delta_logprobs` hold only what this step added (for streaming)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    delta_text: str = ""
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)
    delta_logprobs: list[PositionLogprobs] | None = None
    error: str | None = None  # set when finish_reason is "error": what went wrong
    # SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (complete once
    # the prompt has run; every output carries the whole list).
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    def merged_with(self, newer: RequestOutput, delta: bool) -> RequestOutput:
        """One output saying what `self` and then `newer` said (for a reader that fell behind).
        delta: the outputs carry only what each step added (RequestOutputKind.DELTA)."""
        lp = None
        if self.delta_logprobs is not None or newer.delta_logprobs is not None:
            lp = (self.delta_logprobs or []) + (newer.delta_logprobs or [])
        comp = newer.outputs[0]
        if delta:
            old = self.outputs[0]
            comp = dataclasses.replace(
                comp, text=old.text + comp.text, token_ids=old.token_ids + comp.token_ids, logprobs=lp
            )
        return dataclasses.replace(
            newer,
            outputs=[comp],
            delta_text=self.delta_text + newer.delta_text,
            delta_token_ids=self.delta_token_ids + newer.delta_token_ids,
            delta_logprobs=lp,
        )
