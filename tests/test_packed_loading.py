"""Packed-first GGUF loading (membound/model/loader.py): the model is built on the meta device, the
packed layers come straight from the file's blocks, and only tensors with no packed form are
dequantized. Checked three ways: which tensors reach a dequantizer, bit-identity with the old path
(everything dequantized, then the packed layers swapped in), and the peak RSS of loading."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from membound.attention import get_backend
from membound.engine.kv_cache import KVCacheSpec
from membound.model.config import rope_inv_freq
from membound.model.llama import RotaryEmbedding
from membound.model.loader import load_model, open_gguf, resolve_model
from membound.quant.gguf_blocks import Groups, load_gguf_packed, load_int4_from_gguf
from membound.quant.linear import Int4Linear, Int8Embedding, Int8Linear, linear_weight_bytes, quantize_model
from tests.conftest import full_logits

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
CPU = torch.device("cpu")


def _load(source, quantization: str, max_positions: int):
    return load_model(source, get_backend("auto", CPU), torch.float32, CPU, max_positions, 0, None, quantization)


def _old_path(source, quantization: str, max_positions: int) -> torch.nn.Module:
    """How the engine loaded before: the whole file dequantized, then the packed layers swapped in."""
    model = _load(source, "none", max_positions).model
    g = open_gguf(source)
    if quantization == "gguf":
        load_gguf_packed(model, g)
    else:
        load_int4_from_gguf(model, g)
        quantize_model(model, "int4", 32)
    return model


def _assert_same(new: torch.nn.Module, old: torch.nn.Module) -> None:
    """Same modules, and every parameter, buffer and CPU-kernel pack equal to the bit."""
    new_mods, old_mods = dict(new.named_modules()), dict(old.named_modules())
    assert {k: type(m) for k, m in new_mods.items()} == {k: type(m) for k, m in old_mods.items()}
    for name, m in new_mods.items():
        mine, theirs = getattr(m, "_cpu_pack", None), getattr(old_mods[name], "_cpu_pack", None)
        assert (mine is None) == (theirs is None), name
        if mine is not None:
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True)), name
    new_t = dict(new.named_parameters()) | dict(new.named_buffers())
    old_t = dict(old.named_parameters()) | dict(old.named_buffers())
    assert new_t.keys() == old_t.keys()
    for name, t in new_t.items():
        assert not t.is_meta, name
        assert t.dtype == old_t[name].dtype and torch.equal(t, old_t[name]), name


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """full_logits on a bare model: the engine fields it reads, and nothing else."""
    c = model.config
    spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16, torch.float32)
    return full_logits(
        types.SimpleNamespace(model=model, config=types.SimpleNamespace(block_size=16), kv_spec=spec, device=CPU), ids
    )


def _greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(_logits(model, ids)[-1].argmax()))
    return ids[-n:]


class Watch:
    """GGUF types handed to gguf's dequantizer; while `strict`, dequantizing a packed form (the
    neutral groups, a packed layer) fails the test."""

    def __init__(self) -> None:
        self.types: list[str] = []
        self.strict = True


@pytest.fixture
def watch(monkeypatch) -> Watch:
    w = Watch()
    real = gguf.quants.dequantize

    def counting(data, qtype):
        if w.strict:
            w.types.append(qtype.name)
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", counting)
    for cls in (Groups, Int4Linear, Int8Linear):

        def refuse(self, *args, _real=cls.dequantize, **kwargs):
            if w.strict:
                raise AssertionError(f"a packed {type(self).__name__} was dequantized while loading")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "dequantize", refuse)
    return w


# ---------------------------------------------------------------------- SmolLM2, the default model


def test_default_model_dequantizes_only_its_norms_and_matches_the_old_path(watch):
    source = resolve_model(None)
    loaded = _load(source, "auto", 256)
    assert loaded.quantization == "gguf"
    # 30 x 2 layer norms and the final norm: F32, no packed form. Not one of the 210 Q4_1 matrices
    # nor the Q8_0 embedding reaches a dequantizer.
    assert sorted(set(watch.types)) == ["F32"] and len(watch.types) == 61
    model = loaded.model
    assert isinstance(model.embed_tokens, Int8Embedding)
    assert all(isinstance(layer.mlp.gate_up_proj, Int4Linear) for layer in model.layers)
    # The rope tables the model computes at construction are real, and the right ones.
    fresh = RotaryEmbedding(rope_inv_freq(loaded.config), 256)
    assert torch.equal(model.rope.cos, fresh.cos) and torch.equal(model.rope.sin, fresh.sin)
    assert loaded.weight_bytes == linear_weight_bytes(model)[0] < 100e6
    watch.strict = False  # the old path dequantizes everything, on purpose
    old = _old_path(source, "gguf", 256)
    _assert_same(model, old)
    ids = [1, 504, 3458, 282, 4649, 314, 253, 1789, 30, 378, 3458, 282, 4649, 314]
    assert torch.equal(_logits(model, ids), _logits(old, ids))
    assert _greedy(model, ids, 8) == _greedy(old, ids, 8)


def test_int4_from_the_files_blocks_dequantizes_no_4bit_tensor(watch):
    loaded = _load(resolve_model(None), "int4", 64)
    # The int4 path keeps the embedding (Q8_0) at full precision; the Q4_1 matrices come from their blocks.
    assert sorted(set(watch.types)) == ["F32", "Q8_0"] and watch.types.count("Q8_0") == 1
    assert sum(isinstance(m, Int4Linear) for m in loaded.model.modules()) == 120
    assert isinstance(loaded.model.embed_tokens, torch.nn.Embedding)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_loading_the_default_model_never_holds_a_dequantized_copy():
    """Peak RSS grows by less than the model's fp32 size while loading: the dequantized Q4_1
    matrices alone (426 MB) would not fit. Measured on a shared 2-core Zen 4: 250-345 MB (about
    98 MB of it the file's mapped pages, ~125 MB the packed layers); the old path (dequantize all,
    then pack) grew by 656 MB under the same script.
    """
    script = """
