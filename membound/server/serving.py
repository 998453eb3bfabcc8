"""OpenAI completions and chat completions on top of `AsyncEngine`.

A handler turns a validated body into token ids and `SamplingParams` (one sub-request
per prompt and choice), then either collects every output into one response or
yields SSE chunks as tokens arrive.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from membound.errors import InvalidRequestError, MemboundError, RequestFailedError
from membound.model.tokenizer import Tokenizer
from membound.outputs import RequestOutput, TokenLogprob
from membound.sampling_params import RequestOutputKind, SamplingParams
from membound.server.async_engine import AsyncEngine, OutputStream, SubRequest
from membound.server.protocol import ChatCompletionRequest, CompletionRequest, error_body

_MIN_LOGPROB = -9999.0  # JSON has no -inf
log = logging.getLogger("membound.server")


@dataclasses.dataclass(frozen=True)
class ServingContext:
    engine: AsyncEngine
    tokenizer: Tokenizer | None
    model_names: tuple[str, ...]  # the first is reported in responses
    max_model_len: int
    max_num_seqs: int


@dataclasses.dataclass
class _Choice:
    """What one choice has produced so far."""

    prompt_index: int
    pieces: list[str] = dataclasses.field(default_factory=list)  # joined once, at the end
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    text_offset: int = 0  # completions' logprobs report each token's offset into the text
    sent_role: bool = False


class _Job:
    """One HTTP request: its prompts, its sub-requests and how to report them."""

    def __init__(self, ctx: ServingContext, body: CompletionRequest | ChatCompletionRequest, chat: bool) -> None:
        self.ctx, self.body, self.chat = ctx, body, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.arrival = time.time()
        body.check_unsupported()
        if body.model is not None and body.model not in ctx.model_names:
            raise InvalidRequestError(
                f"model {body.model!r} is not served here; this server serves {', '.join(ctx.model_names)}",
                param="model",
            )
        if not 1 <= body.n <= ctx.max_num_seqs:
            raise InvalidRequestError(f"n must be an integer in [1, {ctx.max_num_seqs}], got {body.n}", param="n")
        self.prompts = self._prompts()
        self.max_tokens = body.max_tokens
        if chat and body.max_completion_tokens is not None:
            self.max_tokens = body.max_completion_tokens
        base = self._params(self.max_tokens)  # validates ranges before any length arithmetic
        self.subs: list[SubRequest] = []
        for p_idx, ids in enumerate(self.prompts):
            max_tokens = self._check_length(ids)
            for i in range(body.n):
                seed = None if base.seed is None else (base.seed + i) % 2**63
                params = dataclasses.replace(base, max_tokens=max_tokens, seed=seed)
                self.subs.append(SubRequest(f"{self.id}-{p_idx}-{i}", ids, params, self.arrival))
        limit = ctx.engine.max_queued_requests
        if len(self.subs) > limit:
            raise InvalidRequestError(
                f"this request asks for {len(self.subs)} sequences (prompts x n) but at most {limit} can queue "
                "(--max-queued-requests)",
                param="n",
            )
        self.choices = {s.request_id: _Choice(k // body.n) for k, s in enumerate(self.subs)}
        self.index = {s.request_id: k for k, s in enumerate(self.subs)}

    # ------------------------------------------------------------------ input

    def _tokenizer(self) -> Tokenizer:
        if self.ctx.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; send prompts as token ids")
        return self.ctx.tokenizer

    def _prompts(self) -> list[list[int]]:
        body = self.body
        if self.chat:
            tok = self._tokenizer()
            # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(body.messages)
            ]
            return [tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)]
        p = body.prompt
        if isinstance(p, str):
            p = [p]
        if not p:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            p = [p]
        prompts = []
        for x in p:
            ids = self._tokenizer().encode(x) if isinstance(x, str) else list(x)
            if not ids:
                raise InvalidRequestError("a prompt must not be empty", param="prompt")
            prompts.append(ids)
        return prompts

    def _params(self, max_tokens: int | None) -> SamplingParams:
        b = self.body
        if self.chat:
            logprobs = (b.top_logprobs or 0) if b.logprobs else None
        else:
            logprobs = b.logprobs

        def pick(value, default):
            return default if value is None else value

        return SamplingParams(
            temperature=pick(b.temperature, 1.0),
            top_p=pick(b.top_p, 1.0),
            top_k=pick(b.top_k, 0),
            min_p=pick(b.min_p, 0.0),
            presence_penalty=pick(b.presence_penalty, 0.0),
            frequency_penalty=pick(b.frequency_penalty, 0.0),
            repetition_penalty=pick(b.repetition_penalty, 1.0),
            seed=b.seed,
            max_tokens=max_tokens,
            min_tokens=b.min_tokens,
            stop=b.stop,
            stop_token_ids=b.stop_token_ids,
            ignore_eos=b.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=b.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA,  # streams and full responses both add up deltas
        )

    def _check_length(self, ids: list[int]) -> int:
        limit, n = self.ctx.max_model_len, len(ids)
        where = "messages" if self.chat else "prompt"
        if n >= limit:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens, but the prompt has {n} tokens; "
                "shorten it to leave room for at least one generated token",
                param=where,
            )
        if self.max_tokens is None:
            return limit - n
        if n + self.max_tokens > limit:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens, but the prompt has {n} tokens and "
                f"max_tokens is {self.max_tokens} ({n + self.max_tokens} in all); shorten the prompt or lower "
                "max_tokens",
                param="max_tokens",
            )
        return self.max_tokens

    # ------------------------------------------------------------------ output

    def _update(self, out: RequestOutput) -> tuple[_Choice, str, list[TokenLogprob]]:
        if out.error is not None:
            raise RequestFailedError(out.error)
        c = self.choices[out.request_id]
        comp = out.outputs[0]
        if out.delta_text:
            c.pieces.append(out.delta_text)
        c.num_tokens += len(out.delta_token_ids)
        c.finish_reason, c.stop_reason = comp.finish_reason, comp.stop_reason
        delta_lp = out.delta_logprobs or []
        c.logprobs.extend(delta_lp)
        return c, out.delta_text, delta_lp

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.num_tokens for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _token_bytes(self, token_id: int) -> bytes:
        tok = self.ctx.tokenizer
        return str(token_id).encode() if tok is None else tok.token_bytes(token_id)

    def _token_text(self, token_id: int) -> str:
        # A token holding part of a UTF-8 character shows as U+FFFD; its `bytes` stay exact.
        return self._token_bytes(token_id).decode("utf-8", errors="replace")

    def _completion_logprobs(self, lps: list[TokenLogprob], c: _Choice) -> dict:
        tokens, offsets = [], []
        for lp in lps:
            s = self._token_text(lp.token_id)
            tokens.append(s)
            offsets.append(c.text_offset)
            c.text_offset += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [max(lp.logprob, _MIN_LOGPROB) for lp in lps],
            "top_logprobs": [
                {self._token_text(t): max(v, _MIN_LOGPROB) for t, v in [(lp.token_id, lp.logprob), *lp.top.items()]}
                for lp in lps
            ],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            s = self._token_text(token_id)
            return {"token": s, "logprob": max(logprob, _MIN_LOGPROB), "bytes": list(self._token_bytes(token_id))}

        return {
            "content": [
                {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top.items()]}
                for lp in lps
            ]
        }

    def _logprobs(self, lps: list[TokenLogprob], c: _Choice) -> dict | None:
        wanted = self.body.logprobs if self.chat else self.body.logprobs is not None
        if not wanted:
            return None
        return self._chat_logprobs(lps) if self.chat else self._completion_logprobs(lps, c)

    async def full_response(self, outputs: OutputStream) -> dict:
        async for out in outputs:
            self._update(out)
        choices = []
        for rid, c in self.choices.items():
            choice: dict = {"index": self.index[rid], "logprobs": self._logprobs(c.logprobs, c)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": "".join(c.pieces)}
            else:
                choice["text"] = "".join(c.pieces)
            choice["finish_reason"] = c.finish_reason
            choice["stop_reason"] = c.stop_reason
            choices.append(choice)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.ctx.model_names[0],
            "choices": choices,
            "usage": self.usage(),
        }

    def _chunk(self, choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> str:
        body: dict = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.ctx.model_names[0],
            "choices": choices,
        }
        if with_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self, outputs: OutputStream) -> AsyncIterator[str]:
        """SSE chunks from an already-queued request (so queueing errors were answered before any chunk)."""
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        try:
            async for out in outputs:
                c, delta, lps = self._update(out)
                index = self.index[out.request_id]
                if self.chat and not c.sent_role:
                    c.sent_role = True
                    first = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                    yield self._chunk([{**first, "finish_reason": None}], with_usage=include_usage)
                if not delta and not c.finish_reason and not lps:
                    continue  # text held back (a possible stop string or a split character)
                choice: dict = {"index": index, "logprobs": self._logprobs(lps, c)}
                if self.chat:
                    choice["delta"] = {"content": delta} if delta else {}
                else:
                    choice["text"] = delta
                choice["finish_reason"] = c.finish_reason
                if c.finish_reason:
                    choice["stop_reason"] = c.stop_reason
                yield self._chunk([choice], with_usage=include_usage)
        except MemboundError as e:  # headers are sent: report in-band, as OpenAI does
            yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
        except Exception as e:  # noqa: BLE001 - a bug must still end the stream cleanly
            log.exception("error while streaming %s", self.id)
            yield f"data: {json.dumps(error_body(f'internal error: {type(e).__name__}: {e}', 'server_error'))}\n\n"
        else:
            if include_usage:
                yield self._chunk([], self.usage(), with_usage=True)
        yield "data: [DONE]\n\n"


def completion_job(ctx: ServingContext, body: CompletionRequest) -> _Job:
    return _Job(ctx, body, chat=False)


def chat_job(ctx: ServingContext, body: ChatCompletionRequest) -> _Job:
    return _Job(ctx, body, chat=True)
