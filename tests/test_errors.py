"""Bad input gets a clear error that says what was wrong and what is allowed,
and the engine keeps serving its other requests."""

from __future__ import annotations

import json

import pytest

from membound import LLM, ConfigError, InvalidRequestError, ModelLoadError, SamplingParams
from tests.conftest import write_tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> LLM:
    path = write_tiny_config(tmp_path_factory.mktemp("cfg"))
    return LLM(
        str(path), load_format="dummy", skip_tokenizer_init=True, max_model_len=64, kv_cache_memory_bytes=1 << 20
    )


def test_prompt_longer_than_max_model_len_names_both_numbers(tiny):
    with pytest.raises(InvalidRequestError, match=r"prompt has 80 tokens but max_model_len is 64"):
        tiny.generate([1] * 80)


def test_engine_keeps_serving_after_a_bad_request(tiny):
    eng = tiny.engine
    eng.add_request("good", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    with pytest.raises(InvalidRequestError):
        eng.add_request("bad", [1] * 100, SamplingParams())
    with pytest.raises(InvalidRequestError, match=r"token ids must be integers in \[0, 128\)"):
        eng.add_request("bad2", [1, 999], SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        eng.add_request("bad3", [], SamplingParams())
    with pytest.raises(InvalidRequestError, match="already in use"):
        eng.add_request("good", [1], SamplingParams())
    done = []
    while eng.has_unfinished_requests():
        done += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in done] == ["good"]
    assert len(done[0].outputs[0].token_ids) == 5


def test_generate_with_one_bad_prompt_queues_nothing(tiny):
    with pytest.raises(InvalidRequestError):
        tiny.generate([[1, 2], [1] * 200])
    assert not tiny.engine.has_unfinished_requests()
    assert tiny.engine.stats().num_free_blocks == tiny.engine.stats().num_total_blocks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1}, r"temperature must be in \[0, 100\]"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -5}, r"top_k must be an integer >= 1, or 0 / -1"),
        ({"min_p": 2}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0}, r"repetition_penalty must be in \(0, 10\]"),
        ({"presence_penalty": 3}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -2.5}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"max_tokens": 0}, r"max_tokens must be an integer >= 1"),
        ({"logprobs": 50}, r"logprobs must be an integer in \[0, 20\]"),
        ({"stop": [""]}, r"stop must be a non-empty string"),
        ({"temperature": "hot"}, r"temperature must be a number"),
        ({"seed": 1.5}, r"seed must be an integer"),
        ({"min_tokens": 10, "max_tokens": 5}, r"min_tokens \(10\) must not exceed max_tokens \(5\)"),
    ],
)
def test_invalid_sampling_params_say_which_and_the_range(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    path = write_tiny_config(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match="supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        LLM(str(path), load_format="dummy", skip_tokenizer_init=True)


def test_missing_model_files(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLM(str(tmp_path / "empty"))
    path = write_tiny_config(tmp_path / "noweights")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        LLM(str(path), skip_tokenizer_init=True)


def test_corrupt_model_files(tmp_path):
    path = write_tiny_config(tmp_path / "corrupt")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        LLM(str(path), skip_tokenizer_init=True)
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        LLM(str(bad_gguf))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        LLM(str(tmp_path / "badjson"))
    missing = write_tiny_config(tmp_path / "missing")
    cfg = json.loads((missing / "config.json").read_text())
    del cfg["hidden_size"]
    (missing / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="missing the required field 'hidden_size'"):
        LLM(str(missing), load_format="dummy", skip_tokenizer_init=True)


def test_checkpoint_with_wrong_shapes(tmp_path):
    from tests.conftest import save_tiny_hf_model

    save_tiny_hf_model(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="has shape"):
        LLM(str(tmp_path), skip_tokenizer_init=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization must be in \(0, 1\]"),
        ({"dtype": "int3"}, "dtype must be auto, float32, float16, bfloat16"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda"),
        ({"load_format": "pickle"}, "load_format must be auto or dummy"),
        ({"max_num_batched_tokens": 8, "max_num_seqs": 16}, r"max_num_batched_tokens \(8\) must be at least"),
    ],
)
def test_invalid_engine_config(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LLM(str(write_tiny_config(tmp_path)), load_format=kwargs.pop("load_format", "dummy"), **kwargs)


def test_kv_budget_too_small_for_one_sequence(tmp_path):
    with pytest.raises(ConfigError, match="needs more; lower max_model_len"):
        LLM(str(write_tiny_config(tmp_path)), load_format="dummy", skip_tokenizer_init=True, kv_cache_memory_bytes=1024)


def test_prompt_over_the_budget_without_chunked_prefill(tmp_path):
    llm = LLM(
        str(write_tiny_config(tmp_path)),
        load_format="dummy",
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=1 << 20,
        max_model_len=128,
        enable_chunked_prefill=False,
        max_num_batched_tokens=32,
        max_num_seqs=4,
    )
    with pytest.raises(InvalidRequestError, match="40 tokens but max_num_batched_tokens is 32"):
        llm.generate([1] * 40)
    assert len(llm.generate([1] * 30, SamplingParams(max_tokens=3))[0].outputs[0].token_ids) == 3


def test_bad_prompt_types_and_seed_range(tiny):
    with pytest.raises(InvalidRequestError, match="a prompt must be a string or a list of token ids"):
        tiny.engine.add_request("x", 3.5)
    with pytest.raises(InvalidRequestError, match="token ids must be integers"):
        tiny.generate([[1.5, 2]])
    with pytest.raises(InvalidRequestError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        SamplingParams(seed=2**70)
    with pytest.raises(InvalidRequestError, match="stop strings need a tokenizer"):
        tiny.generate([1, 2], SamplingParams(stop=["x"]))
    assert not tiny.engine.has_unfinished_requests()


def test_interrupted_generate_leaves_nothing_queued(tiny, monkeypatch):
    calls = {"n": 0}
    real_step = tiny.engine.step

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(tiny.engine, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        tiny.generate([[1, 2], [3, 4]], SamplingParams(max_tokens=20, ignore_eos=True))
    assert not tiny.engine.has_unfinished_requests()
    assert tiny.engine.stats().num_free_blocks == tiny.engine.stats().num_total_blocks


def test_a_chat_template_that_raises_is_an_invalid_request():
    from membound.model.registry import default_model_path
    from membound.model.tokenizer import Tokenizer

    tok = Tokenizer.from_model_path(default_model_path())
    tok.hf.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(InvalidRequestError, match="chat template rejected these messages: .*must alternate") as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert e.value.param == "messages"
