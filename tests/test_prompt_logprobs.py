"""Prompt logprobs (scoring) and logit_bias against independent references (issue 17)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from membound import RequestOutputKind, SamplingParams
from membound.config import EngineConfig
from membound.engine.llm_engine import LLMEngine
from membound.errors import InvalidRequestError
from tests.conftest import save_tiny_hf_model


def _run(engine: LLMEngine, rid: str, ids: list[int], params: SamplingParams):
    engine.add_request(rid, ids, params)
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid and o.finished:
                final = o
    return final


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    hf = save_tiny_hf_model(path, "llama", initializer_range=0.05)  # flat enough that top-k are not ties
    return path, hf


@pytest.mark.parametrize("chunk", [2048, 16])  # the whole prompt in one step; chunks of 16 (ends mid-block)
def test_prompt_logprobs_equal_hf_and_survive_chunking_and_a_cached_prefix(tiny, chunk):
    path, hf = tiny
    ids = torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # row p scores token p + 1
    engine = LLMEngine(
        EngineConfig(
            model=str(path), skip_tokenizer_init=True, kv_cache_memory_bytes=8 << 20, block_size=8,
            max_num_batched_tokens=chunk, max_num_seqs=16, long_prefill_token_threshold=0,
        )
    )  # fmt: skip
    # The first 40 tokens' KV is in the prefix cache before the scoring request comes.
    _run(engine, "warm", ids[:40], SamplingParams(max_tokens=1, temperature=0))
    hits_before = engine.stats().prefix_cache_hits
    out = _run(engine, "score", ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))
    assert engine.stats().prefix_cache_hits == hits_before  # scored from scratch: every row ran
    lps = out.prompt_logprobs
    assert len(lps) == len(ids) and lps[0] is None
    for p in range(1, len(ids)):
        lp = lps[p]
        assert next(iter(lp)) == ids[p]  # the prompt token first, then the top 3 (vLLM's shape)
        assert abs(lp[ids[p]].logprob - ref[p - 1, ids[p]].item()) < 1e-4, p
        assert lp[ids[p]].rank == int((ref[p - 1] >= ref[p - 1, ids[p]]).sum()), p  # ties ahead, as vLLM
        want = ref[p - 1].topk(3)
        top = sorted((x.rank, t, x.logprob) for t, x in lp.items() if x.rank <= 3)
        assert [t for _, t, _ in top] == want.indices.tolist(), p
        assert [r for r, _, _ in top] == [1, 2, 3]
        torch.testing.assert_close(torch.tensor([v for _, _, v in top]), want.values, atol=1e-4, rtol=0)
        assert len(lp) == (3 if lp[ids[p]].rank <= 3 else 4)
    # Once scored, the same prompt may use the cache again (a plain request, no scoring).
    _run(engine, "again", ids, SamplingParams(max_tokens=1, temperature=0))
    assert engine.stats().prefix_cache_hits > hits_before


def test_prompt_logprobs_zero_gives_the_tokens_own_logprob_only_and_a_preempted_scorer_is_complete(tiny):
    path, hf = tiny
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (60,), generator=gen).tolist() for _ in range(4)]
    engine = LLMEngine(
        EngineConfig(
            model=str(path), skip_tokenizer_init=True, kv_cache_memory_bytes=96 << 10, block_size=8,
            max_num_batched_tokens=24, max_num_seqs=4, max_model_len=128,
        )
    )  # fmt: skip
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=40, ignore_eos=True, prompt_logprobs=0))
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    assert engine.stats().num_preemptions > 0  # the pool was short: recomputes happened
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        lps = outs[f"r{i}"].prompt_logprobs
        assert len(lps) == len(ids) and all(list(lp) == [t] for lp, t in zip(lps[1:], ids[1:], strict=True))
        got = torch.tensor([lp[t].logprob for lp, t in zip(lps[1:], ids[1:], strict=True)])
        torch.testing.assert_close(got, ref[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)


def test_logit_bias_steers_greedy_rows_and_leaves_the_others_alone(tiny):
    path, _ = tiny
    engine = LLMEngine(EngineConfig(model=str(path), skip_tokenizer_init=True, kv_cache_memory_bytes=8 << 20))
    ids = list(range(10, 30))
    plain = _run(engine, "plain", ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    first = plain.outputs[0].token_ids[0]
    # +100 on one token makes it every greedy choice; -100 on the plain first choice removes it.
    forced = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={77: 100})
    banned = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={first: -100})
    engine.add_request("forced", ids, forced)
    engine.add_request("banned", ids, banned)
    engine.add_request("free", ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    assert outs["forced"] == [77] * 6
    assert first not in outs["banned"]
    assert outs["free"] == plain.outputs[0].token_ids  # same batch, no bias: unchanged
    # Sampling at a temperature: a +100 bias still wins every draw.
    hot = _run(engine, "hot", ids, SamplingParams(max_tokens=4, temperature=1.5, seed=1, logit_bias={5: 100}))
    assert hot.outputs[0].token_ids == [5] * 4


@pytest.mark.parametrize(
    ("bias", "needle"),
    [({300: 1}, "token ids are integers in [0, 256)"), ({1: 101}, "[-100, 100]"), ({-1: 1}, "non-negative")],
)
def test_bad_logit_bias_is_refused(tiny, bias, needle):
    path, _ = tiny
    engine = LLMEngine(EngineConfig(model=str(path), skip_tokenizer_init=True, kv_cache_memory_bytes=8 << 20))
    with pytest.raises(InvalidRequestError, match="logit_bias") as e:
        engine.add_request("x", [1, 2], SamplingParams(logit_bias=bias))
    assert needle in str(e.value)


def test_completions_echo_scores_the_prompt_as_lm_eval_asks(tiny_model_dir, tmp_path):
    """lm-eval's local-completions loglikelihood request: token-id prompt, echo, logprobs 1, max_tokens 1
    (and the legacy max_tokens 0). The prompt's token_logprobs equal HF's on the same weights."""
    import httpx
    from transformers import AutoModelForCausalLM

    from tests.server_utils import ServerProcess

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float().eval()
    ids = [504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 11065, 314]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = [None] + [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
    args = ["--model", str(tiny_model_dir), "--max-model-len", "256", "--kv-cache-memory", "16"]
    server = ServerProcess(args, tmp_path / "s.log")
    try:
        url = f"{server.url}/v1/completions"
        for max_tokens in (1, 0):
            body = {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0}
            r = httpx.post(url, json=body, timeout=60)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            lp = choice["logprobs"]
            n = len(ids) + max_tokens
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            got = lp["token_logprobs"][: len(ids)]
            assert all(abs(g - w) < 1e-4 for g, w in zip(got[1:], want[1:], strict=True)), (got, want)
            # Each top_logprobs entry holds the token itself and the best alternative (logprobs 1).
            assert all(1 <= len(t) <= 2 for t in lp["top_logprobs"][1:])
            assert choice["text"].startswith(lp["tokens"][0]) and lp["text_offset"][0] == 0
            usage = r.json()["usage"]
            assert usage["prompt_tokens"] == len(ids) and usage["completion_tokens"] == max_tokens
        # A text prompt is echoed as sent; streamed, the prompt comes first in a chunk of its own.
        with httpx.stream(
            "POST", url, json={"prompt": "Hello there", "echo": True, "max_tokens": 3, "stream": True}, timeout=60
        ) as r:
            texts = [
                json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines() if line.startswith("data: {")
            ]
        assert texts[0] == "Hello there" and len("".join(texts)) > len("Hello there")
    finally:
        assert server.stop() == 0, server.log_tail()


def test_one_token_chunks_are_scored_too(tiny):
    """A prompt chunk of 1 token is scheduled among the decodes: it must still be scored (a budget of
    64 with prompts of 63 and 40 tokens leaves the second 1 token in the first step)."""
    path, hf = tiny
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (63, 40)]
    engine = LLMEngine(
        EngineConfig(
            model=str(path), skip_tokenizer_init=True, kv_cache_memory_bytes=8 << 20, block_size=8,
            max_num_batched_tokens=64, max_num_seqs=4, long_prefill_token_threshold=0,
        )
    )  # fmt: skip
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        lps = outs[f"r{i}"].prompt_logprobs
        assert len(lps) == len(ids), (i, len(lps))
        got = torch.tensor([lp[t].logprob for lp, t in zip(lps[1:], ids[1:], strict=True)])
        torch.testing.assert_close(got, ref[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)


def test_outputs_have_vllms_logprob_shape_on_the_real_model(smollm2_none):
    """CompletionOutput.logprobs / RequestOutput.prompt_logprobs as vLLM gives them: per position a
    dict token id -> Logprob(logprob, rank, decoded_token), the token itself first, then the top k;
    ranks and values against the model's own full logits."""
    from tests.conftest import full_logits

    llm = smollm2_none  # fp32: decode steps and one prefill agree closely
    tok = llm.engine.tokenizer
    prompt = "The capital of France is"
    params = SamplingParams(temperature=1.5, seed=7, max_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = llm.generate(prompt, params)[0]
    comp = out.outputs[0]
    ids = out.prompt_token_ids + comp.token_ids
    ref = full_logits(llm.engine, ids).float().log_softmax(-1)  # row p scores token p + 1
    ranks = []
    for pos, (lp, t) in enumerate(zip(comp.logprobs, comp.token_ids, strict=True)):
        row = ref[len(out.prompt_token_ids) + pos - 1]
        assert next(iter(lp)) == t
        tol = 1e-3
        assert abs(lp[t].logprob - row[t].item()) < tol
        assert int((row >= row[t] + tol).sum()) <= lp[t].rank <= int((row >= row[t] - tol).sum())
        top = sorted((x.rank, k) for k, x in lp.items() if x.rank <= 3)
        assert [r for r, _ in top] == [1, 2, 3] and len(lp) == (3 if lp[t].rank <= 3 else 4)
        assert all(x.decoded_token == tok.decode([k], skip_special_tokens=False) for k, x in lp.items())
        ranks.append(lp[t].rank)
    assert max(ranks) > 1  # at temperature 1.5 some sampled token is not the argmax
    # Deltas carry the running total, as vLLM's do.
    delta = llm.engine
    params_d = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
    delta.add_request("d", prompt, params_d)
    outs = [o for _ in range(200) if delta.has_unfinished_requests() for o in delta.step()]
    assert len(outs) == 12 and outs[-1].outputs[0].cumulative_logprob == pytest.approx(comp.cumulative_logprob)
    assert outs[0].outputs[0].cumulative_logprob == pytest.approx(comp.logprobs[0][comp.token_ids[0]].logprob)
    assert comp.cumulative_logprob == pytest.approx(
        sum(lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids, strict=True))
    )
    plp = out.prompt_logprobs
    assert plp[0] is None and len(plp) == len(out.prompt_token_ids)
    for p in range(1, len(plp)):
        t = out.prompt_token_ids[p]
        row, tol = ref[p - 1], 1e-3
        assert next(iter(plp[p])) == t and abs(plp[p][t].logprob - row[t].item()) < tol
        assert int((row >= row[t] + tol).sum()) <= plp[p][t].rank <= int((row >= row[t] - tol).sum())
        assert plp[p][t].decoded_token == tok.decode([t])
