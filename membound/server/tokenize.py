"""vLLM's tokenizer routes: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`.

Shaped as vLLM's (what lm-evaluation-harness's remote tokenizer and vLLM's clients call):

- `/tokenize` takes `{"prompt": str, "add_special_tokens": true}` or `{"messages": [...],
  "add_generation_prompt": true, "add_special_tokens": false}` (rendered by the chat template exactly
  as the chat route renders it, so `count` is the chat route's `usage.prompt_tokens`), with an optional
  served `model` and `return_token_strs`; it answers `{"count", "max_model_len", "tokens", "token_strs"}`
  (`token_strs` null unless asked).
- `/detokenize` takes `{"tokens": [ids]}` and answers `{"prompt": text}` (special tokens kept).
- `/tokenizer_info` answers the tokenizer's configuration (`Tokenizer.info`): its class, special tokens
  (text and ids), chat template, vocabulary size, and `model_max_length` as this server's `max_model_len`.

A job runs on the server's worker threads, as the completions routes' do, with the same cheap checks
first: tokenizing is what the route is for, so text longer than `max_model_len` still tokenizes, up to
`MAX_MODEL_LEN_FACTOR` x `max_model_len` tokens. Text whose cheap lower bound on tokens (its UTF-8 bytes
over the longest token's) is past that is refused before it is encoded; text that encodes to more is
refused after. Messages and token-id lists are counted against the same bound before their items are read.
"""

from __future__ import annotations

from typing import Any

from pydantic import SkipValidation, StrictBool, StrictInt, StrictStr

from membound.errors import InvalidRequestError
from membound.model.tokenizer import Tokenizer
from membound.server import tools
from membound.server.protocol import ChatCompletionRequest, ChatMessage, RequestBody, kept_texts
from membound.server.serving import ServingContext, render_conversation

MAX_MODEL_LEN_FACTOR = 8  # /tokenize and /detokenize take up to this many times max_model_len tokens


class _Body(RequestBody):
    model: str | None = None


class TokenizeRequest(_Body):
    """vLLM's TokenizeCompletionRequest and TokenizeChatRequest in one body: `prompt` or `messages`."""

    prompt: StrictStr | None = None
    messages: SkipValidation[list[ChatMessage] | None] = None  # checked on the worker thread, as chat's
    add_special_tokens: StrictBool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False
    # vLLM's chat options, accepted at their neutral value only (never ignored).
    continue_final_message: StrictBool = False
    chat_template: StrictStr | None = None
    tools: SkipValidation[list[dict[str, Any]] | None] = None  # counted as the chat route renders them


class DetokenizeRequest(_Body):
    tokens: SkipValidation[list[StrictInt]]  # lengths first, then items, on the worker thread


# ---------------------------------------------------------------------- jobs (run on the worker pool)


def tokenize_job(ctx: ServingContext, body: TokenizeRequest) -> dict:
    tok = _tokenizer(ctx, body.model)
    if body.prompt is not None and body.messages is not None:
        raise InvalidRequestError("give either prompt or messages, not both", param="messages")
    if body.messages is not None:
        ids = _tokenize_chat(ctx, tok, body)
    elif body.prompt is not None:
        _check_text_bound(ctx, [body.prompt], "prompt")
        add = True if body.add_special_tokens is None else body.add_special_tokens
        ids = tok.encode(body.prompt, "prompt", add_special_tokens=add)
        _check_count(ctx, len(ids), "prompt")
    else:
        raise InvalidRequestError("prompt (a string) or messages (a list of chat messages) is required", param="prompt")
    return {
        "count": len(ids),
        "max_model_len": ctx.max_model_len,
        "tokens": ids,
        "token_strs": tok.token_strs(ids) if body.return_token_strs else None,
    }


