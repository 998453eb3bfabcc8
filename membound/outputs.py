"""What the engine returns for a request."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class TokenLogprob:
    """The sampled token's logprob and the top alternatives, for one position."""

    token_id: int
    logprob: float
    top: dict[int, float]  # token id -> logprob, best first


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
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it


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
    delta_logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # set when finish_reason is "error": what went wrong
    # SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (complete once
    # the prompt has run; every output carries the whole list).
    prompt_logprobs: list[TokenLogprob | None] | None = None

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
