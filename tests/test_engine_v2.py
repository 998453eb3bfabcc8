"""Engine v2: the O(1) block pool, output kinds, device-side penalties, a request that fails alone,
prefill chunks bounded beside decodes, and the parts' import boundaries."""

from __future__ import annotations

import ast
import collections
import json
import pathlib
import random

import pytest
import torch
from starlette.testclient import TestClient

from membound import LLM, RequestOutputKind, SamplingParams
from membound.engine.block_pool import BlockPool, FreeBlockQueue
from membound.engine.input_batch import PenaltyRows, StepPenalties
from membound.engine.request import Request
from membound.engine.sampler import Penalties
from tests.conftest import tiny_llm

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- block pool


def test_free_queue_matches_an_ordered_reference_under_random_churn():
    rng = random.Random(0)
    n = 200
    q, ref = FreeBlockQueue(n), collections.OrderedDict.fromkeys(range(n))
    taken: list[int] = []
    for _ in range(5000):
        op = rng.random()
        if op < 0.4 and ref:
            b = q.popleft()
            assert b == next(iter(ref))
            del ref[b]
            taken.append(b)
        elif op < 0.7 and taken:
            b = taken.pop(rng.randrange(len(taken)))
            q.append(b)
            ref[b] = None
        elif ref:  # a cache hit taken back from the middle of the queue
            b = rng.choice(list(ref))
            q.remove(b)
            del ref[b]
            taken.append(b)
        assert len(q) == len(ref)
    for b in taken[1:]:
        q.append(b)
        ref[b] = None
    assert list(q) == list(ref) and len(ref) == n - 1
    with pytest.raises(ValueError, match="already free"):
        q.append(next(iter(ref)))
    with pytest.raises(ValueError, match="not free"):
        q.remove(taken[0])


def test_block_pool_reuses_cached_blocks_in_lru_order_and_evicts_their_hashes():
    pool = BlockPool(4)
    a = pool.allocate(4)
    for b, h in zip(a, (b"w", b"x", b"y", b"z"), strict=True):
        pool.register(b, h)
    pool.free(a)  # tail first: z, y, x, w
    assert pool.lookup([b"w", b"x"]) == a[:2]
    pool.take([a[1]])  # x comes back out of the middle of the queue
    assert pool.num_free == 3
    got = pool.allocate(2)  # the least recently freed: z's and y's blocks, their hashes gone
    assert got == [a[3], a[2]] and pool.lookup([b"z"]) == [] and pool.lookup([b"w"]) == [a[0]]
    assert pool.num_cached == 2


# ---------------------------------------------------------------- output kinds


def test_output_kinds_deltas_add_up_and_final_only_reports_once(tmp_path):
    llm = tiny_llm(tmp_path, async_scheduling=True)
    eng = llm.engine
    base = dict(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True, logprobs=1)
    kinds = {k: SamplingParams(**base, output_kind=k) for k in RequestOutputKind}
    for k, p in kinds.items():
        eng.add_request(k.value, [5, 6, 7, 8], p)
    seen = collections.defaultdict(list)
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen[out.request_id].append(out)
    cum, delta, final = (seen[k.value] for k in RequestOutputKind)
    want = cum[-1].outputs[0]
    assert len(want.token_ids) == 40
    # Deltas: each step's output holds only that step's token, never what came before.
    assert all(len(o.outputs[0].token_ids) == 1 for o in delta)
    assert [t for o in delta for t in o.outputs[0].token_ids] == want.token_ids
    assert [x for o in delta for x in o.outputs[0].logprobs] == want.logprobs
    assert len(final) == 1 and final[0].finished and final[0].outputs[0].token_ids == want.token_ids
    # Cumulative outputs are copies: later steps do not change what an earlier output said.
    assert [len(o.outputs[0].token_ids) for o in cum] == list(range(1, 41))


def test_no_row_is_scheduled_for_a_token_that_is_certainly_the_last(tmp_path):
    """With async scheduling, a request whose sampled-but-unseen token reaches max_tokens gets no
    further row (it would take a block, maybe preempt someone); a one-token request still caches
    its prompt (its blocks are registered before it gives them back)."""
    llm = tiny_llm(tmp_path, async_scheduling=True)
    eng = llm.engine
    prompt = list(range(1, 50))  # 3 full blocks of 16
    for rid in ("a", "b"):
        eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1))
        while eng.has_unfinished_requests():
            eng.step()
    s = eng.stats()
    assert s.num_steps == 2  # one prefill each, no wasted decode after it
    assert s.prefix_cache_hits == 48 and s.num_cached_blocks == 3


# ---------------------------------------------------------------- penalties on the device


