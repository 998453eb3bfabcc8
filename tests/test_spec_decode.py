"""Speculative decoding (issue 16): the rejection sampler is lossless, the n-gram proposer finds
what it should."""

from __future__ import annotations

import collections
import contextlib
import json
import re
import time
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


# ------------------------------------------------------------------------------------ engine


@contextlib.contextmanager
def forced_drafts(make):
    """Every sequence that may speculate drafts make(tokens, k), whatever it pays."""
    from membound.engine import speculator

    with (
        mock.patch.object(speculator, "propose_ngram", lambda t, k, lo, hi: list(make(list(t), k))),
        mock.patch.object(speculator.NgramSpeculator, "_pays", lambda self, req, ratio: True),
    ):
        yield


GROUNDED = [
    "Repeat this text exactly:\nThe quick brown fox jumps over the lazy dog. The quick brown fox jumps over "
    "the lazy dog.\nRepeated text:\n",
    "Rename the variable x to total in this code:\ndef add(a, b):\n    x = a + b\n    return x\n\n"
    "def twice(a):\n    x = add(a, a)\n    return x\nAnswer:\n",
    "Count: one, two, three, four, five, six, seven, eight, nine, ten. Again: one, two, three,",
    "What is the capital of France?",  # open-ended: little to match
]
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def _texts(outs):
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


@pytest.fixture(scope="module")
def smol_spec():
    from membound import LLM

    return LLM(max_model_len=1024, kv_cache_memory_bytes=128 << 20, quantization="none", speculative_config=SPEC)


@pytest.fixture(scope="module")
def smol_plain():
    from membound import LLM

    return LLM(max_model_len=1024, kv_cache_memory_bytes=128 << 20, quantization="none")


def test_greedy_outputs_are_identical_with_speculation_alone_and_in_a_batch(smol_spec, smol_plain):
    """fp32 SmolLM2 (verification rows and decode rows agree to the last bits that matter): the same
    greedy tokens alone and in a batch beside requests that do not speculate (logprobs, penalties)."""
    from membound import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=60)
    others = [
        SamplingParams(temperature=0, max_tokens=30, logprobs=2),
        SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3),
    ]
    want = _texts(smol_plain.generate(GROUNDED, greedy))
    before = smol_spec.engine.core.speculator.num_accepted_tokens
    assert _texts(smol_spec.generate(GROUNDED, greedy)) == want
    sp = smol_spec.engine.core.speculator
    assert sp.num_accepted_tokens - before > 15  # it did speculate, and drafts were kept
    mixed = GROUNDED + GROUNDED[:2]
    params = [greedy] * 4 + others
    got, ref = smol_spec.generate(mixed, params), smol_plain.generate(mixed, params)
    assert _texts(got) == _texts(ref)
    for a, b in zip(got[4:], ref[4:], strict=True):  # the non-speculating ones' logprobs too
        if b.outputs[0].logprobs is not None:
            t = b.outputs[0].token_ids
            assert [x[i].logprob for x, i in zip(a.outputs[0].logprobs, t, strict=True)] == pytest.approx(
                [x[i].logprob for x, i in zip(b.outputs[0].logprobs, t, strict=True)], abs=1e-4
            )
    st = smol_spec.engine.stats()
    assert st.num_free_blocks == st.num_total_blocks


def test_stops_and_max_tokens_inside_an_accepted_run_end_where_they_would(smol_spec, smol_plain):
    from membound import SamplingParams

    prompt = GROUNDED[0]
    for params in (
        SamplingParams(temperature=0, max_tokens=7),  # lands mid-run
        SamplingParams(temperature=0, max_tokens=40, stop=["lazy"]),
        SamplingParams(temperature=0, max_tokens=40, stop=["jumps over the"]),
    ):
        a, b = smol_spec.generate(prompt, params)[0].outputs[0], smol_plain.generate(prompt, params)[0].outputs[0]
        assert (a.text, a.token_ids, a.finish_reason, a.stop_reason) == (
            b.text,
            b.token_ids,
            b.finish_reason,
            b.stop_reason,
        )