def detokenize_job(ctx: ServingContext, body: DetokenizeRequest) -> dict:
    tok = _tokenizer(ctx, body.model)
    ids = body.tokens
    if not isinstance(ids, list):
        raise InvalidRequestError("tokens must be a list of token ids (integers)", param="tokens")
    _check_count(ctx, len(ids), "tokens")  # before the items: a 2M-item list is refused by len()
    if not all(type(t) is int for t in ids):  # bools are not ids
        raise InvalidRequestError("tokens: token ids must be integers", param="tokens")
    n = tok.vocab_size
    bad = [t for t in ids if not 0 <= t < n]
    if bad:
        shown = ", ".join(_short(t) for t in bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise InvalidRequestError(
            f"tokens: {len(bad)} token id(s) out of range: {shown}; this tokenizer's token ids are integers "
            f"in [0, {n})",
            param="tokens",
        )
    return {"prompt": tok.decode(ids, skip_special_tokens=False)}


def tokenizer_info_job(ctx: ServingContext, body: None = None) -> dict:
    info = _tokenizer(ctx, None).info()
    # What this server takes, not the tokenizer file's placeholder (often 1e30); named as it serves the model.
    info["model_max_length"] = ctx.max_model_len
    info["name_or_path"] = ctx.model_names[0]
    return info


# ---------------------------------------------------------------------- checks


def _tokenizer(ctx: ServingContext, model: str | None) -> Tokenizer:
    if model is not None and model not in ctx.model_names:
        raise InvalidRequestError(
            f"model {model!r} is not served here; this server serves {', '.join(ctx.model_names)}", param="model"
        )
    if ctx.tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer (it was loaded without one)")
    return ctx.tokenizer


def _limit(ctx: ServingContext) -> int:
    return MAX_MODEL_LEN_FACTOR * ctx.max_model_len


def _too_long(ctx: ServingContext, has: str, field: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"this route takes at most {_limit(ctx)} tokens ({MAX_MODEL_LEN_FACTOR} x this model's maximum context "
        f"length of {ctx.max_model_len}), but the {field} has {has}",
        param=field,
    )


def _check_count(ctx: ServingContext, n: int, field: str, bound: str | None = None) -> None:
    if n > _limit(ctx):
        raise _too_long(ctx, f"at least {n} tokens ({bound})" if bound else f"{n} tokens", field)


def _check_text_bound(ctx: ServingContext, texts: list[str], field: str) -> None:
    at_least, nbytes = ctx.min_tokens(texts)
    _check_count(ctx, at_least, field, f"{nbytes} bytes of text, at most {ctx.longest_token_bytes} bytes a token")


def _tokenize_chat(ctx: ServingContext, tok: Tokenizer, body: TokenizeRequest) -> list[int]:
    if body.continue_final_message:
        raise InvalidRequestError("continue_final_message is not supported", param="continue_final_message")
    if body.chat_template is not None:
        raise InvalidRequestError(
            "chat_template is not supported: messages are rendered with the model's own template",
            param="chat_template",
        )
    raw = body.messages
    if isinstance(raw, list):
        # Cheap bounds before the messages are validated one by one, as the chat route's: every message
        # renders to at least one token, and system and user text is kept whole.
        _check_count(ctx, len(raw), "messages", f"{len(raw)} messages, each at least one")
        _check_text_bound(ctx, kept_texts(raw), "messages")
    # The chat route's validation and conversion (`_Job._messages`), so both count the same tokens.
    chat = ChatCompletionRequest.model_construct(messages=raw, tools=body.tools)
    tool_defs, _ = tools.checked_tools(chat.checked_tools(), None)
    text = render_conversation(tok, chat.checked_messages(), tool_defs, body.add_generation_prompt)
    _check_text_bound(ctx, [text], "messages")  # assistant turns too, as the template kept them
    if body.add_special_tokens:  # on top of what the template holds, as vLLM does
        ids = tok.encode(text, "messages", add_special_tokens=True)
    else:
        ids = tok.encode_rendered(text)
    _check_count(ctx, len(ids), "messages")
    return ids


def _short(t: int) -> str:
    s = str(t)
    return s if len(s) <= 20 else f"{s[:12]}... ({len(s)} digits)"
