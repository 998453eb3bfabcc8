"""OpenAI completions and chat completions on top of `AsyncEngine`.

A handler turns a validated body into token ids and `SamplingParams` (one sub-request
per prompt and choice), then either collects every output into one response or
yields SSE chunks as tokens arrive. Building a job (`completion_job`, `chat_job`) runs on
a worker thread, never on the event loop: it checks what is cheap first (the number of
sequences, token-id lengths, a bound on a text's tokens from its bytes) and tokenizes last.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from membound.errors import EngineDeadError, InvalidRequestError, MemboundError, RequestFailedError
from membound.model.tokenizer import Tokenizer
from membound.outputs import Logprob, PositionLogprobs, RequestOutput
from membound.sampling_params import RequestOutputKind, SamplingParams
from membound.server import tools
from membound.server.async_engine import AsyncEngine, OutputStream, SubRequest
from membound.server.protocol import ChatCompletionRequest, CompletionRequest, error_body, kept_texts, template_messages

_MIN_LOGPROB = -9999.0  # JSON has no -inf
log = logging.getLogger("membound.server")


@dataclasses.dataclass(frozen=True)
class ServingContext:
    """What requests are built against; one per server, made once the engine is ready."""

    engine: AsyncEngine
    tokenizer: Tokenizer | None
    model_names: tuple[str, ...]  # the first is reported in responses
    max_model_len: int
    max_num_seqs: int
    tool_parser: str = "hermes"  # how tool calls are read from outputs (server/tools.py)

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """The most text bytes one token stands for (0.1 s over a 49k vocab: once, on first use).

        Tokens' bytes add up to the text's (byte-level BPE; SentencePiece's "\u2581" is a space in
        `token_bytes`), so B bytes of text are at least B / this many tokens. A normalizer may
        shrink the text first: Unicode composition (NFC, NFKC) at most 3x (three Hangul jamo,
        9 bytes, make one syllable of 3), so with one the bound is a third. (Normalizers that
        strip text, as BERT's, come with no Llama-family model.)"""
        tok = self.tokenizer
        assert tok is not None
        longest = max(1, *(len(tok.token_bytes(i)) for i in range(tok.vocab_size)))
        return longest * (3 if tok.backend.normalizer is not None else 1)

    def min_tokens(self, texts: list[str]) -> tuple[int, int]:
        """(at least how many tokens `texts` encode to, their UTF-8 bytes), without encoding them."""
        nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        return nbytes // self.longest_token_bytes, nbytes


@dataclasses.dataclass
class _Choice:
    """What one choice has produced so far."""

    prompt_index: int
    pieces: list[str] = dataclasses.field(default_factory=list)  # joined once, at the end
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[tuple[int, PositionLogprobs]] = dataclasses.field(default_factory=list)  # (token, its entry)
    text_offset: int = 0  # completions' logprobs report each token's offset into the text
    sent_role: bool = False
    echoed: list | None = None  # echo: the prompt's (token id, its entry | None), once it ran
    tool_stream: tools.StreamParser | None = None  # tool_choice auto: content until a call begins
    sent_calls: int = 0  # a named tool choice: its call's id and name went out


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
        self.max_tokens = body.max_tokens
        if chat and body.max_completion_tokens is not None:
            self.max_tokens = body.max_completion_tokens
        self.echo = not chat and body.echo
        # echo with max_tokens 0 scores the prompt alone (lm-eval's loglikelihood): one token is
        # generated, for the engine needs one, and left out of the response.
        self.score_only = self.echo and self.max_tokens == 0
        if self.score_only:
            self.max_tokens = 1
        self.tools: list[dict] = []
        self.tool_choice: str | dict = "none"
        if chat:
            self.tools, self.tool_choice = tools.checked_tools(body.checked_tools(), body.tool_choice)
        base = self._params(self.max_tokens)  # validates ranges before any length arithmetic
        if chat:
            self._check_chat_cheaply(body.messages)  # before 100k messages are validated one by one
            raw = [body.checked_messages()]
        else:
            raw = body.checked_prompts()
        # Refused before any tokenizing: a list of 100k prompts costs a len() here.
        limit = ctx.engine.max_queued_requests
        if len(raw) * body.n > limit:
            raise InvalidRequestError(
                f"this request asks for {len(raw) * body.n} sequences (prompts x n) but at most {limit} can "
                "queue (--max-queued-requests)",
                param="n",
            )
        if not chat:  # every cheap length check before the first prompt is tokenized
            for x in raw:
                self._check_prompt_cheaply(x)
        self.prompts = [self._tokenize(x) for x in raw]
        self.prompt_texts = (
            [self._prompt_text(x, ids) for x, ids in zip(raw, self.prompts, strict=True)] if self.echo else []
        )
        self.subs: list[SubRequest] = []
        for p_idx, ids in enumerate(self.prompts):
            max_tokens = self._check_length(len(ids))
            for i in range(body.n):
                seed = None if base.seed is None else (base.seed + i) % 2**63
                params = dataclasses.replace(base, max_tokens=max_tokens, seed=seed)
                # Compiled here, on a job thread (xgrammar releases the GIL): a schema that takes
                # seconds to compile never stalls the engine thread, and a bad one is a 400 now.
                grammar = self._compile(base.structured_outputs) if base.structured_outputs else None
                self.subs.append(SubRequest(f"{self.id}-{p_idx}-{i}", ids, params, self.arrival, grammar))
        self.choices = {s.request_id: _Choice(k // body.n) for k, s in enumerate(self.subs)}
        if self.parses_tools:
            for c in self.choices.values():
                c.tool_stream = tools.StreamParser(ctx.tool_parser, self.tool_names)
        self.index = {s.request_id: k for k, s in enumerate(self.subs)}

    # ------------------------------------------------------------------ input

    def _tokenizer(self) -> Tokenizer:
        if self.ctx.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; send prompts as token ids")
        return self.ctx.tokenizer

    def _check_prompt_cheaply(self, x: str | list) -> None:
        """The length check where it needs no tokenizing: token ids are counted, text is bounded."""
        if isinstance(x, str):
            self._tokenizer()
            self._check_text_bound([x])
            return
        if not x:
            raise InvalidRequestError("a prompt must not be empty", param="prompt")
        self._check_length(len(x))
        if not all(type(t) is int for t in x):  # after the length: a 3M-item list is refused by len()
            raise InvalidRequestError("prompt: token ids must be integers", param="prompt")

    def _check_chat_cheaply(self, messages) -> None:
        """Bounds from the messages as sent (their shape is checked next): a chat template gives
        every message at least one token (its role header), and keeps system and user text whole
        (not assistant turns: some drop past reasoning)."""
        self._tokenizer()
        if not isinstance(messages, list):
            return
        self._check_length(len(messages), f"{len(messages)} messages, each at least one")
        self._check_text_bound(kept_texts(messages))

    def _check_text_bound(self, texts: list[str]) -> None:
        at_least, nbytes = self.ctx.min_tokens(texts)
        self._check_length(at_least, f"{nbytes} bytes of text, at most {self.ctx.longest_token_bytes} bytes a token")

    def _prompt_text(self, raw: str | list, ids: list[int]) -> str:
        if isinstance(raw, str):
            return raw
        return "" if self.ctx.tokenizer is None else self.ctx.tokenizer.decode(ids, skip_special_tokens=False)

    @property
    def parses_tools(self) -> bool:
        """tool_choice auto with tools: calls are read from the output text."""
        return bool(self.tools) and self.tool_choice == "auto"

    @property
    def tool_names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.tools)

    @property
    def forces_tools(self) -> bool:
        """tool_choice required or a named function: the output is the calls, by grammar."""
        return self.tool_choice == "required" or isinstance(self.tool_choice, dict)

    def _tokenize(self, x: str | list) -> list[int]:
        if self.chat:
            tok = self._tokenizer()
            text = render_conversation(tok, x, self.tools, self.body.add_generation_prompt)
            self._check_text_bound([text])  # assistant turns too, as the template kept them
            return tok.encode_rendered(text)
        if isinstance(x, list):
            return x
        ids = self._tokenizer().encode(x)
        if not ids:
            raise InvalidRequestError("a prompt must not be empty", param="prompt")
        return ids

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
            # echo + logprobs: the prompt's tokens are reported too, scored by the model.
            prompt_logprobs=logprobs if self.echo and logprobs is not None else None,
            logit_bias=b.checked_logit_bias(),
            structured_outputs=self._structured_outputs(),
            skip_special_tokens=self._skip_special_tokens(),
            output_kind=RequestOutputKind.DELTA,  # streams and full responses both add up deltas
        )

    def _compile(self, spec):
        try:
            return self.ctx.engine.engine.compile_grammar(spec)
        except InvalidRequestError as e:
            if not self.forces_tools:
                raise
            # The grammar came from the tools' parameters: say so, not a field the client never sent.
            raise InvalidRequestError(f"tools: the functions' parameters schema: {e}", param="tools") from None

    def _structured_outputs(self):
        asked = self.body.checked_structured_outputs()
        if not self.forces_tools:
            return asked
        if asked is not None:
            raise InvalidRequestError(
                "tool_choice required or a named function constrains the output already; "
                "give response_format / structured_outputs only with tool_choice auto or none",
                param="tool_choice",
            )
        return tools.forced_output(self.tools, self.tool_choice, self.body.parallel_tool_calls)

    def _skip_special_tokens(self) -> bool:
        # A call's marker may be a special token (Llama 3's <|python_tag|>, Mistral's [TOOL_CALLS]):
        # the parser must see it in the text.
        tok = self.ctx.tokenizer
        if (
            self.parses_tools
            and tok is not None
            and any(map(tok.is_special_token, tools.markers(self.ctx.tool_parser)))
        ):
            return False
        return self.body.skip_special_tokens

    def _check_length(self, n: int, bound: str | None = None) -> int:
        """max_tokens for a prompt of `n` tokens; `bound` says why, when `n` is only a lower bound."""
        limit = self.ctx.max_model_len
        has = f"at least {n} tokens ({bound})" if bound else f"{n} tokens"
        where = "messages" if self.chat else "prompt"
        if n >= limit:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens, but the prompt has {has}; "
                "shorten it to leave room for at least one generated token",
                param=where,
            )
        if bound:  # a prompt that may fit: max_tokens is checked against its exact count, once encoded
            return limit - n
        if self.max_tokens is None:
            return limit - n
        if n + self.max_tokens > limit:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens, but the prompt has {has} and "
                f"max_tokens is {self.max_tokens} ({n + self.max_tokens} in all); "
                "shorten the prompt or lower max_tokens",
                param="max_tokens",
            )
        return self.max_tokens

    # ------------------------------------------------------------------ output

    def _update(self, out: RequestOutput) -> tuple[_Choice, str, list[tuple[int, PositionLogprobs]]]:
        if out.error is not None:
            raise RequestFailedError(out.error)
        c = self.choices[out.request_id]
        comp = out.outputs[0]
        if self.echo and c.echoed is None:
            ids, lps = self.prompts[c.prompt_index], out.prompt_logprobs
            c.echoed = [(t, None if lps is None else lps[j]) for j, t in enumerate(ids)]
        c.finish_reason, c.stop_reason = comp.finish_reason, comp.stop_reason
        if self.score_only:
            if c.finish_reason == "length":
                c.stop_reason = None
            return c, "", []
        if out.delta_text:
            c.pieces.append(out.delta_text)
        c.num_tokens += len(out.delta_token_ids)
        delta_lp = list(zip(out.delta_token_ids, out.delta_logprobs or [], strict=False))
        c.logprobs.extend(delta_lp)
        return c, out.delta_text, delta_lp

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.num_tokens for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _token_bytes(self, token_id: int) -> bytes:
        tok = self.ctx.tokenizer
        return str(token_id).encode() if tok is None else tok.token_bytes(token_id)

    def _token_text(self, token_id: int, entry: Logprob | None = None) -> str:
        if entry is not None and entry.decoded_token is not None:
            return entry.decoded_token  # the engine's, from the same `Tokenizer.token_text`
        tok = self.ctx.tokenizer
        return str(token_id) if tok is None else tok.token_text(token_id)

    def _completion_logprobs(self, lps: list[tuple[int, PositionLogprobs]], c: _Choice, echoed=None) -> dict:
        """OpenAI's legacy logprobs; `echoed` (the prompt's entries) go first, the first of them null.
        top_logprobs holds the token itself and the top alternatives, as vLLM returns them."""
        items = list(echoed or []) + lps
        tokens, offsets = [], []
        for t, e in items:
            s = self._token_text(t, None if e is None else e[t])
            tokens.append(s)
            offsets.append(c.text_offset)
            c.text_offset += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [None if e is None else max(e[t].logprob, _MIN_LOGPROB) for t, e in items],
            "top_logprobs": [
                None if e is None else {self._token_text(k, x): max(x.logprob, _MIN_LOGPROB) for k, x in e.items()}
                for _, e in items
            ],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, lps: list[tuple[int, PositionLogprobs]]) -> dict:
        n = self.body.top_logprobs or 0

        def entry(token_id: int, x: Logprob) -> dict:
            s = self._token_text(token_id, x)
            return {"token": s, "logprob": max(x.logprob, _MIN_LOGPROB), "bytes": list(self._token_bytes(token_id))}

        def top(e: PositionLogprobs) -> list[dict]:
            # The sampled token comes first; it is an extra entry when it is not among the top n.
            items = list(e.items())
            items = items[1:] if len(items) > n else sorted(items, key=lambda kv: kv[1].rank)
            return [entry(k, x) for k, x in items]

        return {"content": [{**entry(t, e[t]), "top_logprobs": top(e)} for t, e in lps]}

    def _logprobs(self, lps: list[tuple[int, PositionLogprobs]], c: _Choice, echoed=None) -> dict | None:
        wanted = self.body.logprobs if self.chat else self.body.logprobs is not None
        if not wanted:
            return None
        return self._chat_logprobs(lps) if self.chat else self._completion_logprobs(lps, c, echoed)

    def _calls(self, c: _Choice, text: str) -> tuple[str | None, list[tools.ToolCall]]:
        """(content, tool calls) of a finished choice's text."""
        if self.forces_tools:
            return None, tools.forced_calls(text, self.tool_choice)
        if self.parses_tools:
            return tools.parse(self.ctx.tool_parser, text, self.tool_names)
        return text, []

    def _tool_finish_reason(self, c: _Choice, calls: list) -> str | None:
        # OpenAI: "tool_calls" when the model chose to call; a forced named function ends with "stop".
        if calls and c.finish_reason == "stop" and not isinstance(self.tool_choice, dict):
            return "tool_calls"
        return c.finish_reason

    def _message(self, c: _Choice) -> dict:
        content, calls = self._calls(c, "".join(c.pieces))
        msg: dict = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [t.as_message() for t in calls]
            c.finish_reason = self._tool_finish_reason(c, calls)
        return msg

    async def full_response(self, outputs: OutputStream) -> dict:
        async for out in outputs:
            self._update(out)
        if any(c.finish_reason == "abort" for c in self.choices.values()):
            # A client still listening is aborted only by the server (a shutdown past its timeout):
            # an error says so, where a 200 would pass the cut text off as the answer.
            raise EngineDeadError(self.ctx.engine.unavailable_message())
        choices = []
        for rid, c in self.choices.items():
            choice: dict = {"index": self.index[rid], "logprobs": self._logprobs(c.logprobs, c, c.echoed)}
            if self.chat:
                choice["message"] = self._message(c)
            else:
                prefix = self.prompt_texts[c.prompt_index] if self.echo else ""
                choice["text"] = prefix + "".join(c.pieces)
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

    def _delta(self, c: _Choice, text: str) -> dict:
        """A chat chunk's delta: content, or with tools the content before calls and the calls (each
        as its id and name, then its arguments: named choices stream them as they are generated)."""
        if isinstance(self.tool_choice, dict):  # the output is the arguments: streamed as they come
            # One entry per call in a chunk (SDKs merge entries by index across chunks, not within one).
            if not c.sent_calls:
                c.sent_calls = 1
                return {"tool_calls": [_call_entry(0, tools.ToolCall(self.tool_choice["name"], text))]}
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
        if self.forces_tools:
            if not c.finish_reason:
                return {}  # required: a JSON list of calls, sent once complete
            found = tools.forced_calls("".join(c.pieces), self.tool_choice)
            c.finish_reason = self._tool_finish_reason(c, found)
            return _calls_delta(found, 0) if found else {}
        if not self.parses_tools:
            return {"content": text} if text else {}
        ts = c.tool_stream
        assert ts is not None
        out = ts.feed(text)
        calls: list = []
        if c.finish_reason:
            rest, calls = ts.finish()
            out += rest
            c.finish_reason = self._tool_finish_reason(c, calls)
        d: dict = {}
        if out:
            d["content"] = out
        if calls:
            d.update(_calls_delta(calls, 0))
        return d

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
                if self.echo and not c.sent_role:  # the prompt first, in a chunk of its own
                    c.sent_role = True
                    first = {"index": index, "text": self.prompt_texts[c.prompt_index], "finish_reason": None}
                    first["logprobs"] = self._logprobs([], c, c.echoed)
                    yield self._chunk([first], with_usage=include_usage)
                if not delta and not c.finish_reason and not lps:
                    continue  # text held back (a possible stop string or a split character)
                choice: dict = {"index": index, "logprobs": self._logprobs(lps, c)}
                if self.chat:
                    choice["delta"] = self._delta(c, delta)
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


def render_conversation(tok: Tokenizer, messages: list, tool_defs: list[dict], add_generation_prompt: bool) -> str:
    """Checked messages (and tools) as the model's chat template writes them; a template that does
    not show tools gets them, and the conversation's tool turns, in the Hermes format."""
    native = tools.template_knows_tools(tok.chat_template)
    rendered = tools.render_messages(template_messages(messages), tool_defs, native)
    return tok.render_chat(rendered, add_generation_prompt, tools=tool_defs if native else None)


def _call_entry(index: int, call: tools.ToolCall) -> dict:
    return {"index": index, "id": call.id, "type": "function", "function": call.as_message()["function"]}


def _calls_delta(calls: list[tools.ToolCall], start: int) -> dict:
    return {"tool_calls": [_call_entry(i, call) for i, call in enumerate(calls, start)]}


def completion_job(ctx: ServingContext, body: CompletionRequest) -> _Job:
    return _Job(ctx, body, chat=False)


def chat_job(ctx: ServingContext, body: ChatCompletionRequest) -> _Job:
    return _Job(ctx, body, chat=True)
