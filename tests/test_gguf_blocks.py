"""GGUF blocks kept packed: the unpacker against gguf's own dequantizer, the group-wise int8 layer,
the loader on a tiny GGUF of every supported type, and the default SmolLM2 engine end to end."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from membound import LLM, SamplingParams
from membound.quant import linear as qlinear
from membound.quant.gguf_blocks import BLOCK_SIZES, LAYER_FORMAT, int4_from_groups, int8_from_groups, unpack
from membound.quant.linear import Int4Linear, Int8Embedding, Int8Linear
from tests.conftest import full_logits

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

# Byte offsets of each type's fp16 fields (d, and m / dmin where the type has one).
F16_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
GGUF_QUANTIZES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # gguf-py has quantizers for these


def random_blocks(qtype: str, rows: int, k: int, rng, scale: float = 1.0, signed: bool = True) -> np.ndarray:
    """Random bytes in every field, with finite fp16 scales (normal * scale, or |.| if not signed)."""
    elems, nbytes = BLOCK_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, k // elems * nbytes), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, nbytes)
    for off in F16_FIELDS[qtype]:
        v = rng.standard_normal(blocks.shape[:2]) * scale
        blocks[..., off : off + 2] = (v if signed else np.abs(v)).astype(np.float16)[..., None].view(np.uint8)
    return raw


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", list(BLOCK_SIZES))
def test_unpack_is_bit_exact_against_ggufs_dequantizer(qtype):
    rng = np.random.default_rng(len(qtype) + sum(map(ord, qtype)))
    raw = random_blocks(qtype, 13, 512, rng)
    g = unpack(raw, qtype)
    want = gguf.quants.dequantize(raw, T[qtype])
    assert np.isfinite(want).all()
    assert np.array_equal(_bits(g.dequantize()), _bits(want))  # same float32 bits, signed zeros included
    assert g.group == (16 if qtype == "Q6_K" else 32) and g.d.shape == (13, 512 // g.group)
    assert (g.m is None) == (qtype in ("Q4_0", "Q5_0", "Q8_0", "Q6_K"))
    if qtype in GGUF_QUANTIZES:  # real weights through gguf's quantizer, and back
        w = rng.standard_normal((8, 256)).astype(np.float32) * 0.05
        raw = gguf.quants.quantize(w, T[qtype])
        assert np.array_equal(_bits(unpack(raw, qtype).dequantize()), _bits(gguf.quants.dequantize(raw, T[qtype])))


def test_unpack_is_bit_exact_on_smollm2s_own_tensors():
    from membound.model.loader import GGUFFile, resolve_model

    f = GGUFFile(resolve_model(None).path)
    for name, qtype in (("token_embd.weight", "Q8_0"), ("blk.7.attn_q.weight", "Q4_1")):
        t = f.tensors[name]
        assert t.tensor_type.name == qtype
        g = unpack(t.data, qtype)
        assert np.array_equal(_bits(g.dequantize()), _bits(gguf.quants.dequantize(t.data, t.tensor_type)))


@pytest.mark.parametrize("qtype", list(BLOCK_SIZES))
def test_layer_formats_hold_the_same_weights(qtype):
    """int8 types: the layer's weight is gguf's, to the bit. int4 types: zero = m + 8 d is one float32
    rounding away (plain nibbles, 37 rows), and bf16 scale/zero in the CPU kernel's layout (48 rows)."""
    rng = np.random.default_rng(7)
    g = unpack(random_blocks(qtype, 48, 256, rng, scale=0.01), qtype)
    want = torch.from_numpy(g.dequantize())
    if LAYER_FORMAT[qtype] == "int8":
        layer = Int8Linear(*int8_from_groups(g), g.group)
        assert torch.equal(layer.dequantize(), want)
        assert torch.equal(Int8Linear(*int8_from_groups(g, 16), 16).dequantize(), want)  # finer grid, same weight
        return
    q, s, z = int4_from_groups(g)
    plain = Int4Linear(q[:37], s[:37], z[:37], 32)
    assert plain._cpu_pack is None
    torch.testing.assert_close(plain.dequantize(), want[:37], rtol=0, atol=4e-7 * want.abs().max().item())
    kernel = Int4Linear(q, s, z, 32)
    assert kernel._cpu_pack is not None
    step = (s.abs().max() * 15 + z.abs().max()).item()
    assert (kernel.dequantize() - want).abs().max() < step * 2**-8