def test_device_penalty_rows_match_the_one_shot_reference():
    g = torch.Generator().manual_seed(0)
    vocab = 50
    params = [
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5),
    ]
    reqs = []
    for i, p in enumerate(params):
        prompt = torch.randint(0, vocab, (7 + i,), generator=g).tolist()
        r = Request(str(i), None, prompt, p, 0.0, (), 100, None, None)
        r.token_ids += torch.randint(0, vocab, (5,), generator=g).tolist()  # resumed with outputs
        reqs.append(r)
    store = PenaltyRows(vocab, 4, torch.device("cpu"))
    for slot, r in zip((3, 1), reqs, strict=True):
        store.add(slot, r)
    step = StepPenalties(store, torch.tensor([0, 1]), torch.tensor([store.row(3), store.row(1)]))
    for _ in range(3):  # apply, sample, record: the device counts follow the token lists
        logits = torch.randn(2, vocab, generator=g)
        lists = [r.token_ids for r in reqs]
        ref = Penalties.build(params, lists, [len(r.prompt_token_ids) for r in reqs], vocab, torch.device("cpu"))
        torch.testing.assert_close(step.apply(logits), ref.apply(logits))
        ids = torch.randint(0, vocab, (2,), generator=g)
        step.record(ids)
        for r, t in zip(reqs, ids.tolist(), strict=True):
            r.token_ids.append(t)


# ---------------------------------------------------------------- a request that fails alone


class _Exploding:
    def __init__(self, real, after: int) -> None:
        self.real, self.left = real, after

    def step(self, token_id: int) -> str:
        self.left -= 1
        if self.left < 0:
            raise RuntimeError("Invalid UTF-8 state (injected)")
        return self.real.step(token_id)


def _inject(llm: LLM, poisoned_prompt: list[int]) -> None:
    tok = llm.engine.tokenizer
    make = tok.detokenizer

    def detokenizer(prompt_ids, skip_special_tokens):
        d = make(prompt_ids, skip_special_tokens)
        return _Exploding(d, after=3) if list(prompt_ids) == poisoned_prompt else d

    tok.detokenizer = detokenizer  # the test-only detokenizer: raises for one request


def test_a_failing_detokenizer_ends_its_request_alone(tiny_model_dir):
    kw = dict(max_model_len=128, kv_cache_memory_bytes=8 << 20, max_num_seqs=16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 500, (4 + i,), generator=g).tolist() for i in range(16)]
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=12, ignore_eos=True) for i in range(16)]
    want = LLM(str(tiny_model_dir), **kw).generate(prompts, params)
    for async_scheduling in (False, True):
        llm = LLM(str(tiny_model_dir), async_scheduling=async_scheduling, **kw)
        _inject(llm, prompts[5])
        got = llm.generate(prompts, params)
        bad = got[5].outputs[0]
        assert bad.finish_reason == "error" and "Invalid UTF-8 state (injected)" in got[5].error
        assert len(bad.token_ids) == 4  # the tokens it had when it failed
        for i in set(range(16)) - {5}:
            assert got[i].outputs[0].token_ids == want[i].outputs[0].token_ids
            assert got[i].outputs[0].text == want[i].outputs[0].text and got[i].error is None
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks and not llm.engine.has_unfinished_requests()
        # and the engine goes on
        again = llm.generate(prompts[:2], params[:2])
        assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in want[:2]]


