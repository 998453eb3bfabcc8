"""Speculative decoding's host side: drafts for the next step, and what verification accepted.

Before each step the speculator gives every decoding sequence that may speculate up to k draft
tokens (`Request.spec_token_ids`); the scheduler schedules them beside the sequence's last token,
the model scores all of them in one pass, and the rejection sampler keeps what the target would
have drawn. Only sequences with plain draws speculate (greedy, temperature, top-k/p, min-p; logprobs too):
penalties, logit bias, grammars, min_tokens and seeds make their draws per position depend on
the positions before or on a stream of their own, which the verification pass does not replay yet.

Adaptive, per sequence and by measured cost: the engine keeps moving averages of how long pure
decode steps take with drafts to verify and without (their ratio r: verification rows are not
free; on CPU the int4 kernel takes rows four at a time, and at batch 16 the drafts' rows add to
16). A sequence drafts while it emits more tokens per drafting step than r (1 + its accepted drafts
over its last `adaptive_window` drafting steps, or, until it has that many, everyone's lately);
below that it stops, and tries one drafting step again every PROBE_EVERY steps (PROBE_UNJUDGED
before it has a history). One with no n-gram match drafts nothing and costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from membound.config import SpeculativeConfig
from membound.engine.ngram_proposer import TokenBuffer, propose_ngram
from membound.engine.request import Request, Status

log = logging.getLogger("membound")

PROBE_EVERY = 64  # steps a sequence whose drafting does not pay waits before it tries again
PROBE_UNJUDGED = 32  # the same for a sequence with too few drafting steps of its own to judge
_EMA = 0.2  # weight of the newest step in the step-time averages


class NgramSpeculator:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        # Moving averages of pure decode steps' seconds, with drafts and without (None: none seen yet).
        self.step_drafting: float | None = None
        self.step_plain: float | None = None
        self.num_drafts = 0  # drafting steps (one per sequence and step that verified drafts)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * config.num_speculative_tokens  # drafts accepted at position j
        # Accepted drafts per drafting step lately, over all sequences (optimistic at first): what a
        # sequence too new to judge by its own drafts is expected to get.
        self.recent_accepted = float(config.num_speculative_tokens)
        self._buffers: dict[str, TokenBuffer] = {}  # each live request's tokens as a numpy array

    @property
    def cost_ratio(self) -> float:
        """What a decode step with drafts costs in decode steps without (1 until both were seen)."""
        d, p = self.step_drafting, self.step_plain
        return 1.0 if d is None or p is None or p <= 0 else d / p

    def propose(self, requests: Iterable[Request]) -> None:
        c = self.config
        ratio = self.cost_ratio
        requests = list(requests)
        if len(self._buffers) > len(requests):  # finished and aborted requests' buffers go
            live = {r.request_id for r in requests}
            self._buffers = {rid: b for rid, b in self._buffers.items() if rid in live}
        for req in requests:
            req.spec_token_ids = []
            if not self._may_speculate(req) or not self._pays(req, ratio):
                continue
            # Room: the output's remaining length (the step also emits one token of its own) and the context.
            # (max_output already keeps prompt + output within max_model_len.)
            k = min(c.num_speculative_tokens, req.max_output - req.num_output_tokens - 1)
            if k <= 0:
                continue
            try:
                buf = self._buffers.get(req.request_id)
                if buf is None:
                    buf = self._buffers[req.request_id] = TokenBuffer()
                tokens = buf.sync(req.token_ids)
                req.spec_token_ids = propose_ngram(tokens, k, c.prompt_lookup_min, c.prompt_lookup_max)
            except Exception as e:  # noqa: BLE001 - a drafting bug costs this sequence its drafts, nothing more
                log.warning("drafting for %s failed (%s: %s); it decodes without drafts", req.request_id,
                            type(e).__name__, e)  # fmt: skip

    def _pays(self, req: Request, ratio: float) -> bool:
        h, w = req.spec_history, self.config.adaptive_window
        # Judged by its own drafts once it has enough of them; until then by everyone's lately.
        accepted = sum(h) / len(h) if len(h) >= w else self.recent_accepted
        if 1 + accepted >= max(ratio, 1 + self.config.min_accepted_per_step):
            return True
        req.spec_wait += 1  # not paying: wait, then try one drafting step again
        if req.spec_wait >= (PROBE_EVERY if len(h) >= w else PROBE_UNJUDGED):
            req.spec_wait = 0
            return True
        return False

    def observe(self, drafted: bool, seconds: float) -> None:
        """A pure decode step (no prompt tokens) took `seconds`."""
        if drafted:
            old = self.step_drafting
            self.step_drafting = seconds if old is None else old + _EMA * (seconds - old)
        else:
            old = self.step_plain
            self.step_plain = seconds if old is None else old + _EMA * (seconds - old)

    @staticmethod
    def _may_speculate(req: Request) -> bool:
        # Decoding, with every token appended (steps run one at a time), and plain sampling.
        return (
            req.status is Status.RUNNING
            and req.prefilled
            and req.num_pending == 0
            and req.num_computed_tokens == req.num_tokens - 1
            and _plain_draws(req)
        )

    def record(self, req: Request, drafted: int, accepted: int) -> None:
        """A verified step: `accepted` of `drafted` drafts were kept."""
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        for j in range(accepted):
            self.accepted_per_pos[j] += 1
        self.recent_accepted += 0.1 * (accepted - self.recent_accepted)
        req.spec_history.append(accepted)
        del req.spec_history[: -self.config.adaptive_window]

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per drafting step (accepted drafts + the one the target adds)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


def _plain_draws(req: Request) -> bool:
    """Its draw at a position depends on nothing but that position's logits (and the engine's
    random stream): no penalties, bias, grammar, banned tokens or own seed. Logprobs are fine:
    every verification row reports its own."""
    p = req.params
    return not (
        p.uses_penalties or p.min_tokens or p.logit_bias or req.generator is not None or req.grammar is not None
    )