def test_speculation_under_chunked_prefill_preemption_and_prefix_hits(tmp_path):
    """A pool small enough to preempt, a step budget that chunks prompts and clips drafts, prompts
    that share prefixes: greedy outputs as without speculation, and every block returned."""
    from membound import LLM, SamplingParams
    from tests.conftest import TINY_BLOCK, TINY_KV_BYTES_PER_TOKEN, write_tiny_config

    path = write_tiny_config(tmp_path / "cfg")
    base = [(3 * i) % 50 + 1 for i in range(40)]
    prompts = [base[: 20 + 5 * i] + base[:10] * 2 for i in range(5)]  # repetitive: drafts get accepted
    kw = dict(
        load_format="dummy", skip_tokenizer_init=True, max_model_len=128, max_num_batched_tokens=16,
        max_num_seqs=4, kv_cache_memory_bytes=14 * TINY_BLOCK * TINY_KV_BYTES_PER_TOKEN, dtype="float32",
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(str(path), **kw)
    want = _texts(plain.generate(prompts, params))
    spec = LLM(str(path), speculative_config=SPEC, **kw)
    got = _texts(spec.generate(prompts, params))
    assert got == want
    st = spec.engine.stats()
    assert st.num_preemptions > 0 and st.prefix_cache_hits > 0
    assert spec.engine.core.speculator.num_drafts > 0
    assert st.num_free_blocks == st.num_total_blocks


@pytest.fixture(scope="module")
def tiny_spec_engine(tmp_path_factory):
    from membound.config import EngineConfig
    from membound.engine.llm_engine import LLMEngine
    from tests.conftest import TINY_BLOCK, TINY_KV_BYTES_PER_TOKEN, write_tiny_config

    path = write_tiny_config(tmp_path_factory.mktemp("spec") / "cfg")
    return LLMEngine(
        EngineConfig(
            model=str(path), load_format="dummy", skip_tokenizer_init=True, max_model_len=128, max_num_seqs=4,
            max_num_batched_tokens=24, kv_cache_memory_bytes=20 * TINY_BLOCK * TINY_KV_BYTES_PER_TOKEN,
            speculative_config=SPEC,
        )
    )  # fmt: skip


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(4, 40), st.integers(1, 30), st.booleans()),
            st.tuples(st.just("abort"), st.integers(0, 20)),
            st.tuples(st.just("step"), st.integers(1, 4)),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_blocks_are_owned_once_and_all_come_back_under_speculation(tiny_spec_engine, ops):
    """Adds, aborts and steps in any order, sampled and greedy, with drafts accepted and (forced
    drafts of a repeated token) mostly rejected: every block's reference count is the number of
    requests holding it, the device block table matches each request's blocks after rollbacks, and
    once all are done every block is free."""
    with forced_drafts(lambda t, k: [t[-1]] * k):
        _ops_hold_block_invariants(tiny_spec_engine, ops)


def _ops_hold_block_invariants(tiny_spec_engine, ops):
    from membound import SamplingParams

    eng = tiny_spec_engine
    pool = eng.allocator
    table = eng.core.input_batch.block_table
    ids = 0

    def check():
        holders: dict[int, int] = {}
        for req in eng.core.requests.values():
            for b in req.block_ids:
                holders[b] = holders.get(b, 0) + 1
            if req.slot is not None and req.block_ids and req.num_computed_tokens:  # what the kernels read
                assert table[req.slot, : len(req.block_ids)].tolist() == req.block_ids, req.request_id
        for b in range(pool.num_blocks):
            assert pool.ref_count(b) == holders.get(b, 0), b

    for op in ops:
        if op[0] == "add":
            _, n, max_tokens, sampled = op
            prompt = [(7 * i) % 23 + 1 for i in range(n)]  # repeats: drafts to verify
            params = SamplingParams(temperature=0.8 if sampled else 0, max_tokens=max_tokens, ignore_eos=True)
            eng.add_request(f"r{ids}", prompt, params)
            ids += 1
        elif op[0] == "abort":
            eng.abort_request(f"r{op[1]}")
        else:
            for _ in range(op[1]):
                eng.step()
                check()
    while eng.has_unfinished_requests():
        eng.step()
        check()
    st_ = eng.stats()
    assert st_.num_free_blocks == st_.num_total_blocks


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ({"method": "eagle"}, "method must be one of ngram"),
        ({"method": "draft_model", "model": "x.gguf"}, "'draft_model' (a second model) is not supported yet"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens must be an integer in [1, 16]"),
        ({"prompt_lookup_min": 5, "prompt_lookup_max": 3}, "must not exceed"),
        ({"lookahead": 3}, "unknown fields ['lookahead']"),
        ("ngram", "must be a dict"),
    ],
)
def test_bad_speculative_configs_say_what_is_allowed(value, needle):
    from membound.config import EngineConfig
    from membound.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(needle)):
        EngineConfig(speculative_config=value)
    with pytest.raises(ConfigError, match="leave async_scheduling off"):
        EngineConfig(speculative_config=SPEC, async_scheduling=True)


