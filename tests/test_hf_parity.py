"""membound's decoder against HF transformers on the same random weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from membound import LLM, SamplingParams
from tests.conftest import LLAMA3_ROPE, full_logits, save_tiny_hf_model

CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama3-rope-scaling": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 24}),
    "qwen2-qkv-bias": ("qwen2", {"num_key_value_heads": 1}),
    "qwen3-qk-norm": ("qwen3", {"tie_word_embeddings": True}),
    # Gemma 3: local and global layers (window 8 < the prompts), each with its RoPE base (the global one
    # linearly scaled), q/k norms, four norms per layer, GeGLU, a scale other than head_dim's, tied head.
    "gemma3-interleaved": (
        "gemma3",
        {
            "num_hidden_layers": 4,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            "sliding_window": 8,
            "query_pre_attn_scalar": 24,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        },
    ),
    "smollm2-shape": (
        "llama",
        {
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "hidden_size": 96,
            "tie_word_embeddings": True,
            "rope_theta": 100000.0,
        },
    ),
}

DECODE_STEPS = 32


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_hf_model(path, family, **overrides)
    llm = LLM(str(path), skip_tokenizer_init=True, kv_cache_memory_bytes=8 << 20, block_size=8)
    return request.param, hf, llm


def test_architecture_features_are_exercised(pair):
    name, hf, llm = pair
    cfg = llm.engine.model_config
    assert cfg.attention_bias == (name == "qwen2-qkv-bias")
    assert cfg.qk_norm == (name in ("qwen3-qk-norm", "gemma3-interleaved"))
    assert cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    if name == "mistral-sliding-window":
        assert cfg.sliding_window == 24
    if name == "llama3-rope-scaling":
        assert cfg.rope_scaling["rope_type"] == "llama3"
    if name == "gemma3-interleaved":
        assert cfg.gemma and cfg.qk_norm and cfg.hidden_act == "gelu_pytorch_tanh"
        assert [cfg.layer_window(i) for i in range(4)] == [8, 8, None, 8]
        assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling["factor"]) == (1e6, 1e4, 2.0)
        assert cfg.attention_scale == 24**-0.5


def test_prefill_logits_match_hf(pair):
    _, hf, llm = pair
    ids = torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = full_logits(llm.engine, ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_greedy_decode_matches_hf(pair):
    """32 greedy steps through the paged cache: same tokens as HF generate, same logprobs."""
    _, hf, llm = pair
    prompt = torch.randint(0, 256, (13,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=DECODE_STEPS,
            min_new_tokens=DECODE_STEPS,
            do_sample=False,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=DECODE_STEPS, ignore_eos=True, logprobs=3))
    comp = out[0].outputs[0]
    assert comp.token_ids == ref
    # Logprobs at every decode step against HF's teacher-forced logits on the same sequence.
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ref])).logits[0]
    ref_lp = logits.log_softmax(-1)[len(prompt) - 1 : -1]
    got = torch.tensor([lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids, strict=True)])
    want = ref_lp.gather(1, torch.tensor(ref)[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_stays_close_to_fp32(tmp_path, dtype):
    hf = save_tiny_hf_model(tmp_path, "llama")
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, dtype=dtype, kv_cache_memory_bytes=4 << 20)
    assert llm.engine.kv_spec.dtype == getattr(torch, dtype)
    assert next(llm.engine.model.parameters()).dtype == getattr(torch, dtype)
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = full_logits(llm.engine, ids)
    # Half precision's own error: bf16 rounds to 8 bits. With the three-op rotation (x cos + roll(x)
    # sin, fewer roundings than the eight-op one) one logit in 10k lands 0.17 off here, where the old
    # rotation kept all under 0.15; why this one does is not understood (issue 15's notes).
    torch.testing.assert_close(ours, ref, atol=0.2, rtol=0.05)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1))
    comp = out[0].outputs[0]
    assert all(torch.isfinite(torch.tensor(lp[t].logprob)) for lp, t in zip(comp.logprobs, comp.token_ids, strict=True))


def test_gemma3_on_the_triton_kernels(tmp_path):
    """Gemma 3's per-layer windows and RoPE tables through the Triton attention and fused RoPE/KV-write
    kernels (the interpreter on CPU): the same greedy tokens as HF, fp32 logits within 1e-4."""
    pytest.importorskip("triton")
    family, overrides = CASES["gemma3-interleaved"]
    hf = save_tiny_hf_model(tmp_path, family, **overrides)
    llm = LLM(
        str(tmp_path), skip_tokenizer_init=True, attention_backend="triton", block_size=16,
        kv_cache_memory_bytes=4 << 20, max_num_seqs=4, max_num_batched_tokens=16,  # prompt in chunks
    )  # fmt: skip
    assert llm.engine.model.layer_kernels.name == "triton"
    prompt = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
        ref_logits = hf(torch.tensor([prompt])).logits[0]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert out[0].outputs[0].token_ids == ref
    torch.testing.assert_close(full_logits(llm.engine, prompt), ref_logits, atol=1e-4, rtol=1e-4)
