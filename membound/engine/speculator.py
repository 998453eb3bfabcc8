"""Speculative decoding's host side: drafts for the next step, and what verification accepted.

Before each step the speculator gives every decoding sequence that may speculate up to k draft
tokens (`Request.spec_token_ids`); the scheduler schedules them beside the sequence's last token,
the model scores all of them in one pass, and the rejection sampler keeps what the target would
have drawn. Only sequences with plain sampling speculate (greedy, temperature, top-k/p, min-p):
penalties, logit bias, grammars, logprobs, min_tokens and seeds make their draws per position
depend on the positions before, which the verification pass does not replay yet.

Adaptive: a sequence whose last `adaptive_window` drafting steps accepted fewer than
`min_accepted_per_step` tokens on average stops drafting (its verification rows cost more than
they give); one with no n-gram match drafts nothing and costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from membound.config import SpeculativeConfig
from membound.engine.ngram_proposer import propose_ngram
from membound.engine.request import SPECIAL, Request, Status


class NgramSpeculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.num_drafts = 0  # drafting steps (one per sequence and step that verified drafts)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * config.num_speculative_tokens  # drafts accepted at position j

    def propose(self, requests: Iterable[Request]) -> None:
        c = self.config
        for req in requests:
            req.spec_token_ids = []
            if req.spec_off or not self._may_speculate(req):
                continue
            # Room: the output's remaining length (the step also emits one token of its own) and the context.
            k = min(c.num_speculative_tokens, req.max_output - req.num_output_tokens - 1)
            k = min(k, self.max_model_len - req.num_tokens)
            if k > 0:
                req.spec_token_ids = propose_ngram(req.token_ids, k, c.prompt_lookup_min, c.prompt_lookup_max)

    @staticmethod
    def _may_speculate(req: Request) -> bool:
        # Decoding, with every token appended (steps run one at a time), and plain sampling.
        return (
            req.status is Status.RUNNING
            and req.prefilled
            and req.num_pending == 0
            and req.num_computed_tokens == req.num_tokens - 1
            and not req.sampling_flags & SPECIAL
        )

    def record(self, req: Request, drafted: int, accepted: int) -> None:
        """A verified step: `accepted` of `drafted` drafts were kept."""
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        for j in range(accepted):
            self.accepted_per_pos[j] += 1
        w = self.config.adaptive_window
        req.spec_history.append(accepted)
        del req.spec_history[:-w]
        if len(req.spec_history) == w and sum(req.spec_history) < self.config.min_accepted_per_step * w:
            req.spec_off = True

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per drafting step (accepted drafts + the one the target adds)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
