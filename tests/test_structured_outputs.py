"""Structured outputs (xgrammar) on the real SmolLM2: every constrained output parses and validates;
free requests in the same batch are unchanged (issue 17)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from membound import SamplingParams
from membound.errors import InvalidRequestError
from membound.sampling_params import StructuredOutputsParams

S = {"type": "string", "maxLength": 24}
INT = {"type": "integer", "minimum": -1000, "maximum": 1000}  # bounded: a weak model can write digits forever
NUM = {"type": "number", "minimum": -100, "maximum": 100}


def obj(required: dict, optional: dict | None = None) -> dict:
    return {"type": "object", "properties": {**required, **(optional or {})}, "required": list(required)}


SCHEMAS = [
    obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"ok": {"type": "boolean"}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"n": {"type": "integer", "minimum": 3, "maximum": 9}}),
    obj({"x": NUM, "y": NUM}),
    obj({"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}),
    obj({"user": obj({"id": INT}, {"email": S})}),
    obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    obj({"title": S}, {"subtitle": S}),  # an optional key
    {"type": "array", "items": INT, "minItems": 2, "maxItems": 4},
    obj({"points": {"type": "array", "items": obj({"x": INT}), "maxItems": 2}}),
    obj({"status": {"enum": ["open", "closed"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    obj({"ratio": {"type": "number", "minimum": 0, "maximum": 1}}),
    obj({"a": obj({"b": obj({"c": {"type": "boolean"}})})}),
    obj({"items": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 3}}),
    obj({"city": S, "country": S, "population": {"type": "integer", "minimum": 1, "maximum": 10**9}}),
    obj({"answer": {"type": ["string", "null"], "maxLength": 10}}),
    obj({"level": {"type": "integer", "enum": [1, 2, 3]}, "label": S}),
    obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}),
]
PROMPT = "Answer with JSON only.\nQ: describe something.\nA: "


def _run_all(engine, requests: dict[str, tuple[str, SamplingParams]]) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0]
    return outs


@pytest.fixture(scope="module")
def invariant_engine():
    """batch_invariant, so a free request's tokens alone and in a batch can be compared bit for bit:
    a difference can then only come from the constrained rows' masks leaking into it."""
    from membound.config import EngineConfig
    from membound.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(max_model_len=512, kv_cache_memory_bytes=128 << 20, batch_invariant=True))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schemas_always_validate_and_free_requests_in_the_batch_are_unchanged(invariant_engine, temperature):
    engine = invariant_engine
    free = {f"free{i}": (p, SamplingParams(max_tokens=12, temperature=0)) for i, p in enumerate(["Hi", "The sky is"])}
    alone = _run_all(engine, free)
    reqs = {}
    for i, schema in enumerate(SCHEMAS):
        so = StructuredOutputsParams(json=schema)
        reqs[f"s{i}"] = (PROMPT, SamplingParams(max_tokens=200, temperature=temperature, seed=i, structured_outputs=so))
    outs = _run_all(engine, {**reqs, **free})
    assert len(SCHEMAS) == 20
    for i, schema in enumerate(SCHEMAS):
        out = outs[f"s{i}"]
        assert out.finish_reason == "stop", (i, out.text)
        jsonschema.validate(json.loads(out.text), schema)
    for rid in free:
        assert outs[rid].token_ids == alone[rid].token_ids  # constrained neighbours change nothing


