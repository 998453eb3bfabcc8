"""Output processing, apart from the core loop: append sampled tokens, detokenize, check stops,
and build each request's `RequestOutput` in the kind it asked for.

Everything here runs per request and is guarded per request: a detokenizer or stop check that
raises ends that request with finish_reason "error" and a message; the engine and every other
request go on. Outputs never copy what a request produced so far unless it asked for
cumulative outputs: a stream gets deltas, `generate` one final output.
"""

from __future__ import annotations

import logging

from membound.engine.request import Request
from membound.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from membound.sampling_params import RequestOutputKind

log = logging.getLogger("membound")


def append_token(req: Request, token_id: int, logprob: PositionLogprobs | None) -> None:
    """Record a sampled token, then decide whether the request is done. Raises on a failing
    detokenizer or stop check (the caller contains it)."""
    req.token_ids.append(token_id)
    if req.logprobs is not None and logprob is not None:
        req.logprobs.append(logprob)
        req.cumulative_logprob += logprob[token_id].logprob
    n = req.num_output_tokens
    # The sampler bans EOS and stop tokens until min_tokens, so these only fire past it.
    if token_id in req.eos_token_ids or token_id in req.params.stop_token_ids:
        req.finish("stop", token_id)  # the stop token's text is not part of the output
        return
    prev_len = len(req.text)
    if req.detokenizer is not None:
        req.text += req.detokenizer.step(token_id)
    if req.grammar is not None:
        if not req.grammar.accept_token(token_id):  # the mask allowed only what the grammar accepts
            raise RuntimeError(f"the grammar refused token {token_id}, which its mask allowed")
        if req.grammar.is_terminated():
            req.finish("stop")  # the structured output is complete
            return
    if req.params.stop and n >= req.params.min_tokens and _check_stop_strings(req, prev_len):
        return
    if n >= req.max_output:
        req.finish("length")


def _check_stop_strings(req: Request, prev_len: int) -> bool:
    # Only a match that ends inside this token's text is new.
    stop = req.params.stop
    start = max(0, prev_len - max(len(s) for s in stop) + 1)
    hits = [(idx, s) for s in stop if (idx := req.text.find(s, start)) != -1]
    if not hits:
        return False
    idx, s = min(hits)  # the earliest match wins, whichever stop string it is
    req.text = req.text[:idx]
    req.finish("stop", s)
    return True


def stream_text_limit(req: Request) -> int:
    """How much of `text` can be shown now: hold back a tail that might begin a stop string."""
    if req.is_finished or not req.params.stop:
        return len(req.text)
    hold = max(len(s) for s in req.params.stop) - 1
    return max(req.emitted_chars, len(req.text) - hold)


def fail(req: Request, error: Exception) -> None:
    """End a request whose output processing raised: finish_reason "error", with the message."""
    log.warning("request %s failed while processing its output: %s: %s", req.request_id, type(error).__name__, error)
    req.finish("error")
    req.error = f"processing the output failed: {type(error).__name__}: {error}"


def make_output(req: Request, force: bool = False) -> RequestOutput | None:
    """The request's output for this step in its kind; None when a final-only request is not
    done yet (unless `force`). Deltas are what changed since its last output."""
    params = req.params
    kind = params.output_kind
    finished = req.is_finished
    if kind is RequestOutputKind.FINAL_ONLY and not finished and not force:
        return None
    limit = stream_text_limit(req) if params.stop else len(req.text)
    delta_text = req.text[req.emitted_chars : limit]
    req.emitted_chars = limit
    delta_ids = req.token_ids[len(req.prompt_token_ids) + req.emitted_tokens :]
    delta_logprobs = None if req.logprobs is None else req.logprobs[req.emitted_tokens :]
    req.emitted_tokens += len(delta_ids)
    cum = None if req.logprobs is None else req.cumulative_logprob
    if kind is RequestOutputKind.DELTA:
        comp = CompletionOutput(0, delta_text, delta_ids, delta_logprobs, req.finish_reason, req.stop_reason, cum)
    else:
        # Copies, not the live lists: outputs may be read on another thread while the engine goes on.
        logprobs = None if req.logprobs is None else list(req.logprobs)
        comp = CompletionOutput(0, req.text, req.output_token_ids, logprobs, req.finish_reason, req.stop_reason, cum)
    prompt_lp = None if req.prompt_logprobs is None else list(req.prompt_logprobs)
    return RequestOutput(
        req.request_id, req.prompt, req.prompt_token_ids, [comp], finished, req.metrics,
        delta_text, delta_ids, delta_logprobs, req.error, prompt_lp,
    )  # fmt: skip