import json, resource
import torch
import membound.quant.gguf_blocks  # an import, not loading: before the baseline
from membound.attention import get_backend
from membound.model.llama import LlamaForCausalLM
from membound.model.loader import load_model, open_gguf, resolve_model

source = resolve_model(None)
gguf = open_gguf(source)  # the metadata (a tokenizer's worth) is read alike by every path
backend = get_backend("auto", torch.device("cpu"))
with torch.device("meta"):  # the first meta model imports torch's meta kernels (~70 MB): not loading either
    fp32 = 4 * sum(p.numel() for p in LlamaForCausalLM(gguf.config(), backend, 16).parameters())
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loaded = load_model(source, backend, torch.float32, torch.device("cpu"), 1024, 0, gguf, "auto")
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
print(json.dumps({"grown": grown, "fp32": fp32, "weight_bytes": loaded.weight_bytes}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["fp32"] == 538_060_032 and got["weight_bytes"] < 100e6
    assert got["grown"] < got["fp32"], got


# ---------------------------------------------------------------------- small files, every path


def write_small_gguf(path, arch: str, qtype: str, tied: bool) -> None:
    """Two layers, every matrix (and the embedding, and an untied head) in `qtype`; qwen2 adds
    F32 q/k/v biases, which packed layers take from the file after the rest is materialised."""
    rng = np.random.default_rng(1)
    hidden, heads, kv_heads, ffn, vocab = 128, 4, 2, 256, 256
    kv = hidden // heads * kv_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)

    def matrix(name, rows, k):
        data = gguf.quants.quantize((rng.standard_normal((rows, k)) * 0.05).astype(np.float32), T[qtype])
        w.add_tensor(name, data, raw_dtype=T[qtype])

    def vector(name, n, center):
        w.add_tensor(name, (center + 0.1 * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden)
    if not tied:
        matrix("output.weight", vocab, hidden)
    vector("output_norm.weight", hidden, 1.0)
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden)}
    shapes |= {"attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden)}
    shapes |= {"ffn_down": (hidden, ffn)}
    for i in range(2):
        for name, (rows, k) in shapes.items():
            matrix(f"blk.{i}.{name}.weight", rows, k)
            if arch == "qwen2" and name in ("attn_q", "attn_k", "attn_v"):
                vector(f"blk.{i}.{name}.bias", rows, 0.0)
        vector(f"blk.{i}.attn_norm.weight", hidden, 1.0)
        vector(f"blk.{i}.ffn_norm.weight", hidden, 1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    ("arch", "qtype", "tied", "quantization", "packed_type"),
    [
        ("qwen2", "Q8_0", True, "gguf", Int8Linear),  # biases on packed layers, the tied int8 head
        ("llama", "Q4_0", False, "gguf", Int4Linear),  # q/k rows un-permuted, a packed untied head
        ("llama", "Q4_0", False, "int4", Int4Linear),  # from the blocks; embedding and head dequantized
        ("qwen2", "Q4_1", True, "int4", Int4Linear),
    ],
)
def test_small_files_load_packed_first_exactly_as_before(tmp_path, watch, arch, qtype, tied, quantization, packed_type):
    path = tmp_path / "small.gguf"
    write_small_gguf(path, arch, qtype, tied)
    source = resolve_model(str(path))
    new = _load(source, quantization, 64).model
    # What has no packed form on this path: the F32 norms and biases, and for int4 the embedding
    # and head (kept at full precision there, as before).
    assert set(watch.types) == ({"F32"} if quantization == "gguf" else {"F32", qtype})
    qkv = new.layers[1].self_attn.qkv_proj
    assert isinstance(qkv, packed_type) and (qkv.bias is not None) == (arch == "qwen2")
    watch.strict = False
    old = _old_path(source, quantization, 64)
    _assert_same(new, old)
    ids = list(range(5, 60, 3))
    assert torch.equal(_logits(new, ids), _logits(old, ids))


def test_mixed_types_fall_back_to_dequantized_matrices_exactly_as_before(tmp_path, watch):
    """test_gguf_blocks' file: every supported type, plus fused matrices whose parts have no common
    packed format (int4 with int8 parts, one F32 part): only those parts are dequantized."""
    from tests.test_gguf_blocks import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    source = resolve_model(str(path))
    new = _load(source, "gguf", 64).model
    # Layer 1's qkv (Q4_K + Q4_K + Q6_K) and gate/up (F32 + Q8_0), and the F32 norms.
    assert sorted(t for t in watch.types if t != "F32") == ["Q4_K", "Q4_K", "Q6_K", "Q8_0"]
    assert isinstance(new.layers[1].self_attn.qkv_proj, torch.nn.Linear)
    watch.strict = False
    old = _old_path(source, "gguf", 64)
    _assert_same(new, old)
    ids = list(range(3, 40))
    assert torch.equal(_logits(new, ids), _logits(old, ids))
