"""Continuous batching must not change what a request produces.

Each request's greedy output alone must equal its output inside a batch of 16
mixed-length requests: with chunked prefill forced to small chunks, and with a KV
pool so small that requests get preempted and recomputed.

These run on the fp32 dequantized weights (quantization="none"). The default packed GGUF path
multiplies bf16-rounded activations, so the last-ulp differences that chunking makes in fp32
attention can cross a bf16 rounding boundary and flip a greedy near-tie (seen: one of the 16
requests, at its 9th token).
"""

from __future__ import annotations

import pytest

from membound import LLM, SamplingParams

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis turns light into chemical energy.",
    "In 1969 astronauts walked on the Moon.",
    "A paged KV cache stores keys and values in fixed-size blocks.",
]
MAX_TOKENS = 12


def prompts() -> list[str]:
    out = []
    for i in range(16):
        reps = 1 + (i * 5) % 11  # 1..11 sentences: about 10 to 150 tokens
        out.append(" ".join(SENTENCES[(i + j) % 4] for j in range(reps)) + f" Item {i}:")
    return out


PARAMS = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(smollm2_none) -> list[list[int]]:
    return [smollm2_none.generate(p, PARAMS)[0].outputs[0].token_ids for p in prompts()]


def assert_no_leaks(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not llm.engine.has_unfinished_requests()


def test_prompts_are_mixed_length(smollm2):
    lengths = [len(smollm2.tokenizer.encode(p)) for p in prompts()]
    assert min(lengths) < 20 and max(lengths) > 100


def test_batch_of_16_with_small_prefill_chunks(alone):
    llm = LLM(
        max_model_len=512,
        kv_cache_memory_bytes=64 << 20,
        max_num_batched_tokens=16,
        max_num_seqs=16,
        quantization="none",
    )
    outs = llm.generate(prompts(), PARAMS)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert_no_leaks(llm)


def test_batch_of_16_with_preemption(alone):
    # 20 blocks of 16 tokens: the 16 prompts need about 1,100 tokens of KV at once.
    pool = 20 * 16 * 30 * 2 * 3 * 64 * 4
    llm = LLM(
        max_model_len=256,
        kv_cache_memory_bytes=pool,
        max_num_batched_tokens=64,
        max_num_seqs=16,
        quantization="none",
    )
    assert llm.engine.stats().num_total_blocks == 20
    outs = llm.generate(prompts(), PARAMS)
    assert llm.engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert_no_leaks(llm)
