"""Async (overlapped) scheduling: step N+1 launched before step N's tokens reach the host.

On CPU nothing actually overlaps, but the whole mechanism runs: the look-ahead step reads the
previous step's sampled ids on the device, rows of sequences that just finished are dropped,
and everything else waits for the previous step. Outputs must not change at all.
"""

from __future__ import annotations

import pytest
import torch

from membound import LLM, SamplingParams
from tests.conftest import tiny_llm

pytestmark = [pytest.mark.gpu, pytest.mark.cpu]  # in the GPU session too, where it really overlaps


def _decode_heavy():
    """No penalties, all admitted at once, finishing one by one (by length and by stop token) in
    the middle of the batch: the look-ahead runs nearly every step and drops rows."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (5 + 3 * i,), generator=g).tolist() for i in range(6)]
    params = [
        SamplingParams(temperature=0, max_tokens=[30, 8, 22, 12, 40, 5][i], ignore_eos=True, logprobs=1)
        if i % 2
        else SamplingParams(temperature=0.9, seed=i, max_tokens=[30, 8, 22, 12, 40, 5][i], stop_token_ids=[9, 17])
        for i in range(6)
    ]
    return prompts, params


def _workload(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts, params = [], []
    for i in range(10):
        n = int(torch.randint(3, 50, (1,), generator=g))
        prompts.append(torch.randint(1, 128, (n,), generator=g).tolist())
        kind = i % 5
        if kind == 0:
            p = SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True, logprobs=2)
        elif kind == 1:
            p = SamplingParams(temperature=0.9, top_k=20, seed=i, max_tokens=25, ignore_eos=True, logprobs=1)
        elif kind == 2:  # stops on a frequent token, usually long before max_tokens
            p = SamplingParams(temperature=1.0, seed=i, max_tokens=40, stop_token_ids=[5, 7, 11, 13])
        elif kind == 3:  # penalties need each step's token: these steps wait for the previous one
            p = SamplingParams(temperature=0.7, seed=i, max_tokens=12, presence_penalty=0.5, ignore_eos=True)
        else:
            p = SamplingParams(temperature=0.8, seed=i, max_tokens=15, min_tokens=10, stop_token_ids=[5, 7, 11])
        params.append(p)
    return prompts, params


def _run(llm: LLM, prompts, params, late: int = 3):
    """Submit all but the last `late` requests, then the rest while the others decode."""
    eng, outs = llm.engine, {}
    for i in range(len(prompts) - late):
        eng.add_request(str(i), prompts[i], params[i])
    steps = 0
    while eng.has_unfinished_requests():
        steps += 1
        if steps == 4:
            for i in range(len(prompts) - late, len(prompts)):
                eng.add_request(str(i), prompts[i], params[i])
        for out in eng.step():
            if out.finished:
                outs[out.request_id] = out
    stats = eng.stats()
    return [outs[str(i)] for i in range(len(prompts))], (stats.num_steps_launched_ahead, stats.num_steps)


@pytest.mark.parametrize(
    "workload,blocks,late",
    [("mixed", 64, 3), ("mixed", 12, 3), ("decode_heavy", 64, 0), ("mixed_small_budget", 64, 0)],
)  # 12 blocks: preemption happens; a budget of 8 tokens: prompts stay mid-prefill beside decodes
def test_outputs_identical_with_and_without_async_scheduling(tmp_path, workload, blocks, late):
    prompts, params = _workload() if workload.startswith("mixed") else _decode_heavy()
    budget = 8 if workload == "mixed_small_budget" else 48
    kw = dict(blocks=blocks, max_num_seqs=6 if budget > 8 else 8, max_num_batched_tokens=budget)
    want, _ = _run(tiny_llm(tmp_path / "sync", async_scheduling=False, **kw), prompts, params, late)
    llm = tiny_llm(tmp_path / "async", async_scheduling=True, **kw)
    got, (ahead, steps) = _run(llm, prompts, params, late)
    # Every step but the first after an idle engine is launched ahead: new requests, prompts
    # mid-prefill, penalties and preemption included.
    assert ahead == steps - 1
    for w, g in zip(want, got, strict=True):
        a, b = w.outputs[0], g.outputs[0]
        assert (b.token_ids, b.finish_reason, b.stop_reason) == (a.token_ids, a.finish_reason, a.stop_reason)
        if a.logprobs is not None:
            assert [x[t].logprob for x, t in zip(b.logprobs, b.token_ids, strict=True)] == pytest.approx(
                [x[t].logprob for x, t in zip(a.logprobs, a.token_ids, strict=True)], abs=1e-5
            )
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == stats.num_waiting == 0
    assert stats.generation_tokens == sum(len(o.outputs[0].token_ids) for o in got)
    if blocks == 12:
        assert stats.num_preemptions > 0


def test_async_with_padded_decode_path_and_text_stops(tiny_model_dir):
    """The look-ahead through the static decode buffers, with stop strings checked on the host."""
    kw = dict(max_model_len=256, kv_cache_memory_bytes=16 << 20, max_num_seqs=4)
    params = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=30, stop=[" the", "."], ignore_eos=True) for i in range(4)
    ]
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,", "Hello"]
    want = LLM(str(tiny_model_dir), async_scheduling=False, **kw).generate(prompts, params)
    llm = LLM(str(tiny_model_dir), async_scheduling=True, **kw)
    llm.engine.use_static_decode_buffers()
    got = llm.generate(prompts, params)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_abort_while_a_step_is_in_flight_frees_everything(tmp_path):
    llm = tiny_llm(tmp_path, async_scheduling=True)
    eng = llm.engine
    for i in range(3):
        eng.add_request(str(i), [1 + i] * 20, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(5):
        eng.step()
    assert eng.step_in_flight
    assert eng.abort_request("1")
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id != "1"
            done[out.request_id] = out
    assert sorted(done) == ["0", "2"] and all(len(o.outputs[0].token_ids) == 50 for o in done.values())
    stats = eng.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_async_scheduling_is_validated():
    from membound.config import EngineConfig
    from membound.errors import ConfigError

    with pytest.raises(ConfigError, match="async_scheduling must be"):
        EngineConfig(async_scheduling="yes")