@pytest.mark.parametrize(
    ("n", "k", "group", "with_zero", "chunk_rows"),
    [(37, 96, 32, True, 8), (33, 80, 16, False, 5), (5, 64, 64, True, 100), (101, 256, 32, False, 1000)],
)
def test_group_wise_int8_matches_dequantize_then_matmul(monkeypatch, n, k, group, with_zero, chunk_rows):
    """Odd row counts, several chunks with a ragged last one, groups not aligned to the 32 of the kernel."""
    monkeypatch.setattr(qlinear, "_CHUNK_ELEMENTS", chunk_rows * k)
    gen = torch.Generator().manual_seed(n * k)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=gen) * 0.01
    zero = torch.randn(n, k // group, generator=gen) * 0.1 if with_zero else None
    bias = torch.randn(n, generator=gen)
    layer = Int8Linear(q, scale, zero, group, bias)
    w = q.float().view(n, -1, group) * scale[..., None]
    if zero is not None:
        w = w + zero[..., None]
    w = w.view(n, k)
    assert torch.equal(layer.dequantize(), w)
    for m in (1, 7):
        x = torch.randn(2, m, k, generator=gen)
        torch.testing.assert_close(layer(x), x @ w.t() + bias, rtol=1e-5, atol=1e-5)
    assert layer.weight_nbytes() == n * k + (n * k // group) * 4 * (2 if with_zero else 1)


def test_int8_embedding_reads_only_its_rows_and_doubles_as_the_head():
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (50, 64), generator=gen, dtype=torch.int8)
    scale = torch.rand(50, 2, generator=gen) * 0.01
    emb = Int8Embedding(q, scale, None, 32, dtype=torch.bfloat16)
    w = emb.dequantize()
    ids = torch.tensor([[3, 49, 3], [0, 7, 1]])
    assert torch.equal(emb(ids), w[ids].bfloat16())
    h = torch.randn(4, 64, generator=gen)
    torch.testing.assert_close(emb.logits(h), h @ w.t(), rtol=1e-5, atol=1e-5)


def test_per_channel_int8_keeps_its_kernel():
    w = torch.randn(64, 96)
    layer = Int8Linear.quantize(w)
    assert layer.per_channel and layer.scale.shape == (64, 1) and layer._fast(torch.randn(2, 96)) is not None
    with pytest.raises(TypeError, match="Int8Linear.quantize"):
        Int8Linear(w, torch.ones(64))


# ---------------------------------------------------------------------- the loader, on a tiny GGUF

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 256, 4, 2, 512, 256
# Every supported type once, fused parts of one format (int8 with groups 32 and 16), and three
# matrices left dequantized: a qkv mixing int4 and int8 parts (3 tensors), a gate/up with an F32 part.
TYPES = {
    "blk.0.attn_q": "Q4_K",
    "blk.0.attn_k": "Q4_0",
    "blk.0.attn_v": "Q4_1",
    "blk.0.attn_output": "Q8_0",
    "blk.0.ffn_gate": "Q5_K",
    "blk.0.ffn_up": "Q6_K",
    "blk.0.ffn_down": "Q5_0",
    "blk.1.attn_q": "Q4_K",
    "blk.1.attn_k": "Q4_K",
    "blk.1.attn_v": "Q6_K",
    "blk.1.attn_output": "Q5_1",
    "blk.1.ffn_gate": "F32",
    "blk.1.ffn_up": "Q8_0",
    "blk.1.ffn_down": "Q6_K",
    "token_embd": "Q4_1",
    "output": "Q6_K",
}
# d (and dmin) magnitudes that keep the random weights in +-0.1 or so.
_SCALE = {"Q4_K": 2e-4, "Q5_K": 1e-4, "Q6_K": 3e-5}


def write_tiny_gguf(path) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN)}
    shapes |= {"attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN)}
    shapes |= {"ffn_down": (HIDDEN, FFN), "token_embd": (VOCAB, HIDDEN), "output": (VOCAB, HIDDEN)}
    for name, qtype in TYPES.items():
        rows, k = shapes[name.split(".")[-1]]
        if qtype == "F32":
            w.add_tensor(f"{name}.weight", (rng.standard_normal((rows, k)) * 0.05).astype(np.float32))
        elif qtype in GGUF_QUANTIZES:
            data = gguf.quants.quantize((rng.standard_normal((rows, k)) * 0.05).astype(np.float32), T[qtype])
            w.add_tensor(f"{name}.weight", data, raw_dtype=T[qtype])
        else:
            data = random_blocks(qtype, rows, k, rng, _SCALE[qtype], signed=False)
            w.add_tensor(f"{name}.weight", data, raw_dtype=T[qtype])
    for i in range(2):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf-types") / "tiny.gguf"
    write_tiny_gguf(path)
    kw = dict(skip_tokenizer_init=True, max_model_len=64, kv_cache_memory_bytes=4 << 20)
    return LLM(str(path), **kw), LLM(str(path), quantization="none", **kw)


def test_loader_keeps_every_type_packed_with_the_dequantized_weights(tiny_pair, caplog):
    packed, none = tiny_pair
    assert packed.engine.quantization == "gguf" and none.engine.quantization == "none"
    pm, nm = packed.engine.model, none.engine.model
    a0, a1 = pm.layers[0].self_attn, pm.layers[1].self_attn
    m0, m1 = pm.layers[0].mlp, pm.layers[1].mlp
    assert isinstance(a0.qkv_proj, Int4Linear) and isinstance(m0.gate_up_proj, Int8Linear)
    assert m0.gate_up_proj.group_size == 16 and m0.gate_up_proj.zero is not None  # Q5_K's m, zeros for Q6_K
    assert isinstance(a1.qkv_proj, torch.nn.Linear) and isinstance(m1.gate_up_proj, torch.nn.Linear)
    assert isinstance(pm.embed_tokens, Int8Embedding) and isinstance(pm.lm_head, Int8Linear)
    for p_layer, n_weight, exact in (
        (m0.gate_up_proj, nm.layers[0].mlp.gate_up_proj.weight, True),
        (m0.down_proj, nm.layers[0].mlp.down_proj.weight, True),
        (a0.o_proj, nm.layers[0].self_attn.o_proj.weight, True),
        (a1.o_proj, nm.layers[1].self_attn.o_proj.weight, True),
        (m1.down_proj, nm.layers[1].mlp.down_proj.weight, True),
        (pm.embed_tokens, nm.embed_tokens.weight, True),
        (pm.lm_head, nm.lm_head.weight, True),
        (a0.qkv_proj, nm.layers[0].self_attn.qkv_proj.weight, False),  # q/k rows un-permuted like the loader's
    ):
        got = p_layer.dequantize()
        if exact:
            assert torch.equal(got, n_weight.data)
        else:  # bf16 scale and zero in the CPU kernel's layout: 2^-9 of each, at most
            bound = 2**-8 * (15 * p_layer.scale.abs().max() + p_layer.zero.abs().max())
            assert (got - n_weight.data).abs().max() < bound
    ids = list(range(3, 40))
    want = full_logits(none.engine, ids)
    got = full_logits(packed.engine, ids)
    assert (got - want).abs().max() < 0.02 * want.abs().max()  # bf16 activations in the int4 kernel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_loader_counts_and_logs_what_it_kept(tiny_pair, tmp_path, caplog):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    with caplog.at_level(logging.INFO, logger="membound"):
        llm = LLM(str(path), skip_tokenizer_init=True, max_model_len=64, kv_cache_memory_bytes=4 << 20)
    line = next(x for x in caplog.text.splitlines() if "gguf: kept packed" in x)
    kept = line.split("kept packed ")[1].split(";")[0]
    # Kept: layer 0's seven, layer 1's o_proj and down_proj, the embedding and the head. Left: layer 1's
    # qkv (Q4_K + Q4_K + Q6_K: int4 and int8 parts) and ffn_up (fused with an F32 gate).
    assert {t: int(n) for n, t in (x.split() for x in kept.split(", "))} == {
        "Q4_0": 1, "Q4_1": 2, "Q4_K": 1, "Q5_0": 1, "Q5_1": 1, "Q5_K": 1, "Q6_K": 3, "Q8_0": 1
    }  # fmt: skip
    assert "; 4 quantized tensors dequantized instead" in line
    # 2.68 MB vs 5.25 MB in fp32: the two fp32 fused matrices of layer 1 are a third of the model.
    assert llm.engine.memory.weight_bytes < 0.55 * tiny_pair[1].engine.memory.weight_bytes


def test_gguf_quantization_needs_a_gguf_file(tiny_model_dir):
    from membound.errors import ConfigError

    with pytest.raises(ConfigError, match="the model is no GGUF file"):
        LLM(str(tiny_model_dir), quantization="gguf", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 20)
    llm = LLM(str(tiny_model_dir), skip_tokenizer_init=True, max_model_len=64, kv_cache_memory_bytes=1 << 20)
    assert llm.engine.quantization == "none"  # auto: nothing to keep packed in a safetensors folder


# ---------------------------------------------------------------------- SmolLM2, the default model


def test_default_smollm2_runs_packed_and_answers_paris(smollm2, smollm2_none):
    """Default: 210 Q4_1 matrices as int4, the Q8_0 embedding / tied head as group-32 int8."""
    model = smollm2.engine.model
    assert smollm2.engine.quantization == "gguf"
    assert isinstance(model.embed_tokens, Int8Embedding) and model.embed_tokens.group_size == 32
    assert all(isinstance(layer.mlp.down_proj, Int4Linear) for layer in model.layers)
    packed, full = smollm2.engine.memory.weight_bytes, smollm2_none.engine.memory.weight_bytes
    assert full == 538_060_032  # fp32: 134.5M weights x 4 bytes
    # 98.3 MB: int4 nibbles + bf16 scale/zero, 31.9 MB of Q8_0 table, norms; on a bf16 CPU also the
    # head's two nibble planes of that table (35.4 MB), which the logits read instead of it.
    planes = model.embed_tokens.planes_nbytes()
    assert planes in (0, 35_389_440) and packed - planes < 100e6
    assert isinstance(smollm2_none.engine.model.embed_tokens, torch.nn.Embedding)
    assert isinstance(smollm2_none.engine.model.layers[0].mlp.down_proj, torch.nn.Linear)
    out = smollm2.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=32)
    )
    assert "Paris" in out[0].outputs[0].text and out[0].outputs[0].finish_reason == "stop"


def test_packed_smollm2_stays_close_to_the_dequantized_one(smollm2, smollm2_none):
    ids = smollm2.tokenizer.encode("The history of the printing press begins in the fifteenth century, when")
    p = torch.log_softmax(full_logits(smollm2_none.engine, ids), -1)
    q = torch.log_softmax(full_logits(smollm2.engine, ids), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert 0 < kl < 0.01, kl  # bf16 activations and bf16 scale/zero in the int4 kernel; the head is exact
    assert (p.argmax(-1) == q.argmax(-1)).float().mean() >= 0.85
