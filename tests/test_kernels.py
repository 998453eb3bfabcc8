"""Every Triton kernel against its PyTorch reference on random inputs.

On CPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at small sizes,
in fp32 and fp16 (the interpreter mishandles bf16 arithmetic); on a GPU the `gpu`-marked
tests repeat them in bf16 at real sizes.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from membound.attention.torch_paged import decode_attention  # noqa: E402
from membound.kernels.decode_attention import paged_decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scrambled_block_table(seq_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator):
    """A block table giving each sequence its own blocks of a pool of num_blocks, in random order."""
    pages = [(n + block_size - 1) // block_size for n in seq_lens]
    order = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    used = 0
    for i, p in enumerate(pages):
        table[i, :p] = torch.tensor(order[used : used + p], dtype=torch.int32)
        used += p
    return table.to(DEVICE)


def _paged_cache(kvh: int, seq_lens: list[int], block_size: int, d: int, dtype, gen: torch.Generator):
    """A cache holding random K/V for each sequence in scrambled blocks, and its block table."""
    total = sum((n + block_size - 1) // block_size for n in seq_lens) + 3
    k_cache = torch.randn(kvh, total, block_size, d, generator=gen).to(dtype)
    v_cache = torch.randn(kvh, total, block_size, d, generator=gen).to(dtype)
    table = scrambled_block_table(seq_lens, block_size, total, gen)
    return k_cache.to(DEVICE), v_cache.to(DEVICE), table


def _check_decode(seq_lens, heads, kv_heads, d, dtype, block_size=16, window=None, num_splits=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, table = _paged_cache(kv_heads, seq_lens, block_size, d, dtype, gen)
    q = torch.randn(len(seq_lens), heads, d, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = d**-0.5
    got = paged_decode_attention(q, k_cache, v_cache, table, lens, scale, window, num_splits)
    want = decode_attention(q.float(), k_cache.float(), v_cache.float(), table, lens, scale, window)
    tol = 2e-3 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_gqa_ragged_lengths(group, dtype):
    # Lengths on, just under and just past block boundaries, and a single token.
    _check_decode([1, 15, 16, 17, 40], heads=2 * group, kv_heads=2, d=32, dtype=dtype, seed=group)


def test_decode_attention_split_across_many_kv_splits():
    for splits in (1, 3, 8, 13):
        _check_decode([200, 7, 129], heads=4, kv_heads=2, d=64, dtype=torch.float32, num_splits=splits, seed=splits)


def test_decode_attention_sliding_window_and_odd_head_dim():
    _check_decode([50, 33, 5], heads=6, kv_heads=2, d=40, dtype=torch.float32, window=20, num_splits=4)
    _check_decode([64], heads=4, kv_heads=4, d=8, dtype=torch.float16, block_size=16, window=17, num_splits=3)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_attention_bf16_real_sizes_on_gpu(group):
    gen = torch.Generator().manual_seed(group)
    seq_lens = [1, 17, 1000, 4096, 8191]
    k_cache, v_cache, table = _paged_cache(8, seq_lens, 16, 128, torch.bfloat16, gen)
    q = torch.randn(len(seq_lens), 8 * group, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    got = paged_decode_attention(q, k_cache, v_cache, table, lens, 128**-0.5)
    want = decode_attention(q.float(), k_cache.float(), v_cache.float(), table, lens, 128**-0.5, None)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------- fused elementwise kernels

from membound.kernels.fused import add_rmsnorm, rope_write_kv, silu_and_mul  # noqa: E402
from membound.layers import add_rms_norm as add_rmsnorm_ref  # noqa: E402
from membound.layers import rope_write_kv as rope_write_kv_ref  # noqa: E402
from membound.layers import silu_and_mul as silu_and_mul_ref  # noqa: E402


def _tol(dtype):
    return dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "hidden"), [(1, 64), (7, 96), (5, 576)])
def test_add_rmsnorm(dtype, rows, hidden):
    gen = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=gen).to(dtype).to(DEVICE)
    res = torch.randn(rows, hidden, generator=gen).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    for r in (res, None):
        got, got_res = add_rmsnorm(x, r, w, 1e-5)
        want, want_res = add_rmsnorm_ref(x, r, w, 1e-5)
        torch.testing.assert_close(got_res, want_res, atol=0, rtol=0)  # the residual sum is exact
        torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "inter"), [(1, 64), (3, 1536), (4, 1100)])
def test_silu_and_mul(dtype, rows, inter):
    gen = torch.Generator().manual_seed(inter)
    gu = (3 * torch.randn(rows, 2 * inter, generator=gen)).to(dtype).to(DEVICE)
    torch.testing.assert_close(silu_and_mul(gu), silu_and_mul_ref(gu), **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "d"), [(4, 4, 16), (9, 3, 64), (8, 1, 40)])
def test_rope_and_kv_write(dtype, heads, kv_heads, d):
    gen = torch.Generator().manual_seed(heads * d)
    t, blocks, bs, max_pos = 11, 6, 4, 64
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)  # strided views, as in the model
    q, k, v = q.view(t, heads, d), k.view(t, kv_heads, d), v.view(t, kv_heads, d)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)
    positions = torch.randint(0, max_pos, (t,), generator=gen).to(DEVICE)
    slots = torch.randperm(blocks * bs, generator=gen)[:t].to(DEVICE)
    cache = torch.randn(2, kv_heads, blocks, bs, d, generator=gen).to(dtype).to(DEVICE)
    caches = [cache.clone(), cache.clone()]
    got_q = rope_write_kv(q, k, v, cos, sin, positions, caches[0][0], caches[0][1], slots)
    want_q = rope_write_kv_ref(q, k, v, cos, sin, positions, caches[1][0], caches[1][1], slots)
    torch.testing.assert_close(got_q, want_q, **_tol(dtype))
    torch.testing.assert_close(caches[0], caches[1], **_tol(dtype))  # same slots written, others untouched
    assert not torch.equal(caches[0], cache)


# ---------------------------------------------------------------------- prefill / extend attention

from membound.attention.torch_paged import prefill_attention  # noqa: E402
from membound.kernels.prefill_attention import paged_prefill_attention  # noqa: E402


def _check_prefill(q_lens, cached, heads, kv_heads, d, dtype, block_size=16, window=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(cached, q_lens, strict=True)]
    k_cache, v_cache, table = _paged_cache(kv_heads, seq_lens, block_size, d, dtype, gen)
    q = torch.randn(sum(q_lens), heads, d, generator=gen).to(dtype).to(DEVICE)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    scale = d**-0.5
    got = paged_prefill_attention(q, k_cache, v_cache, table, lens, qsl, max(q_lens), scale, window)
    want = torch.cat(
        [
            prefill_attention(
                q[starts[i] : starts[i + 1]].float(), k_cache.float(), v_cache.float(), table[i], seq_lens[i],
                scale, window,
            )
            for i in range(len(q_lens))
        ]
    )  # fmt: skip
    tol = 2e-3 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_attention_ragged_batch_over_cached_prefixes(group, dtype):
    # Fresh prompts and extends over cached prefixes, lengths across block and BLOCK_M boundaries.
    _check_prefill([5, 16, 33, 1], [0, 16, 7, 40], heads=2 * group, kv_heads=2, d=32, dtype=dtype, seed=group)


def test_prefill_attention_sliding_window_odd_head_dim():
    _check_prefill([30, 9], [10, 25], heads=6, kv_heads=3, d=24, dtype=torch.float32, block_size=16, window=12)


@pytest.mark.gpu
def test_prefill_attention_bf16_real_sizes_on_gpu():
    gen = torch.Generator().manual_seed(0)
    q_lens, cached = [512, 1000, 77], [0, 3000, 16]
    seq_lens = [c + n for c, n in zip(cached, q_lens, strict=True)]
    k_cache, v_cache, table = _paged_cache(8, seq_lens, 16, 128, torch.bfloat16, gen)
    q = torch.randn(sum(q_lens), 32, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    starts = [0, 512, 1512, 1589]
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    got = paged_prefill_attention(
        q, k_cache, v_cache, table, lens, torch.tensor(starts, dtype=torch.int32, device=DEVICE), 1000, 128**-0.5
    )
    want = torch.cat(
        [
            prefill_attention(q[starts[i] : starts[i + 1]].float(), k_cache.float(), v_cache.float(), table[i],
                              seq_lens[i], 128**-0.5, None)
            for i in range(3)
        ]
    )  # fmt: skip
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------- the whole model on the Triton backend


@pytest.mark.gpu
@pytest.mark.cpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_whole_model_triton_backend_matches_torch_backend(tmp_path, family):
    """Greedy tokens and logprobs through chunked prefill, prefix hits and batched decodes, with the
    fused kernels in the model (RoPE + KV write, residual-add + RMSNorm, SiLU-and-mul): qkv bias
    (qwen2), q/k norm (qwen3) and a sliding window (mistral) included."""
    from membound import LLM, SamplingParams
    from tests.conftest import save_tiny_hf_model

    save_tiny_hf_model(tmp_path, family, **({"sliding_window": 24} if family == "mistral" else {}))
    prompts = [[(7 * i + j) % 250 + 1 for j in range(n)] for i, n in enumerate([3, 20, 37, 20])]
    prompts[3][:16] = prompts[1][:16]  # a full shared block: a prefix-cache hit
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            str(tmp_path), attention_backend=backend, skip_tokenizer_init=True, max_model_len=128, dtype="float32",
            max_num_batched_tokens=32, max_num_seqs=4, kv_cache_memory_bytes=1 << 20,
        )  # fmt: skip
        assert llm.engine.backend.name == backend
        outs[backend] = llm.generate(prompts, params) + llm.generate([prompts[3]], params)
        assert llm.engine.stats().prefix_cache_hits >= 16  # the second call extends a cached prefix
    for a, b in zip(outs["torch"], outs["triton"], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la = torch.tensor([lp[t].logprob for lp, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids, strict=True)])
        lb = torch.tensor([lp[t].logprob for lp, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids, strict=True)])
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)


def test_backend_selection():
    from membound.attention import get_backend
    from membound.errors import ConfigError

    assert get_backend("auto", torch.device("cpu")).name == "torch"
    assert get_backend("auto", torch.device("cuda")).name == "triton"  # chosen, not run
    with pytest.raises(ConfigError, match="unknown attention backend 'flash'"):
        get_backend("flash")


@pytest.mark.parametrize("block_size", [8, 48, 256])
def test_triton_backend_refuses_block_sizes_its_tiles_cannot_run(tmp_path, block_size):
    from membound import LLM
    from membound.errors import ConfigError
    from tests.conftest import write_tiny_config

    path = write_tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="block_size 16, 32, 64 or 128"):
        LLM(str(path), load_format="dummy", skip_tokenizer_init=True, attention_backend="triton", block_size=block_size)
    with pytest.raises(ConfigError, match="float32 with an int8 KV cache"):
        LLM(str(path), load_format="dummy", skip_tokenizer_init=True, attention_backend="triton", block_size=128,
            dtype="float32", kv_cache_dtype="int8")  # fmt: skip


def test_triton_backend_refuses_fp32_heads_wider_than_its_tiles_hold(tmp_path):
    """Gemma 3's head_dim 256 runs on the Triton kernels in bf16/fp16; fp32 tiles that wide spill."""
    from membound import LLM
    from membound.errors import ConfigError
    from tests.conftest import write_tiny_config

    path = write_tiny_config(tmp_path, head_dim=256)
    kw = dict(load_format="dummy", skip_tokenizer_init=True, attention_backend="triton", max_model_len=64)
    with pytest.raises(ConfigError, match="float32 with head_dim 256"):
        LLM(str(path), dtype="float32", **kw)
    assert LLM(str(path), dtype="bfloat16", kv_cache_memory_bytes=1 << 20, **kw).engine.model_config.head_dim == 256


def test_split_counts_are_powers_of_two_within_the_merge_tile():
    from membound.kernels.decode_attention import MAX_SPLITS, choose_num_splits, paged_decode_attention

    got = {choose_num_splits(b, kvh, pages) for b in (1, 3, 64) for kvh in (1, 8) for pages in (1, 5, 100, 4096)}
    assert got <= {1 << i for i in range(6)} and max(got) == MAX_SPLITS
    q = torch.randn(1, 2, 16)
    cache = torch.randn(2, 4, 16, 16)
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="num_splits must be in 1..32"):
        paged_decode_attention(q, cache, cache, table, lens, 0.25, num_splits=MAX_SPLITS + 1)