def test_regex_choice_json_object_and_grammar(smollm2):
    engine = smollm2.engine
    so = StructuredOutputsParams
    reqs = {
        "regex": ("My phone number is ", so(regex=r"\(\d{3}\) \d{3}-\d{4}")),
        "choice": ("Is the sky blue? Answer: ", so(choice=["yes", "no", "it depends (sometimes)"])),
        "object": ("Give a JSON object about a cat: ", so(json_object=True)),
        "grammar": ("Is it raining? ", so(grammar='root ::= ("yes" | "no") ", because " ("it is" | "it is not")')),
    }
    for temperature in (0.0, 1.5):
        params = {
            k: SamplingParams(max_tokens=60, temperature=temperature, seed=3, structured_outputs=s)
            for k, (_, s) in reqs.items()
        }
        outs = _run_all(engine, {k: (p, params[k]) for k, (p, _) in reqs.items()})
        assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", outs["regex"].text), outs["regex"].text
        assert outs["choice"].text in ("yes", "no", "it depends (sometimes)")
        if outs["object"].finish_reason == "stop":  # free-form objects may run to max_tokens
            assert isinstance(json.loads(outs["object"].text), dict)
        else:
            assert outs["object"].text.startswith("{")
        assert re.fullmatch(r"(yes|no), because it is( not)?", outs["grammar"].text), outs["grammar"].text


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "JSON schema could not be compiled"),
        (dict(regex="(unclosed"), "regex could not be compiled"),
        (dict(grammar="root ::= undefined_rule"), "grammar could not be compiled"),
    ],
)
def test_a_grammar_that_does_not_compile_is_the_requests_error(smollm2, spec, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        smollm2.engine.add_request("bad", "x", SamplingParams(structured_outputs=StructuredOutputsParams(**spec)))
    assert "bad" not in smollm2.engine.request_ids()


def test_structured_outputs_params_take_exactly_one_kind():
    with pytest.raises(InvalidRequestError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(InvalidRequestError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(InvalidRequestError, match="choice must be"):
        StructuredOutputsParams(choice=[])


def test_the_openai_sdk_parses_a_pydantic_response_format_and_bad_schemas_are_400s(tmp_path):
    import httpx
    import openai
    from pydantic import BaseModel, Field

    from tests.server_utils import ServerProcess

    class City(BaseModel):
        name: str = Field(max_length=24)
        population: int = Field(ge=1, le=10**9)
        coastal: bool

    server = ServerProcess(["--max-model-len", "512", "--kv-cache-memory", "32"], tmp_path / "s.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "Describe Lisbon as JSON."}]
        done = client.chat.completions.parse(model=None, messages=msgs, response_format=City, max_tokens=120)
        city = done.choices[0].message.parsed
        assert isinstance(city, City) and 1 <= city.population <= 10**9
        # vLLM's structured_outputs field, streamed: the chunks add up to a match.
        text = "".join(
            ch.choices[0].delta.content or ""
            for ch in client.chat.completions.create(
                model=None, messages=msgs, max_tokens=20, stream=True,
                extra_body={"structured_outputs": {"regex": "[A-Z][a-z]{2,8}"}},
            )
            if ch.choices
        )  # fmt: skip
        assert re.fullmatch("[A-Z][a-z]{2,8}", text), text
        # json_object on completions; then what cannot be compiled or is malformed: 400 naming it.
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "JSON:", "max_tokens": 60, "response_format": {"type": "json_object"}},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("{"), r.text
        for body, needle in [
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
            ({"response_format": {"type": "yaml"}}, "must be text, json_object or json_schema"),
            ({"structured_outputs": {"regex": "("}}, "regex could not be compiled"),
            ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of"),
            ({"structured_outputs": {"jsn": {}}}, "unknown fields"),
        ]:
            r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": msgs, **body}, timeout=60)
            assert r.status_code == 400 and needle in r.json()["error"]["message"], (body, r.text)
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        assert server.stop() == 0, server.log_tail()


def test_min_tokens_is_refused_with_structured_outputs():
    with pytest.raises(InvalidRequestError, match="min_tokens cannot be combined"):
        SamplingParams(min_tokens=3, structured_outputs=StructuredOutputsParams(choice=["a"]))


def test_constrained_requests_under_async_scheduling(smollm2):
    """With launch-ahead on (CUDA's default), a step's forward is launched before the step in flight
    is processed, grammars or not; the masks fill after it, from matchers that have seen its tokens:
    outputs still match their grammar, and equal the same requests without launch-ahead."""
    engine = smollm2.engine
    reqs = {}
    for i in range(4):
        so = StructuredOutputsParams(json=SCHEMAS[i])
        reqs[f"j{i}"] = ("JSON:", SamplingParams(max_tokens=80, temperature=1.0, seed=i, structured_outputs=so))
    reqs["free"] = ("Once upon a time", SamplingParams(max_tokens=120, temperature=0, ignore_eos=True))
    sync = _run_all(engine, reqs)
    engine.async_scheduling = True
    try:
        before = engine.stats()
        outs = _run_all(engine, reqs)
        for i in range(4):
            assert outs[f"j{i}"].text == sync[f"j{i}"].text
            jsonschema.validate(json.loads(outs[f"j{i}"].text), SCHEMAS[i])
        after = engine.stats()
        # Every step but the first was launched ahead, those with constrained rows too.
        steps = after.num_steps - before.num_steps
        assert after.num_steps_launched_ahead - before.num_steps_launched_ahead == steps - 1 > 100
    finally:
        engine.async_scheduling = False


def test_a_slow_schema_compiles_off_the_engine_thread(tmp_path):
    """A deeply nested schema takes xgrammar about a second to compile: other streams keep their pace."""
    import threading
    import time

    import httpx

    from tests.server_utils import ServerProcess

    deep = {"type": "boolean"}
    for _ in range(250):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    server = ServerProcess(["--max-model-len", "512", "--kv-cache-memory", "32"], tmp_path / "s.log")
    try:
        times: list[float] = []

        def stream() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())

        t = threading.Thread(target=stream)
        t.start()
        while len(times) < 20:
            time.sleep(0.01)
        t0 = time.perf_counter()
        body = {"prompt": "JSON:", "max_tokens": 8, "structured_outputs": {"json": deep}}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        t1 = time.perf_counter()
        t.join(120)
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith('{"a"'), r.text[:200]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b >= t0 and a <= t1]
        print(f"deep schema request {t1 - t0:.2f}s; the stream's max gap meanwhile {max(gaps):.3f}s")
        assert t1 - t0 > 0.3 and max(gaps) < 0.5 * (t1 - t0), (t1 - t0, max(gaps))
    finally:
        assert server.stop() == 0, server.log_tail()
