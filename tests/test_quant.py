"""Quantized linear layers against dequantize-then-matmul in fp32, and quantized models end to end."""

from __future__ import annotations

import pytest
import torch

from membound import LLM, SamplingParams
from membound.errors import ConfigError
from membound.quant.linear import Fp8Linear, Int4Linear, Int8Linear, pick_group_size, quantize_model
from tests.conftest import full_logits, save_tiny_hf_model

# The CPU kernels take bf16 activations: 8 mantissa bits, so ~0.4% of the output's scale.
BF16_RTOL = 1e-2


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _int4_parts(n: int, k: int, group: int, gen: torch.Generator):
    q = torch.randint(0, 16, (n, k), generator=gen)
    scale = torch.rand(n, k // group, generator=gen) * 0.1 + 0.01
    zero = torch.randn(n, k // group, generator=gen) * 0.1
    w = ((q.float() - 8).view(n, -1, group) * scale[..., None] + zero[..., None]).view(n, k)
    return q, scale, zero, w


@pytest.mark.parametrize(
    ("n", "k", "group"), [(48, 96, 32), (1536, 576, 64), (64, 256, 128), (100, 64, 32), (8, 96, 32)]
)
def test_int4_matches_dequantize_then_matmul(n, k, group):
    gen = torch.Generator().manual_seed(n + k)
    q, scale, zero, w = _int4_parts(n, k, group, gen)
    bias = torch.randn(n, generator=gen)
    layer = Int4Linear(q, scale, zero, group, bias)
    x = torch.randn(7, k, generator=gen)
    want = x @ w.t() + bias
    got = layer(x)
    fast = layer._fast(x) is not None
    assert fast == (n % 16 == 0)  # the packed CPU kernel takes N divisible by 16; others dequantize
    if fast:
        assert _rel_err(got, want) < BF16_RTOL
    else:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(layer.unpacked(), q.to(torch.uint8))  # nibble packing round-trips
    assert layer(x[None]).shape == (1, 7, n)  # leading dims pass through


def test_int4_quantize_round_to_nearest_error_is_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=gen)
    layer = Int4Linear.quantize(w, 64)
    assert layer.group_size == 64 and layer.weight_nbytes() < w.numel() * 4 / 6
    step = (w.view(32, 4, 64).amax(-1) - w.view(32, 4, 64).amin(-1)) / 15
    err = (layer.dequantize() - w).abs().view(32, 4, 64).amax(-1)
    assert (err <= step / 2 + 0.01 * step + 4e-3).all()  # half a step, plus the kernel's bf16 read-out


@pytest.mark.parametrize(("n", "k"), [(48, 96), (33, 70), (1536, 576)])
def test_int8_and_fp8_match_dequantize_then_matmul(n, k):
    gen = torch.Generator().manual_seed(n * k)
    w, x = torch.randn(n, k, generator=gen), torch.randn(5, k, generator=gen)
    i8 = Int8Linear.quantize(w)
    want = x @ i8.dequantize().t()
    assert (i8._fast(x) is not None) == (k % 32 == 0)
    assert _rel_err(i8(x), want) < BF16_RTOL
    assert _rel_err(i8.dequantize(), w) < 1 / 127  # one step of the per-channel grid
    f8 = Fp8Linear(w)
    torch.testing.assert_close(f8(x), x @ f8.dequantize().t(), atol=1e-4, rtol=1e-4)
    assert _rel_err(f8.dequantize(), w) < 0.07  # e4m3 keeps 3 mantissa bits


def test_group_size_choice():
    assert pick_group_size(4096) == 128 and pick_group_size(576) == 64 and pick_group_size(96) == 32
    assert pick_group_size(576, preferred=32) == 32


@pytest.fixture(scope="module")
def smollm2_text(smollm2_none):
    """Model-generated text (fixed seed) and the full-precision log-probs at every position."""
    out = smollm2_none.generate(
        "Once upon a time, in a small village", SamplingParams(temperature=0.8, seed=1, max_tokens=96)
    )
    ids = out[0].prompt_token_ids + out[0].outputs[0].token_ids
    return ids, torch.log_softmax(full_logits(smollm2_none.engine, ids), -1)


@pytest.mark.parametrize(("fmt", "max_kl", "min_top1"), [("int8", 0.02, 0.85), ("fp8", 0.06, 0.8), ("int4", 0.01, 0.9)])
def test_quantized_smollm2_stays_close_to_full_precision(smollm2_text, fmt, max_kl, min_top1):
    """Mean KL and top-1 agreement over generated text, as llama.cpp's perplexity tool reports them.

    int4 groups on the GGUF's own 32-weight Q4_1 blocks, so it recovers the file's grid almost exactly;
    the remaining difference is the CPU kernel's bf16 activations."""
    ids, p = smollm2_text
    llm = LLM(max_model_len=256, kv_cache_memory_bytes=16 << 20, quantization=fmt)
    q = torch.log_softmax(full_logits(llm.engine, ids), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    assert 0 < kl < max_kl, kl
    assert top1 >= min_top1, top1


def test_default_smollm2_at_int4_still_answers_paris():
    llm = LLM(max_model_len=256, kv_cache_memory_bytes=16 << 20, quantization="int4")
    assert llm.engine.memory.weight_bytes < 0.2 * 2**30  # 4-bit layers; the tied fp32 embedding is most of it
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0))
    assert "Paris" in out[0].outputs[0].text


