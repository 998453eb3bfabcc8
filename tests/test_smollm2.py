"""The real default model: the embedded SmolLM2-135M-Instruct Q4_1 GGUF.

Reference numbers come from HF transformers loading the same GGUF
(scripts/make_smollm2_reference.py), stored in tests/data/. Transformers dequantizes the file to
fp32, so those comparisons run on `smollm2_none` (quantization="none"); the default engine keeps
the blocks packed (tests/test_gguf_blocks.py).
"""

from __future__ import annotations

import json

import torch

from membound import SamplingParams
from tests.conftest import DATA, full_logits

REF = json.loads((DATA / "smollm2_q4_1_reference.json").read_text())


def test_gguf_metadata_becomes_model_config(smollm2):
    cfg = smollm2.engine.model_config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.vocab_size == 49152


def test_tokenizer_from_gguf_matches_reference(smollm2):
    assert smollm2.tokenizer.encode(REF["prompt"]) == REF["prompt_token_ids"]


def test_logits_match_transformers(smollm2_none):
    logits = full_logits(smollm2_none.engine, REF["prompt_token_ids"])
    assert logits.argmax(-1).tolist() == REF["argmax_per_position"]
    torch.testing.assert_close(logits.max(-1).values, torch.tensor(REF["max_logit_per_position"]), atol=2e-3, rtol=1e-4)
    last = logits[-1]
    torch.testing.assert_close(last[REF["last_top_ids"]], torch.tensor(REF["last_top_logits"]), atol=2e-3, rtol=1e-4)
    assert last.topk(5).indices.tolist() == REF["last_top_ids"][:5]


def test_greedy_generation_matches_transformers(smollm2_none):
    n = len(REF["greedy_token_ids"])
    out = smollm2_none.generate(REF["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    assert out[0].outputs[0].token_ids == REF["greedy_token_ids"]


def test_chat_answers_paris(smollm2):
    out = smollm2.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=32)
    )
    comp = out[0].outputs[0]
    assert "Paris" in comp.text
    assert comp.finish_reason == "stop"  # ended on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in comp.text