@pytest.mark.slow
def test_the_server_reports_vllms_speculation_metrics(tmp_path):
    import httpx

    from tests.server_utils import ServerProcess

    srv = ServerProcess(
        ["--max-model-len", "1024", "--kv-cache-memory", "64", "--speculative-config", json.dumps(SPEC)],
        tmp_path / "log",
    )
    try:
        body = {"prompt": GROUNDED[0], "max_tokens": 40, "temperature": 0}
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        time.sleep(1.5)  # stats reach the metrics once per engine iteration
        m = srv.metrics()
        drafts, drafted = m["membound:spec_decode_num_drafts_total"], m["membound:spec_decode_num_draft_tokens_total"]
        accepted = m["membound:spec_decode_num_accepted_tokens_total"]
        per_pos = sum(v for k, v in m.items() if k.startswith("membound:spec_decode_num_accepted_tokens_per_pos_total"))
        assert drafts > 0 and drafted >= drafts and 0 < accepted <= drafted and per_pos == accepted
    finally:
        assert srv.stop() == 0, srv.log_tail()


def test_drafting_stops_where_it_does_not_pay_and_is_tried_again_later():
    """Hand-computed: with drafting steps measured at 2x a plain step, a sequence must emit 2 tokens
    per drafting step (1 accepted draft) to keep drafting; one that does not waits PROBE_EVERY steps."""
    import types

    from membound.config import SpeculativeConfig
    from membound.engine import speculator as spec_mod

    sp = spec_mod.NgramSpeculator(SpeculativeConfig(num_speculative_tokens=3, adaptive_window=4))
    assert sp.cost_ratio == 1.0  # nothing measured: optimistic
    sp.observe(False, 0.010)
    sp.observe(True, 0.020)
    assert sp.cost_ratio == pytest.approx(2.0)
    good = types.SimpleNamespace(spec_history=[1, 2, 1, 0], spec_wait=0)  # 1 + 1.0 = 2.0 >= 2: pays
    bad = types.SimpleNamespace(spec_history=[0, 1, 0, 1], spec_wait=0)  # 1 + 0.5 < 2
    assert sp._pays(good, sp.cost_ratio)
    tries = [sp._pays(bad, sp.cost_ratio) for _ in range(2 * spec_mod.PROBE_EVERY)]
    assert tries.count(True) == 2 and tries[spec_mod.PROBE_EVERY - 1] and tries[-1]
    new = types.SimpleNamespace(spec_history=[0], spec_wait=0)  # too new: everyone's recent acceptance
    sp.recent_accepted = 3.0
    assert sp._pays(new, sp.cost_ratio)
    sp.recent_accepted = 0.2
    assert [sp._pays(new, sp.cost_ratio) for _ in range(spec_mod.PROBE_UNJUDGED)].count(True) == 1


def test_bench_throughput_reports_the_mean_acceptance_length(tmp_path):
    from membound.bench import throughput

    engine = _tiny(tmp_path, 20, max_num_seqs=4, max_num_batched_tokens=24, speculative_config=SPEC)
    work = [throughput.WorkItem([(5 * i) % 17 + 1 for i in range(30)], 24) for _ in range(3)]
    with forced_drafts(lambda t, k: [t[-1]] * k):  # kept or not, some drafts to count
        out = throughput.run_membound(engine, work, progress=False)
    assert out["output_tokens"] == 72 and out["spec_drafting_steps"] > 0
    assert 0 <= out["spec_accepted_tokens"] <= out["spec_draft_tokens"]
    assert out["mean_acceptance_length"] == pytest.approx(1 + out["spec_accepted_tokens"] / out["spec_drafting_steps"])


def _tiny(tmp_path, blocks: int, **kw):
    from membound.config import EngineConfig
    from membound.engine.llm_engine import LLMEngine
    from tests.conftest import TINY_BLOCK, TINY_KV_BYTES_PER_TOKEN, write_tiny_config

    path = write_tiny_config(tmp_path / "cfg", initializer_range=0.3)  # peaked: drafts get accepted
    return LLMEngine(
        EngineConfig(
            model=str(path), load_format="dummy", skip_tokenizer_init=True, dtype="float32",
            kv_cache_memory_bytes=blocks * TINY_BLOCK * TINY_KV_BYTES_PER_TOKEN, **{"max_model_len": 128, **kw},
        )
    )  # fmt: skip


