"""GGUF loading for each architecture: a tiny HF model written as GGUF the way llama.cpp's
converter writes it (llama.cpp tensor names; q/k rows permuted for the llama arch), then
loaded by membound and compared with the HF model's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from membound import LLM
from tests.conftest import LLAMA3_ROPE, full_logits, save_tiny_hf_model

gguf = pytest.importorskip("gguf")

NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reordering of q/k rows for its interleaved rope."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, arch: str, path, extra: dict | None = None) -> None:
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(c.rope_parameters.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    for name, t in hf.state_dict().items():
        a = t.float().numpy().copy()
        if name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            out = "output.weight"
        elif name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        else:
            _, _, idx, rest = name.split(".", 3)
            stem, suffix = rest.rsplit(".", 1)
            out = f"blk.{idx}.{NAMES[stem]}.{suffix}"
            if arch == "llama" and stem in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if "q_proj" in stem else c.num_key_value_heads
                a = llama_cpp_permute(a, heads)
        w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    ("family", "arch", "overrides"),
    [
        ("llama", "llama", {}),
        ("qwen2", "qwen2", {}),
        ("qwen3", "qwen3", {"tie_word_embeddings": True}),
    ],
)
def test_gguf_of_each_architecture_matches_hf(tmp_path, family, arch, overrides):
    hf = save_tiny_hf_model(tmp_path / "hf", family, **overrides)
    path = tmp_path / "tiny.gguf"
    write_gguf(hf, arch, path)
    llm = LLM(str(path), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    cfg = llm.engine.model_config
    assert cfg.attention_bias == (family == "qwen2") and cfg.qk_norm == (family == "qwen3")
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(full_logits(llm.engine, ids), ref, atol=1e-4, rtol=1e-4)


def test_gguf_rope_freqs_carry_llama3_scaling(tmp_path):
    """llama.cpp stores Llama 3.1 rope scaling as a `rope_freqs` tensor of per-dimension divisors."""
    from membound.model.config import ModelConfig, rope_inv_freq

    rope = LLAMA3_ROPE
    hf = save_tiny_hf_model(tmp_path / "hf", "llama", rope_parameters=rope)
    cfg = ModelConfig.from_hf(hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    unscaled = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    plain = ModelConfig.from_hf(
        hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"], "rope_parameters": unscaled}
    )
    factors = rope_inv_freq(plain) / rope_inv_freq(cfg)
    assert not torch.allclose(factors, torch.ones_like(factors))  # the scaling does something here
    path = tmp_path / "tiny.gguf"
    write_gguf(hf, "llama", path, extra={"rope_freqs.weight": factors.numpy()})
    llm = LLM(str(path), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    ids = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(full_logits(llm.engine, ids), ref, atol=1e-4, rtol=1e-4)
