"""int8 KV cache with a scale per token and head: the write, both attention kernels, the engine.

Kernels run under TRITON_INTERPRET=1 on CPU. The reference for reading is independent of the
code under test: the cache is dequantized by hand (codes x scales) and the plain fp32 PyTorch
attention runs on that.
"""

from __future__ import annotations

import pytest
import torch

from membound.attention.torch_paged import decode_attention, prefill_attention, quantize_int8, write_kv
from membound.kernels.decode_attention import paged_decode_attention
from membound.kernels.fused import rope_write_kv
from membound.kernels.prefill_attention import paged_prefill_attention
from membound.layers.rotary import rope_write_kv as rope_write_kv_ref
from tests.test_kernels import scrambled_block_table

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _int8_cache(kvh: int, blocks: int, bs: int, d: int, gen: torch.Generator):
    """Random codes and positive scales that differ per token (an outlier token among them)."""
    codes = torch.randint(-127, 128, (2, kvh, blocks, bs, d), generator=gen, dtype=torch.int8)
    scales = torch.rand(2, kvh, blocks, bs, generator=gen) * 0.05 + 0.001
    scales[:, :, 1, 3] = 2.0  # one token 40x larger than the rest
    deq = codes.float() * scales[..., None]
    return codes.to(DEVICE), scales.to(DEVICE), deq.to(DEVICE)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_kernel_reads_int8_codes_times_scales(group, dtype):
    gen = torch.Generator().manual_seed(group)
    seq_lens = [1, 17, 40, 33]
    codes, scales, deq = _int8_cache(2, 12, 16, 32, gen)
    table = scrambled_block_table(seq_lens, 16, 12, gen)
    q = torch.randn(len(seq_lens), 2 * group, 32, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    want = decode_attention(q.float(), deq[0], deq[1], table, lens, 32**-0.5, None)
    for splits in (1, 3):
        got = paged_decode_attention(
            q, codes[0], codes[1], table, lens, 32**-0.5, None, splits, kv_scales=(scales[0], scales[1])
        )
        # fp16: the kernel rounds the dequantized K/V (up to 254 for the outlier) to fp16 before the dots.
        tol = 1e-2 if dtype == torch.float16 else 1e-4
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    # The PyTorch backend's own int8 read agrees as well.
    torch.testing.assert_close(
        decode_attention(q.float(), codes[0], codes[1], table, lens, 32**-0.5, None, (scales[0], scales[1])),
        want,
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_kernel_reads_int8_codes_times_scales(dtype):
    gen = torch.Generator().manual_seed(3)
    q_lens, cached = [5, 20, 1], [11, 0, 30]
    seq_lens = [a + b for a, b in zip(q_lens, cached, strict=True)]
    codes, scales, deq = _int8_cache(2, 12, 16, 32, gen)
    table = scrambled_block_table(seq_lens, 16, 12, gen)
    q = torch.randn(sum(q_lens), 4, 32, generator=gen).to(dtype).to(DEVICE)
    starts = torch.tensor([0, 5, 25, 26], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    got = paged_prefill_attention(
        q, codes[0], codes[1], table, lens, starts, 20, 32**-0.5, kv_scales=(scales[0], scales[1])
    )
    for i in range(3):
        lo, hi = starts[i].item(), starts[i + 1].item()
        want = prefill_attention(q[lo:hi].float(), deq[0], deq[1], table[i], seq_lens[i], 32**-0.5, None)
        tol = 1e-2 if dtype == torch.float16 else 1e-4
        torch.testing.assert_close(got[lo:hi].float(), want, atol=tol, rtol=tol)


def test_write_quantizes_per_token_and_head():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(5, 2, 16, generator=gen)
    k[2, 1] *= 100  # an outlier token/head keeps everyone else's precision
    v = torch.randn(5, 2, 16, generator=gen)
    codes = torch.zeros(2, 2, 4, 4, 16, dtype=torch.int8)
    scales = torch.zeros(2, 2, 4, 4)
    slots = torch.tensor([0, 5, 6, 11, 15])
    write_kv(k, v, codes[0], codes[1], slots, (scales[0], scales[1]))
    back = (codes[0].float() * scales[0][..., None]).view(2, -1, 16)[:, slots].transpose(0, 1)
    err = (back - k).abs().amax(-1)  # per token and head: at most half a step of its own scale
    assert (err <= k.abs().amax(-1) / 127 / 2 + 1e-6).all()
    assert (codes[0].view(2, -1, 16)[:, slots].abs().amax(-1) == 127).all()  # each row uses the full range
    with pytest.raises(ValueError, match="needs its scales"):
        write_kv(k, v, codes[0], codes[1], slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_write_kernel_quantizes_like_the_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    t, h, kvh, d, blocks, bs = 7, 4, 2, 32, 4, 8
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k, v = q.view(t, h, d), k.view(t, kvh, d), v.view(t, kvh, d)
    freqs = torch.outer(torch.arange(64.0), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)
    positions = torch.tensor([0, 3, 9, 10, 30, 31, 63], device=DEVICE)
    slots = torch.tensor([1, 2, 8, 9, 17, 30, 31], device=DEVICE)
    caches = [torch.zeros(kvh, blocks, bs, d, dtype=torch.int8, device=DEVICE) for _ in range(4)]
    scales = [torch.zeros(kvh, blocks, bs, device=DEVICE) for _ in range(4)]
    got_q = rope_write_kv(q, k, v, cos, sin, positions, caches[0], caches[1], slots, (scales[0], scales[1]))
    want_q = rope_write_kv_ref(q, k, v, cos, sin, positions, caches[2], caches[3], slots, (scales[2], scales[3]))
    tol = 2e-3 if dtype == torch.float16 else 1e-6  # fp16: the rotation rounds like the model, not bit-exactly
    torch.testing.assert_close(got_q, want_q, atol=tol, rtol=tol)
    for a, b in ((0, 2), (1, 3)):
        torch.testing.assert_close(scales[a], scales[b], rtol=tol, atol=0)
        assert (caches[a].int() - caches[b].int()).abs().max() <= 1  # a rounding tie may differ by one
        assert (caches[a] != 0).sum() > 0.9 * t * kvh * d


def test_quantize_int8_round_trip_bound():
    x = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(2)) * torch.rand(3, 4, 1) * 10
    codes, scale = quantize_int8(x)
    assert ((codes.float() * scale[..., None] - x).abs() <= scale[..., None] / 2 + 1e-6).all()


def test_whole_model_int8_kv_on_both_backends(tmp_path):
    """Through chunked prefill, prefix hits and batched decodes: the Triton path (interpreter on CPU)
    and the PyTorch path read the same int8 cache alike, and stay close to a full-precision cache."""
    from membound import LLM, SamplingParams
    from tests.conftest import save_tiny_hf_model

    save_tiny_hf_model(tmp_path, "llama")
    prompts = [[(7 * i + j) % 250 + 1 for j in range(n)] for i, n in enumerate([3, 20, 37, 20])]
    prompts[3][:16] = prompts[1][:16]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    outs = {}
    for backend, kv in (("torch", "auto"), ("torch", "int8"), ("triton", "int8")):
        llm = LLM(
            str(tmp_path), attention_backend=backend, kv_cache_dtype=kv, skip_tokenizer_init=True,
            max_model_len=128, max_num_batched_tokens=32, max_num_seqs=4, kv_cache_memory_bytes=1 << 20,
        )  # fmt: skip
        assert len(llm.engine.runner.kv_caches[0]) == (4 if kv == "int8" else 2)
        outs[backend, kv] = llm.generate(prompts, params)

    def logprobs(key):
        return torch.tensor(
            [
                lp[t].logprob
                for o in outs[key]
                for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
            ]
        )

    for a, b in zip(outs["torch", "int8"], outs["triton", "int8"], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    torch.testing.assert_close(logprobs(("torch", "int8")), logprobs(("triton", "int8")), atol=2e-3, rtol=2e-3)
    full, low = logprobs(("torch", "auto")), logprobs(("torch", "int8"))
    assert 0 < (full - low).abs().max() < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [1, 3])
def test_kernels_address_a_pool_past_2_31_elements(kv_heads):
    """One layer's int8 pool of more than 2^31 elements (an H200 at 0.9 utilization holds one for a
    1-3B model), so every kernel must address in 64 bits. One head: block * block_stride passes
    int32; three heads of 2^30 elements each: head * head_stride does. The pool is allocated lazily
    (only touched pages cost memory); K and V share it to halve that."""
    bs, d = 16, 128
    if kv_heads == 1:
        num_blocks = (1 << 31) // (bs * d) + 8
        blocks = [num_blocks - 10, num_blocks - 3, num_blocks - 9, num_blocks - 8, num_blocks - 5]  # across 2^31
    else:
        num_blocks = (1 << 30) // (bs * d) + 8
        blocks = [num_blocks - 1, 5, 900, num_blocks - 8, 77]
    try:
        pool = torch.empty(kv_heads, num_blocks, bs, d, dtype=torch.int8, device=DEVICE)
        scales = torch.empty(kv_heads, num_blocks, bs, dtype=torch.float32, device=DEVICE)
    except (RuntimeError, torch.OutOfMemoryError):
        pytest.skip("cannot reserve a 2-3 GiB pool here")
    gen = torch.Generator().manual_seed(7)
    codes, sc, deq = _int8_cache(kv_heads, len(blocks), bs, d, gen)
    pool[:, blocks] = codes[0]
    scales[:, blocks] = sc[0]
    seq_lens = [70, 37]  # 5 and 3 pages
    big = torch.tensor([blocks, blocks[2:] + [0, 0]], dtype=torch.int32, device=DEVICE)
    small = torch.tensor([[0, 1, 2, 3, 4], [2, 3, 4, 0, 0]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 2 * kv_heads, d, generator=gen).to(DEVICE)
    want = decode_attention(q, deq[0], deq[0], small, lens, d**-0.5, None)
    got = paged_decode_attention(q, pool, pool, big, lens, d**-0.5, None, 2, kv_scales=(scales, scales))
    torch.testing.assert_close(got, want, atol=5e-4, rtol=5e-4)  # one outlier token reaches 254

    qp = torch.randn(12, 2 * kv_heads, d, generator=gen).to(DEVICE)  # the last 12 tokens of the first sequence
    starts = torch.tensor([0, 12], dtype=torch.int32, device=DEVICE)
    got = paged_prefill_attention(qp, pool, pool, big[:1], lens[:1], starts, 12, d**-0.5, kv_scales=(scales, scales))
    want = prefill_attention(qp, deq[0], deq[0], small[0], seq_lens[0], d**-0.5, None)
    torch.testing.assert_close(got, want, atol=5e-4, rtol=5e-4)  # one outlier token reaches 254

    # The fused RoPE + KV write lands in the far blocks, as the reference does in a small pool.
    t = 2 * bs
    q1, k1, v1 = (torch.randn(t, kv_heads, d, generator=gen).to(DEVICE) for _ in range(3))
    cos, sin = torch.randn(64, d // 2, generator=gen).to(DEVICE), torch.randn(64, d // 2, generator=gen).to(DEVICE)
    pos = torch.arange(t, device=DEVICE)
    slots_big = torch.tensor([blocks[3 + i // bs] * bs + i % bs for i in range(t)], device=DEVICE)
    k_small = torch.zeros(kv_heads, 2, bs, d, dtype=torch.int8, device=DEVICE)
    v_small, s_small = torch.zeros_like(k_small), torch.zeros(2, kv_heads, 2, bs, device=DEVICE)
    rope_write_kv(q1, k1, v1, cos, sin, pos, pool, pool, slots_big, (scales, scales))
    rope_write_kv_ref(q1, k1, v1, cos, sin, pos, k_small, v_small, torch.arange(t, device=DEVICE), tuple(s_small))
    # K and V share the pool here, so it holds V's codes (written last) and V's scales.
    assert (pool[:, blocks[3:5]].int() - v_small.int()).abs().max() <= 1
    torch.testing.assert_close(scales[:, blocks[3:5]], s_small[1])