def test_bad_quantization_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"quantization must be auto, gguf, none, int8, int4, fp8 \(or None\)"):
        LLM("x", quantization="int3")


def test_quantize_model_leaves_embeddings_and_head_alone(tmp_path):
    save_tiny_hf_model(tmp_path, "llama")
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, max_model_len=32, kv_cache_memory_bytes=1 << 20)
    model = llm.engine.model
    assert quantize_model(model, "int8") == 4 * model.config.num_layers
    assert isinstance(model.embed_tokens.weight, torch.nn.Parameter) and model.lm_head.weight.dtype == torch.float32


# ---------------------------------------------------------------------- GGUF 4-bit blocks, kept packed


def test_gguf_q4_blocks_unpack_bit_exactly_against_ggufs_dequantizer():
    import gguf
    import numpy as np

    from membound.model.loader import GGUFFile, resolve_model
    from membound.quant.gguf_blocks import unpack_q4

    g = GGUFFile(resolve_model(None).path)
    t = g.tensors["blk.3.ffn_up.weight"]
    assert t.tensor_type.name == "Q4_1"
    q, d, m = unpack_q4(t.data, "Q4_1")
    rows = t.data.shape[0]
    ours = (np.repeat(d, 32, axis=1) * q.astype(np.float32)) + np.repeat(m, 32, axis=1)  # gguf's own formula
    assert np.array_equal(ours, gguf.quants.dequantize(t.data, t.tensor_type).reshape(rows, -1))
    assert q.max() == 15 and q.min() == 0

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    q, d, _ = unpack_q4(raw, "Q4_0")
    ours = np.repeat(d, 32, axis=1) * (q.astype(np.int8) - np.int8(8)).astype(np.float32)
    assert np.array_equal(ours, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0))


def test_int4_smollm2_runs_on_the_files_blocks(caplog):
    import logging

    from membound.model.loader import GGUFFile, resolve_model
    from membound.quant.gguf_blocks import int4_parts

    with caplog.at_level(logging.INFO, logger="membound"):
        llm = LLM(max_model_len=128, kv_cache_memory_bytes=8 << 20, quantization="int4")
    assert "120 linear layers from the GGUF's own 4-bit blocks, 0 quantized by round-to-nearest" in caplog.text
    down = llm.engine.model.layers[3].mlp.down_proj
    t = GGUFFile(resolve_model(None).path).tensors["blk.3.ffn_down.weight"]
    _, scale, zero = int4_parts(t.data, t.tensor_type.name)
    assert down.group_size == 32 and torch.equal(down.scale, scale) and torch.equal(down.zero, zero)


# ---------------------------------------------------------------------- fp8 KV cache


@pytest.mark.parametrize(
    ("kv_dtype", "per_head_bytes", "max_kl"),
    [("fp8", 64, 0.05), ("int8", 64 + 4, 0.01)],  # SmolLM2: head_dim 64; int8 adds an fp32 scale per head
)
def test_low_precision_kv_cache_multiplies_capacity_and_stays_close(smollm2_text, kv_dtype, per_head_bytes, max_kl):
    ids, p = smollm2_text
    # Weights dequantized like the reference's (quantization="none"): only the KV cache differs.
    base = LLM(max_model_len=256, kv_cache_memory_bytes=16 << 20, quantization="none")
    low = LLM(max_model_len=256, kv_cache_memory_bytes=16 << 20, quantization="none", kv_cache_dtype=kv_dtype)
    # fp32 run dtype here: 256 bytes per head vector.
    assert low.engine.kv_spec.bytes_per_token * 256 == base.engine.kv_spec.bytes_per_token * per_head_bytes
    assert low.engine.allocator.num_blocks >= 256 // per_head_bytes * base.engine.allocator.num_blocks - 1
    q = torch.log_softmax(full_logits(low.engine, ids), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    assert 0 < kl < max_kl and top1 >= 0.85, (kl, top1)
    out = low.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0))
    assert "Paris" in out[0].outputs[0].text


def test_fp8_kv_write_saturates_instead_of_nan():
    from membound.attention.torch_paged import write_kv

    cache = torch.zeros(2, 2, 2, 4, 4, dtype=torch.float8_e4m3fn)  # K/V, heads, blocks, block size, dim
    k = torch.tensor([[[1000.0, -1000.0, 0.5, 3.0]] * 2] * 3)  # [T=3, KVH=2, D=4]
    write_kv(k, k, cache[0], cache[1], torch.tensor([0, 3, 5]))
    got = cache[0].float().view(2, -1, 4)
    assert torch.isfinite(got).all()
    assert got[0, 3].tolist() == [448.0, -448.0, 0.5, 3.0] and got[1, 1].abs().sum() == 0


def test_bad_kv_cache_dtype():
    with pytest.raises(ConfigError, match="kv_cache_dtype must be auto, fp8 or int8"):
        LLM("x", kv_cache_dtype="int2")