def _drain(eng) -> dict:
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = tuple(o.outputs[0].token_ids)
    return outs


def test_drafts_never_take_another_sequences_token_nor_preempt_it(tmp_path):
    """Four one-token prompts, a step budget of 6 and a pool that just fits their outputs: drafts
    get only what the decodes leave, so every sequence decodes every step, and no one is preempted
    to make room for a draft."""
    from membound import SamplingParams

    kw = dict(max_num_seqs=4, max_num_batched_tokens=6, speculative_config=SPEC)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    from tests.conftest import TINY_BLOCK

    blocks = 4 * -(-30 // TINY_BLOCK)  # each computes 30 positions (its prompt and 29 outputs): no more
    plain = _tiny(tmp_path / "a", blocks, **{**kw, "speculative_config": None})
    spec = _tiny(tmp_path / "b", blocks, **kw)
    for e in (plain, spec):
        for i in range(4):
            e.add_request(f"r{i}", [5 + i], params)
    want = _drain(plain)
    sched = spec.core.scheduler
    seen = []
    orig = sched.schedule

    def schedule():
        decoding = {r.request_id for r in sched.running if r.in_running and r.prefilled}
        out = orig()
        seen.append((decoding, {s.request.request_id for s in out.scheduled}, out.num_spec_tokens))
        return out

    # Drafts (of the last token) once all four are decoding.
    with forced_drafts(lambda t, k: [t[-1]] * k if len(t) > 2 else []), mock.patch.object(sched, "schedule", schedule):
        got = _drain(spec)
    assert got == want
    assert all(want_ <= got_ for want_, got_, _ in seen)  # every decoding sequence got its row, every step
    assert sum(n for *_, n in seen) > 0  # and drafts rode along where the budget allowed
    assert spec.stats().num_preemptions == plain.stats().num_preemptions


def test_sampled_requests_keep_their_distribution_with_drafts(tmp_path):
    """Engine level: 1,500 sampled requests with drafts forced along the greedy path (often kept,
    sometimes not) vs 1,500 without: the tokens at each position are alike (chi-square), for plain
    temperature and for top-k + top-p."""
    from scipy.stats import chi2_contingency

    from membound import SamplingParams

    kw = dict(max_num_seqs=64, max_num_batched_tokens=512)
    prompt = [3, 17, 42, 9, 77, 5, 61, 23]
    probe = _tiny(tmp_path / "g", 600, **kw)
    probe.add_request("g", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    path = prompt + list(_drain(probe)["g"])

    def along_greedy(t, k):  # the greedy continuation while on it, else a draft that mostly misses
        n = len(t)
        return path[n : n + k] if t == path[:n] else [path[len(prompt)]] * k

    n, steps = 1500, 4
    for i, params in enumerate(
        (
            SamplingParams(temperature=0.15, max_tokens=steps, ignore_eos=True),
            SamplingParams(temperature=0.25, top_k=4, top_p=0.8, max_tokens=steps, ignore_eos=True),
        )
    ):
        plain = _tiny(tmp_path / f"p{i}", 600, **kw)
        spec = _tiny(tmp_path / f"s{i}", 600, **kw, speculative_config=SPEC)  # (seed: the same dummy weights)
        spec.runner.generator.manual_seed(1234)  # independent draws from the plain engine's
        for e in (plain, spec):
            for j in range(n):
                e.add_request(f"q{j}", prompt, params)
        a = list(_drain(plain).values())
        with forced_drafts(along_greedy):
            b = list(_drain(spec).values())
        sp = spec.core.speculator
        assert 0 < sp.num_accepted_tokens < sp.num_draft_tokens  # drafts were kept and rejected
        for pos in range(steps):
            ca, cb = collections.Counter(x[pos] for x in a), collections.Counter(x[pos] for x in b)
            keys = [k for k in set(ca) | set(cb) if ca[k] + cb[k] >= 10]
            if len(keys) < 2:
                continue
            p = chi2_contingency([[ca[k] for k in keys], [cb[k] for k in keys]])[1]
            assert p > 1e-3, (i, pos, p)


def test_a_draft_never_preempts_a_request_the_plain_schedule_keeps(tmp_path):
    """A 4-block pool, a 30-token prompt decoding and a short one beside it: drafts may only use
    blocks that are free; without that check they evicted the short request (3 preemptions)."""
    from membound import SamplingParams

    def run(spec: bool) -> tuple:
        kw = dict(max_num_seqs=4, max_num_batched_tokens=64, enable_prefix_caching=False, max_model_len=64)
        e = _tiny(tmp_path / str(spec), 4, **kw, **({"speculative_config": SPEC} if spec else {}))
        e.add_request("long", [5, 6, 7, 8, 9] * 6, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        e.add_request("short", [11, 12] * 10, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        return _drain(e), e.stats().num_preemptions

    want, plain_preemptions = run(False)
    with forced_drafts(lambda t, k: [t[-1]] * k):
        got, spec_preemptions = run(True)
    assert got == want and spec_preemptions == plain_preemptions


def _ngram_reference(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The definition, in plain Python: the longest suffix (max_n down to min_n) seen before, the
    tokens after its most recent earlier occurrence."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        for start in range(length - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.integers(0, 4), max_size=40),
    st.integers(1, 4),
    st.sampled_from([(1, 3), (2, 4), (3, 3), (1, 1)]),
)
def test_ngram_proposer_matches_its_definition_and_its_buffer_extends(tokens, k, bounds):
    from membound.engine.ngram_proposer import TokenBuffer

    lo, hi = bounds
    assert propose_ngram(tokens, k, lo, hi) == _ngram_reference(tokens, k, lo, hi)
    buf = TokenBuffer()  # grown a piece at a time, as a request's tokens arrive
    for end in range(0, len(tokens) + 1, 7):
        buf.sync(tokens[:end])
    assert buf.sync(tokens).tolist() == tokens


def test_logprobs_requests_speculate_and_report_what_each_position_emitted(smol_spec, smol_plain):
    """Each verified token's logprob, rank and top-2 come from the row that scored it: the same as
    without speculation (fp32, 1e-4)."""
    from membound import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=40, logprobs=2)
    sp = smol_spec.engine.core.speculator
    before = sp.num_accepted_tokens
    got = smol_spec.generate(GROUNDED[0], params)[0].outputs[0]
    assert sp.num_accepted_tokens > before  # it speculated
    want = smol_plain.generate(GROUNDED[0], params)[0].outputs[0]
    assert got.token_ids == want.token_ids
    for a, b, t in zip(got.logprobs, want.logprobs, got.token_ids, strict=True):
        assert list(a) == list(b) and a[t].rank == b[t].rank
        assert [x.logprob for x in a.values()] == pytest.approx([x.logprob for x in b.values()], abs=1e-4)
    assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-3)


def test_the_memory_profile_runs_the_verification_shapes(tmp_path):
    """On CUDA the activation peak is measured over the worst steps; with speculation they hold
    max_num_seqs x (k + 1) sampling rows and a verification. The same code, run here on CPU."""
    from membound.engine.builder import run_profile_steps
    from membound.engine.kv_cache import allocate_kv_cache, blocks_needed
    from membound.engine.warmup import synthetic_metadata

    eng = _tiny(tmp_path, 20, max_num_seqs=4, max_num_batched_tokens=32, speculative_config=SPEC)
    cfg, bs, max_len = eng.config, eng.config.block_size, 64
    scratch = blocks_needed(32, bs) + 1
    caches = allocate_kv_cache(eng.kv_spec, scratch, eng.device)
    table = [i % scratch for i in range(blocks_needed(max_len, bs))]
    shapes = []

    def meta(q_lens):
        shapes.append(list(q_lens))
        return synthetic_metadata(eng.model.attention_backend, q_lens, max_len, table, bs, eng.device)

    calls = []
    with mock.patch("membound.engine.builder.verify_on_device", lambda *a: calls.append(a[2].spec)):
        run_profile_steps(eng.model, cfg, 32, max_len, caches, meta, eng.device)
    k = SPEC["num_speculative_tokens"]
    assert shapes == [[32], [k + 1] * 4]  # a whole chunk, then 4 sequences verifying k drafts each
    assert calls and all(len(spec) == 4 and all(d == k for _, d in spec) for spec in calls)
    run_profile_steps(eng.model, cfg, 32, max_len, caches, meta, eng.device)  # and for real, without error
