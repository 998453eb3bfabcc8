"""A HF transformers twin of a membound model (same tensors), for side-by-side comparisons."""

from __future__ import annotations

from membound.engine.llm_engine import LLMEngine
from membound.errors import ConfigError
from membound.model.config import ModelConfig


def hf_llama_kwargs(cfg: ModelConfig, **overrides) -> dict:
    """transformers.LlamaConfig's arguments for a membound model config (Llama with plain RoPE)."""
    base = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    return {**base, **overrides}


def hf_twin(engine: LLMEngine):
    """A transformers LlamaForCausalLM holding the engine's weights (fused projections split back)."""
    import transformers

    cfg = engine.model_config
    if cfg.architecture != "LlamaForCausalLM" or cfg.rope_scaling or cfg.attention_bias or cfg.qk_norm:
        raise ConfigError("--compare hf supports Llama models with plain RoPE (e.g. SmolLM2, Llama 2)")
    hf_cfg = transformers.LlamaConfig(**hf_llama_kwargs(cfg))
    hf = transformers.LlamaForCausalLM(hf_cfg).to(engine.dtype).to(engine.device).eval()
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sd = {}
    for name, p in engine.model.named_parameters():
        name = name.replace(".inner.", ".")  # a batch-invariant model's tiled layers (layers.invariant.RowTiled)
        if "qkv_proj" in name:
            for part, t in zip(("q_proj", "k_proj", "v_proj"), p.split([q, kv, kv]), strict=True):
                sd["model." + name.replace("qkv_proj", part)] = t
        elif "gate_up_proj" in name:
            for part, t in zip(("gate_proj", "up_proj"), p.chunk(2), strict=True):
                sd["model." + name.replace("gate_up_proj", part)] = t
        elif name.startswith("lm_head"):
            sd[name] = p
        else:
            sd["model." + name] = p
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or not all("lm_head" in m or "rotary" in m for m in missing):
        raise RuntimeError(f"weights did not map onto transformers' Llama: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf
