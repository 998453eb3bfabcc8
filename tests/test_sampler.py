"""Sampling: hand-computed truncation and penalties, seeds, and the sampled distribution."""

from __future__ import annotations

import math

import pytest
import torch

from membound import LLM, SamplingParams
from membound.engine.sampler import Penalties, SamplingBatch, sample, truncate
from tests.conftest import write_tiny_config

NEG = float("-inf")


def batch(params: list[SamplingParams], vocab: int, token_ids=None, prompt_lens=None, generators=None):
    token_ids = token_ids or [[0]] * len(params)
    prompt_lens = prompt_lens or [len(t) for t in token_ids]
    return SamplingBatch.build(
        params, generators or [None] * len(params), token_ids, prompt_lens, vocab, torch.device("cpu")
    )


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = truncate(logits, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert out.tolist() == [[NEG, 4.0, 3.0, NEG]]


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # probs 0.5, 0.25, 0.125, 0.125: top_p=0.7 needs the first two (0.5 < 0.7 <= 0.75).
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]])
    out = truncate(logits, torch.tensor([4]), torch.tensor([0.7]), torch.tensor([0.0]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    # top_p=0.5 is met by the first token alone.
    out = truncate(logits, torch.tensor([4]), torch.tensor([0.5]), torch.tensor([0.0]))
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


def test_min_p_drops_tokens_below_a_share_of_the_best():
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]])
    # threshold 0.3 * 0.5 = 0.15: 0.125 falls below it.
    out = truncate(logits, torch.tensor([4]), torch.tensor([1.0]), torch.tensor([0.3]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]


def test_penalties_hand_computed():
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)]
    # prompt [0], output [1, 1, 3]
    b = batch(params, vocab=5, token_ids=[[0, 1, 1, 3]], prompt_lens=[1])
    logits = torch.tensor([[2.0, -2.0, 1.0, 4.0, 3.0]])
    got = b.penalties.apply(logits)
    # token 0: prompt only -> 2/2 = 1
    # token 1: seen, output twice -> -2*2 - 0.25*2 - 0.5 = -5
    # token 2: unseen -> 1
    # token 3: output once -> 4/2 - 0.25 - 0.5 = 1.25
    # token 4: unseen -> 3
    torch.testing.assert_close(got, torch.tensor([[1.0, -5.0, 1.0, 1.25, 3.0]]))
    assert isinstance(b.penalties, Penalties)


def test_greedy_takes_argmax_and_logprobs_are_raw():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    b = batch([SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0)], vocab=3)
    out = sample(logits, b, None)
    assert out.token_ids == [1, 0]
    lp = logits.log_softmax(-1)
    assert out.logprobs == pytest.approx([lp[0, 1].item(), lp[1, 0].item()])
    assert out.ranks == [1, 1]
    # A tie: tokens as likely as the sampled one count ahead of it (vLLM's ranks).
    tied = sample(torch.tensor([[2.0, 2.0, 0.0]]), batch([SamplingParams(temperature=0, logprobs=1)], vocab=3), None)
    assert tied.ranks == [2]
    assert out.top_ids[0] == [1, 2]
    assert out.top_logprobs[0] == pytest.approx([lp[0, 1].item(), lp[0, 2].item()])


def test_sampled_distribution_matches_softmax():
    """20,000 draws from one distribution (temperature 0.5, top-k 3): frequencies match."""
    n = 20000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0]).repeat(n, 1)
    params = [SamplingParams(temperature=0.5, top_k=3)] * n
    out = sample(logits, batch(params, vocab=5), torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=5).float()
    expected = torch.tensor([2.0, 1.5, 1.0]).div(0.5).softmax(-1)
    assert counts[3:].sum() == 0
    freq = counts[:3] / n
    # 4 standard errors of a binomial proportion.
    tol = 4 * torch.sqrt(expected * (1 - expected) / n)
    assert torch.all((freq - expected).abs() < tol), (freq, expected)


def test_seeded_rows_ignore_the_rest_of_the_batch():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3)).repeat(4, 1)
    p = SamplingParams(temperature=1.0, seed=7)

    def draw(rows: int, gen_seed: int) -> int:
        gens = [torch.Generator().manual_seed(7)] + [None] * (rows - 1)
        out = sample(logits[:rows], batch([p] * rows, 50, generators=gens), torch.Generator().manual_seed(gen_seed))
        return out.token_ids[0]

    assert len({draw(1, 0), draw(4, 1), draw(3, 99)}) == 1


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> LLM:
    path = write_tiny_config(tmp_path_factory.mktemp("tiny"))
    return LLM(str(path), load_format="dummy", skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)


def test_same_seed_same_output_in_any_batch(tiny_llm):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
    alone = tiny_llm.generate([5, 6, 7], p)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 5
    mixed = tiny_llm.generate([[1, 2], [5, 6, 7], [9] * 40, [3], [4, 4]], [others[0], p, *others[1:4]])
    assert mixed[1].outputs[0].token_ids == alone
    again = tiny_llm.generate([5, 6, 7], p)[0].outputs[0].token_ids
    assert again == alone
    different = tiny_llm.generate([5, 6, 7], SamplingParams(temperature=1.0, seed=1, max_tokens=24, ignore_eos=True))
    assert different[0].outputs[0].token_ids != alone


def test_min_tokens_bans_stop_tokens_until_reached(tiny_llm):
    free = tiny_llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    first = free[0].outputs[0].token_ids[0]
    stopped = tiny_llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first]))
    assert stopped[0].outputs[0].token_ids == [] or stopped[0].outputs[0].finish_reason == "stop"
    held = tiny_llm.generate(
        [5, 6, 7], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first], min_tokens=3)
    )
    ids = held[0].outputs[0].token_ids
    assert len(ids) >= 3 and first not in ids[:3]
