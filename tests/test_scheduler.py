"""Scheduler and KV block accounting: budgets, decode priority, preemption, no leaks."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from membound import LLM, SamplingParams
from membound.engine.block_pool import BlockPool
from tests.conftest import tiny_llm


def test_allocator_refuses_double_free_and_overcommit():
    a = BlockPool(4)
    got = a.allocate(3)
    assert a.num_free == 1
    with pytest.raises(RuntimeError):
        a.allocate(2)
    a.free(got)
    assert a.num_free == 4
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(got[:1])


def test_chunked_prefill_respects_the_token_budget_and_decodes_go_first(tmp_path):
    # No cap on the chunk beside decodes: the budget alone decides (test_engine_v2 covers the cap).
    llm = tiny_llm(tmp_path, blocks=64, max_num_batched_tokens=32, max_num_seqs=8, long_prefill_token_threshold=0)
    eng = llm.engine
    eng.add_request("short", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()  # prefill of "short"; it now decodes
    eng.add_request("long", list(range(100)), SamplingParams(max_tokens=5, ignore_eos=True))
    chunks = []
    schedule = eng.scheduler.schedule

    def spy():
        sched = schedule()
        assert sched.num_tokens <= 32
        first = sched.scheduled[0]
        assert first.request.request_id == "short" and first.num_new_tokens == 1
        chunks.append(next(s.num_new_tokens for s in sched.scheduled if s.request.request_id == "long"))
        return sched

    eng.scheduler.schedule = spy
    for _ in range(4):
        eng.step()
    assert chunks == [31, 31, 31, 7]  # 100 prompt tokens, 31 per step beside the decode


def test_max_num_seqs_caps_the_batch(tmp_path):
    llm = tiny_llm(tmp_path, blocks=64, max_num_seqs=3)
    for i in range(6):
        llm.engine.add_request(f"r{i}", [i + 1] * 4, SamplingParams(max_tokens=4, ignore_eos=True))
    sched = llm.engine.scheduler.schedule()
    assert len(sched.scheduled) == 3


def test_preemption_instead_of_out_of_memory(tmp_path):
    llm = tiny_llm(tmp_path, blocks=10)  # 160 tokens of KV; 4 requests need ~4 x 90
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    outs = llm.generate([[i + 1] * 50 for i in range(4)], params)
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_total_blocks


def held_blocks(llm: LLM) -> list[int]:
    return [b for r in llm.engine.requests.values() for b in r.block_ids]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 60), st.integers(1, 20)),
        st.tuples(st.just("abort"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("step"), st.integers(1, 4), st.just(0)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_random_mix_of_finish_abort_and_preemption_never_leaks(tmp_path, ops):
    llm = tiny_llm(tmp_path, blocks=12, max_num_batched_tokens=48, max_num_seqs=6)
    eng = llm.engine
    total = eng.stats().num_total_blocks
    added = 0
    for op, a, b in ops:
        if op == "add":
            eng.add_request(
                f"r{added}", [(added + i) % 100 + 1 for i in range(a)], SamplingParams(max_tokens=b, ignore_eos=True)
            )
            added += 1
        elif op == "abort" and added:
            eng.abort_request(f"r{a % added}")
        else:
            for _ in range(a):
                eng.step()
        held = held_blocks(llm)
        assert len(held) == len(set(held)), "a block is owned twice"
        assert len(held) + eng.stats().num_free_blocks == total
        assert len(eng.scheduler.running) <= 6
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.stats().num_free_blocks == total
    assert not eng.requests


def test_preempted_request_recomputes_in_chunks_when_chunked_prefill_is_off(tmp_path):
    """Prompt fits the budget, but prompt + output after preemption does not: no hang."""
    llm = tiny_llm(tmp_path, blocks=10, max_num_batched_tokens=60, max_num_seqs=4, enable_chunked_prefill=False)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    outs = llm.generate([[i + 1] * 55 for i in range(3)], params)
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    assert llm.engine.stats().num_preemptions > 0


def test_mid_prefill_prompt_shrinks_its_chunk_instead_of_preempting(tmp_path):
    llm = tiny_llm(tmp_path, blocks=9, max_num_batched_tokens=128, max_num_seqs=4)
    eng = llm.engine
    eng.add_request("a", [1] * 40, SamplingParams(max_tokens=60, ignore_eos=True))  # 100 tokens
    eng.step()
    eng.add_request("b", [2] * 100, SamplingParams(max_tokens=2, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.stats().num_preemptions == 0


def test_dummy_preset_runs_and_startup_logs_the_memory_arithmetic(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="membound"):
        llm = LLM("smollm2-135m", load_format="dummy", max_model_len=256, kv_cache_memory_bytes=64 << 20)
    assert llm.tokenizer is None and llm.engine.model_config.num_layers == 30
    # 64 MiB / (46,080 fp32 bytes per token x 16) = 91 blocks = 1,456 tokens = 5.69 x 256
    assert llm.engine.stats().num_total_blocks == 91
    line = next(r.getMessage() for r in caplog.records if "KV cache" in r.getMessage())
    assert "weights 0.501 GiB" in line and "= 91 blocks = 1456 tokens" in line and "5.69x" in line
    out = llm.generate([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