def test_over_http_the_failing_request_gets_an_error_and_health_stays_up(tiny_model_dir):
    from membound.server import AsyncEngine, ServerConfig, build_app

    llm = LLM(str(tiny_model_dir), max_model_len=128, kv_cache_memory_bytes=8 << 20)
    poisoned = llm.tokenizer.encode("poisoned prompt")
    _inject(llm, poisoned)
    engine = AsyncEngine(lambda: llm.engine, max_queued_requests=8)
    body = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
    with TestClient(build_app(engine, ServerConfig(), ("tiny",), 128)) as http:
        assert engine.wait_loaded(30)
        r = http.post("/v1/completions", json={**body, "prompt": "poisoned prompt", "stream": True})
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert "Invalid UTF-8 state (injected)" in err["message"] and err["type"] == "server_error"
        r = http.post("/v1/completions", json={**body, "prompt": "poisoned prompt"})
        assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
        assert http.get("/health").status_code == 200
        r = http.post("/v1/completions", json={**body, "prompt": "a healthy prompt"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 10
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


# ---------------------------------------------------------------- prefill beside decodes


def test_a_long_prompt_is_fed_in_bounded_chunks_while_others_decode(tmp_path):
    def chunks(threshold):
        llm = tiny_llm(
            tmp_path / str(threshold),
            blocks=64,
            max_num_batched_tokens=96,
            max_num_seqs=4,
            long_prefill_token_threshold=threshold,
        )
        eng, sizes = llm.engine, []
        eng.add_request("d", [1, 2, 3], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
        eng.step()
        eng.add_request("long", list(range(1, 101)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        schedule = eng.scheduler.schedule

        def spy():
            sched = schedule()
            sizes.extend(s.num_new_tokens for s in sched.scheduled if s.request.request_id == "long")
            return sched

        eng.scheduler.schedule = spy
        final = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                final[o.request_id] = o.outputs[0].token_ids
        return sizes, final

    capped, out_capped = chunks(24)
    uncapped, out_uncapped = chunks(0)
    assert capped[:5] == [24, 24, 24, 24, 4] and uncapped[0] == 95  # the budget minus the decode
    assert out_capped == out_uncapped  # chunking changes when, never what


# ---------------------------------------------------------------- boundaries


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "part,forbidden",
    [
        ("server", ("membound.engine.scheduler", "membound.engine.model_runner", "membound.engine.core")),
        ("bench", ("membound.engine.model_runner", "membound.engine.scheduler")),
        ("engine", ("membound.server", "membound.bench", "membound.entrypoints")),
        ("model", ("membound.engine", "membound.server")),
    ],
)
def test_parts_import_only_downwards(part, forbidden):
    for path in (ROOT / "membound" / part).rglob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(forbidden)}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_nothing_outside_the_engine_reaches_into_its_private_state():
    for folder in ("server", "bench", "entrypoints", "plan"):
        for path in (ROOT / "membound" / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("engine._", "engine.runner.", "engine.scheduler.", "engine.requests"):
                assert needle not in text, f"{path.relative_to(ROOT)} uses {needle}"


def test_a_reader_that_stops_reading_holds_one_merged_output_not_a_queue(tmp_path):
    import asyncio
    import time

    from membound.server import AsyncEngine, SubRequest

    llm = tiny_llm(tmp_path)
    p = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, logprobs=1, output_kind=RequestOutputKind.DELTA)
    want = llm.generate([[1, 2, 3, 4]], p)[0].outputs[0]
    engine = AsyncEngine(lambda: llm.engine, max_queued_requests=4)

    async def main():
        engine.start(asyncio.get_running_loop())
        assert await asyncio.to_thread(engine.wait_loaded, 30)
        stream = await engine.add([SubRequest("r", [1, 2, 3, 4], p, time.time())])
        it = stream.__aiter__()
        first = await it.__anext__()
        await asyncio.sleep(1.0)  # the reader stalls; the engine finishes meanwhile
        pending = stream._collector._pending  # inspected, not used: what a stalled reader holds
        assert list(pending) == ["r"] and pending["r"].finished
        rest = [o async for o in it]
        assert len(rest) == 1  # one merged output, not 99 queued ones
        got = first.outputs[0].token_ids + rest[0].outputs[0].token_ids
        assert got == want.token_ids == first.delta_token_ids + rest[0].delta_token_ids
        assert first.outputs[0].logprobs + rest[0].outputs[0].logprobs == want.logprobs

    try:
        asyncio.run(main())
    finally:
        engine.stop()


def test_a_step_interrupted_while_waiting_ends_its_requests_instead_of_hanging(tmp_path):
    llm = tiny_llm(tmp_path, async_scheduling=True)
    eng = llm.engine
    eng.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    fetch, calls = eng.runner.fetch, []

    def interrupted(step):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fetch(step)

    eng.runner.fetch = interrupted
    outs = []
    with pytest.raises(KeyboardInterrupt):
        for _ in range(10):
            outs += eng.step()
    for _ in range(10):
        outs += eng.step()
    assert not eng.has_unfinished_requests() and not eng.request_ids()
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


def test_the_prefill_cap_is_per_step_for_all_prompts_together(tmp_path):
    llm = tiny_llm(tmp_path, blocks=64, max_num_batched_tokens=96, max_num_seqs=8, long_prefill_token_threshold=10)
    eng = llm.engine
    eng.add_request("d", [1, 2, 3], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    eng.step()
    for i in range(4):
        eng.add_request(f"p{i}", [i + 1] * 30, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    schedule, prefill = eng.scheduler.schedule, []

    def spy():
        sched = schedule()
        prefill.append(sum(s.num_new_tokens for s in sched.scheduled if s.start < len(s.request.prompt_token_ids)))
        return sched

    eng.scheduler.schedule = spy
    while eng.has_unfinished_requests():
        eng.step()
    assert max(prefill) == 10 and sum(prefill) == 4 * 30  # distinct prompts: no prefix hits
