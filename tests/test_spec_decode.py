"""Speculative decoding (issue 16): the rejection sampler is lossless, the n-gram proposer finds
what it should."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from membound.engine.ngram_proposer import propose_ngram
from membound.engine.rejection_sampler import rejection_sample

DRAWS = 100_000


def _chi2_p(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of `samples` (token ids) being drawn from `probs`; bins expected below 5 are merged."""
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return float(stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


def _dist(gen: torch.Generator, v: int, temperature: float) -> torch.Tensor:
    return (torch.randn(v, generator=gen) * 3 / temperature).softmax(-1)


@pytest.mark.parametrize(("vocab", "temperature"), [(50, 0.5), (50, 1.0), (50, 2.0), (1000, 1.0)])
@pytest.mark.parametrize("one_hot", [False, True])
def test_emitted_tokens_follow_the_targets_distribution(vocab, temperature, one_hot):
    """Each emitted position's tokens, over 100k draws of the same step, are distributed as the
    target's distribution there (the draft's only changes how many are emitted)."""
    gen = torch.Generator().manual_seed(vocab + int(temperature * 10) + one_hot)
    k = 3
    p = torch.stack([_dist(gen, vocab, temperature) for _ in range(k + 1)])  # the same for every draw
    q = torch.stack([_dist(gen, vocab, temperature) for _ in range(k)])
    if one_hot:  # an n-gram draft: fixed tokens, q one-hot; pick likely ones so positions 1+ get draws
        draft = p[:k].argmax(-1).expand(DRAWS, k)
        draft_probs = None
    else:
        draft = torch.multinomial(q, DRAWS, replacement=True, generator=gen).T  # [DRAWS, k], x ~ q
        draft_probs = q.expand(DRAWS, k, vocab)
    tokens, n = rejection_sample(p.expand(DRAWS, k + 1, vocab), draft, draft_probs, gen)
    assert ((1 <= n) & (n <= k + 1)).all()
    # Drafts before the first emitted correction are the drafts themselves.
    pos = torch.arange(k + 1)
    assert ((tokens[:, :k] == draft) | (pos[:k] >= n[:, None] - 1)).all()
    for j in range(k + 1):
        reached = n > j  # draws that emitted a token at position j
        if reached.sum() < 2000:
            continue
        assert _chi2_p(tokens[reached, j], p[j]) > 1e-3, (j, int(reached.sum()))
    # Acceptance follows theory at the first position: sum_x min(p, q), or p(x) for one-hot drafts.
    accept = (n > 1).double().mean().item()
    want = p[0, draft[0, 0]].item() if one_hot else torch.minimum(p[0], q[0]).sum().item()
    assert accept == pytest.approx(want, abs=0.01)


def _one_hot(ids: list[int], v: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), v).float()


def test_greedy_accepts_while_the_argmax_matches_and_corrects_the_first_miss():
    v = 10
    p = _one_hot([3, 5, 7, 1], v)[None]  # greedy target: one-hot at each position's argmax
    tokens, n = rejection_sample(p, torch.tensor([[3, 5, 2]]), None)
    assert n.tolist() == [3] and tokens[0, :3].tolist() == [3, 5, 7]  # third draft missed: corrected to 7
    tokens, n = rejection_sample(p, torch.tensor([[3, 5, 7]]), None)
    assert n.tolist() == [4] and tokens[0].tolist() == [3, 5, 7, 1]  # all accepted: the bonus token
    tokens, n = rejection_sample(p, torch.tensor([[4, 5, 7]]), None)
    assert n.tolist() == [1] and tokens[0, 0].item() == 3  # all rejected from the first: the target's own


def test_a_rejected_draft_is_replaced_from_the_residual():
    """p = (0.5, 0.5, 0), q = (1, 0, 0): draft 0 is kept half the time; when it is not, the
    replacement comes from max(0, p - q) normalized = token 1, never 0 again."""
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]]).expand(20_000, 2, 3)
    q = torch.tensor([[[1.0, 0.0, 0.0]]]).expand(20_000, 1, 3)
    tokens, n = rejection_sample(p, torch.zeros(20_000, 1, dtype=torch.long), q, torch.Generator().manual_seed(0))
    rejected = n == 1
    assert 0.48 < rejected.double().mean() < 0.52
    assert (tokens[rejected, 0] == 1).all() and (tokens[~rejected, 1] == 2).all()


def test_no_drafts_draws_one_token_from_the_target():
    p = torch.tensor([[[0.0, 1.0, 0.0]]])
    tokens, n = rejection_sample(p, torch.zeros(1, 0, dtype=torch.long), None)
    assert tokens.tolist() == [[1]] and n.tolist() == [1]


@pytest.mark.parametrize(
    ("tokens", "k", "want"),
    [
        ([1, 2, 3, 4, 9, 1, 2, 3], 3, [4, 9, 1]),  # "1 2 3" occurred: what followed it
        ([1, 2, 3, 4, 9, 1, 2, 3], 1, [4]),
        ([5, 6, 7, 8], 3, []),  # nothing repeats
        ([1, 2, 8, 1, 2, 9, 1, 2], 2, [9, 1]),  # the most recent occurrence wins
        ([7, 1, 2, 3, 7, 5, 2, 3], 2, [7, 5]),  # no 3-gram match: the 2-gram "2 3" after its last place
        ([4, 4, 4, 4], 3, [4]),  # a run drafts itself (only what is known)
        ([3], 2, []),
    ],
)
def test_ngram_drafts_what_followed_the_longest_recent_match(tokens, k, want):
    assert propose_ngram(tokens, k, min_n=2, max_n=3) == want


def test_ngram_min_n_one_matches_a_single_token():
    assert propose_ngram([9, 4, 5, 6, 4], 2, min_n=1, max_n=3) == [5, 6]
    assert propose_ngram([9, 4, 5, 6, 4], 2, min_n=2, max_n=3) == []
