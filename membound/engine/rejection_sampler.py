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
    bonus = _draw(target_probs[:, k], generator)  # [B]: drawn from p after the last draft
    if k == 0:
        return bonus[:, None], torch.ones(b, dtype=torch.long, device=dev)
    p = target_probs[:, :k]
    p_x = p.gather(2, draft_ids[..., None])[..., 0]  # [B, k]
    if draft_probs is None:
        q_x = torch.ones_like(p_x)
        residual = p.scatter(2, draft_ids[..., None], 0.0)
    else:
        q_x = draft_probs.gather(2, draft_ids[..., None])[..., 0]
        residual = (p - draft_probs).clamp_min(0.0)
    u = torch.rand(b, k, generator=generator, device=dev)
    accepted = u * q_x < p_x  # u < p / q, with no division (q_x may be 0 for a draft q never makes)
    positions = torch.arange(k, device=dev).expand(b, k)
    first_reject = torch.where(accepted, k, positions).min(dim=1).values  # k: all accepted
    # A rejection redraws from the residual; where it is all zero, p <= q everywhere, so p == q and
    # the draft was accepted: that row is never used, p keeps the draw well defined.
    mass = residual.sum(dim=2, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)
    redraw = _draw(residual, generator)  # [B, k]
    replaced = redraw.gather(1, first_reject.clamp_max(k - 1)[:, None])[:, 0]
    last = torch.where(first_reject < k, replaced, bonus)
    tokens = torch.cat([draft_ids, bonus[:, None]], dim=1)
    tokens = tokens.scatter(1, first_reject[:, None], last[:, None])
    return tokens, first_reject + 1


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [..., V] (exponential race: argmax p / E, E ~ Exp(1))."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)
