"""The static decode path CUDA graphs replay: ladder, padding, and outputs unchanged by it.

On CPU the same padded buffers run eagerly (no capture), which checks everything but the
capture itself; the `gpu` tests compare captured graphs against eager mode.
"""

from __future__ import annotations

import pytest
import torch

from membound import LLM, SamplingParams
from membound.engine.cuda_graphs import batch_ladder, padded_size
from tests.conftest import save_tiny_hf_model, tiny_llm


def test_ladder_is_1_2_4_8_then_steps_of_8_up_to_the_maximum():
    assert batch_ladder(1) == [1]
    assert batch_ladder(3) == [1, 2, 3]
    assert batch_ladder(8) == [1, 2, 4, 8]
    assert batch_ladder(30) == [1, 2, 4, 8, 16, 24, 30]
    assert batch_ladder(256)[-3:] == [240, 248, 256] and len(batch_ladder(256)) == 35
    ladder = batch_ladder(30)
    assert [padded_size(ladder, b) for b in (1, 3, 5, 9, 24, 25, 30)] == [1, 4, 8, 16, 24, 30, 30]
    with pytest.raises(ValueError, match="larger than the largest"):
        padded_size(ladder, 31)
    with pytest.raises(ValueError, match="positive"):
        batch_ladder(0)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (n,), generator=g).tolist()
    return [torch.randint(1, 128, (k,), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize("max_num_seqs", [5, 9])
def test_padded_decode_matches_the_unpadded_path(tmp_path, max_num_seqs):
    """Batches of 1..max_num_seqs padded up the ladder (to 2, 4, 8, ...) give the same tokens and
    logprobs as the ordinary path, with sampling, and free every block (the pad block is never handed out)."""
    prompts = _prompts(max_num_seqs)
    # Different lengths, so the running batch shrinks through sizes that need padding; the first
    # request (which holds the first blocks handed out) runs longest, alongside the padding.
    n = len(prompts)
    reqs = [
        SamplingParams(temperature=0, max_tokens=4 + 2 * (n - i), ignore_eos=True, logprobs=2)
        if i % 2
        else SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=4 + 2 * (n - i), ignore_eos=True, logprobs=1)
        for i in range(n)
    ]
    plain = tiny_llm(tmp_path / "a", max_num_seqs=max_num_seqs, max_num_batched_tokens=64)
    padded = tiny_llm(tmp_path / "b", max_num_seqs=max_num_seqs, max_num_batched_tokens=64)
    padded.engine.use_static_decode_buffers()
    calls = []
    run = padded.engine.runner.graphs.run
    padded.engine.runner.graphs.run = lambda *a: calls.append(a[0].meta.num_seqs) or run(*a)
    want = plain.generate(prompts, reqs)
    got = padded.generate(prompts, reqs)
    assert calls and max(calls) == max_num_seqs  # decodes went through the padded path, at full batch too
    assert any(c not in batch_ladder(max_num_seqs) for c in calls)  # and some needed padding
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        if w.outputs[0].logprobs is not None:
            for a, b, t in zip(w.outputs[0].logprobs, g.outputs[0].logprobs, w.outputs[0].token_ids, strict=True):
                assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-5)
    stats = padded.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_pad_block_is_outside_the_allocator(tmp_path):
    llm = tiny_llm(tmp_path, blocks=10)
    engine = llm.engine
    engine.use_static_decode_buffers()
    graphs = engine.runner.graphs
    assert graphs.pad_block == engine.allocator.num_blocks == 10
    assert engine.runner.kv_caches[0][0].shape[1] == 11  # allocator's blocks + the scratch block
    assert 10 not in engine.allocator.allocate(10)


@pytest.mark.gpu
def test_greedy_outputs_identical_with_graphs_on_and_off(tmp_path):
    save_tiny_hf_model(tmp_path, "llama")
    kw = dict(skip_tokenizer_init=True, device="cuda", gpu_memory_utilization=0.3, max_model_len=512, max_num_seqs=12)
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = _prompts(11)
    eager = LLM(str(tmp_path), enforce_eager=True, **kw)
    graphs = LLM(str(tmp_path), **kw)
    assert eager.engine.runner.graphs is None and graphs.engine.runner.graphs.graphs
    assert sorted(graphs.engine.runner.graphs.graphs) == [1, 2, 4, 8, 12]
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, p)]
    got = [o.outputs[0].token_ids for o in graphs.generate(prompts, p)]
    assert got == want
    assert graphs.engine.runner.graphs.graph_bytes > 0
