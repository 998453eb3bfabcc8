"""Speculative decoding's verification: which drafted tokens the target model accepts.

For each speculating sequence the target scored its k drafted tokens (and the position after
them) in one pass. Draft token x at a position is accepted with probability min(1, p(x) / q(x)),
p the target's distribution there (after every sampling setting), q the draft's; the first
rejection is replaced by a draw from normalize(max(0, p - q)), and when all k are accepted a
bonus token is drawn from p at the last position. The emitted tokens are then distributed
exactly as p alone would have drawn them (Leviathan et al., 2023). An n-gram draft is one token
with certainty: q is one-hot, so x is kept with probability p(x) and a rejection redraws from p
with x removed. Greedy rows (p one-hot at the argmax) accept while the argmax equals the draft.
"""

from __future__ import annotations

import torch


def rejection_sample(
    target_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """target_probs [B, k + 1, V] (rows sum to 1), draft_ids [B, k] (int64), draft_probs [B, k, V]
    or None (one-hot drafts). Returns (tokens [B, k + 1], num_emitted [B]): row b emits
    tokens[b, :num_emitted[b]] (its accepted drafts, then the replacement or the bonus token)."""
    b, k1, _ = target_probs.shape
    k = k1 - 1
    dev = target_probs.device
    if k == 0:
        return draw(target_probs[:, 0], generator)[:, None], torch.ones(b, dtype=torch.long, device=dev)
    p = target_probs[:, :k]
    p_x = p.gather(2, draft_ids[..., None])[..., 0]  # [B, k]
    q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs.gather(2, draft_ids[..., None])[..., 0]
    u = torch.rand(b, k, generator=generator, device=dev)
    accepted = u * q_x < p_x  # u < p / q, with no division (q_x may be 0 for a draft q never makes)
    positions = torch.arange(k, device=dev).expand(b, k)
    first_reject = torch.where(accepted, k, positions).min(dim=1).values  # k: all accepted
    # One draw per sequence, at the position that emits a token of the target's own: the bonus
    # from p after the last draft, or at the first rejection from normalize(max(0, p - q)).
    rows = torch.arange(b, device=dev)
    at = target_probs[rows, first_reject]  # [B, V]
    rejected = first_reject < k
    if draft_probs is None:
        x = draft_ids.gather(1, first_reject.clamp_max(k - 1)[:, None])
        residual = at.scatter(1, x, 0.0)
    else:
        residual = (at - draft_probs[rows, first_reject.clamp_max(k - 1)]).clamp_min(0.0)
    # Where the residual is all zero, p <= q everywhere, so p == q and the draft was accepted: never used.
    keep = residual.sum(dim=1, keepdim=True) > 0
    dist = torch.where(rejected[:, None] & keep, residual, at)
    last = draw(dist, generator)
    tokens = torch.cat([draft_ids, draft_ids.new_zeros(b, 1)], dim=1)
    tokens = tokens.scatter(1, first_reject[:, None], last[:, None])
    return tokens, first_reject + 1


def draw(
    weights: torch.Tensor, generator: torch.Generator | None, generators: list[torch.Generator | None] = ()
) -> torch.Tensor:
    """One token per row of weights [B, V] (non-negative, any sum), by the inverse CDF: one uniform
    a row (a request's own generator where `generators` gives one, so its draws depend on nothing
    else). On CPU 15x cheaper than an exponential race over the vocabulary."""
    u = torch.rand(weights.shape[0], 1, generator=generator, device=weights.device, dtype=torch.float64)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, generator=g, device=weights.device, dtype=torch.float64)
    cdf = weights.double().cumsum(dim=-1)
    # side="right": the first token whose cumulative mass exceeds the point, so never a zero-weight one.
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return ids[:, 0].clamp_max(weights.shape[1] - 1)
