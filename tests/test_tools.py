"""Tool calling (issue 17): rendering, the three call formats, streaming, and forced choices
through a real server on SmolLM2 (whose template knows no tools: the Hermes preamble path)."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from membound.errors import InvalidRequestError
from membound.model.tokenizer import Tokenizer
from membound.server import tools
from membound.server.protocol import ChatCompletionRequest
from membound.server.serving import render_conversation
from tests.server_utils import ServerProcess

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
BOOK = {
    "type": "function",
    "function": {
        "name": "book_table",
        "description": "Book a restaurant table",
        "parameters": {
            "type": "object",
            "properties": {
                "restaurant": {"type": "string", "maxLength": 30},
                "guests": {"type": "integer", "minimum": 1, "maximum": 12},
                "when": {"type": "object", "properties": {"day": {"type": "string"}, "hour": {"type": "integer"}}},
                "wishes": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
            },
            "required": ["restaurant", "guests", "when"],
        },
    },
}
NOARGS = {"type": "function", "function": {"name": "ping"}}  # no parameters: any object
TOOLS = [WEATHER, BOOK, NOARGS]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather like in Paris? And book a table for two at Chez Paul."}]


# ------------------------------------------------------------------------------------ parsers


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    [
        ("hermes", "plain text", "plain text", []),
        (
            "hermes",
            'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "g", "arguments": {}}</tool_call>',
            "Sure.\n",
            [("f", {"a": 1}), ("g", {})],
        ),
        ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": [1, 2]}}', None, [("f", {"a": [1, 2]})]),  # cut
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": }</tool_call>', None, []),  # malformed: text
        ("llama3_json", '{"name": "f", "parameters": {"x": "y"}}', None, [("f", {"x": "y"})]),
        (
            "llama3_json",
            '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"k": 2}}',
            None,
            [("f", {}), ("g", {"k": 2})],
        ),
        ("llama3_json", "The answer is {42}", "The answer is {42}", []),
        ("llama3_json", '{"name": "f", "parameters": {}} and then text', None, []),
        ("mistral", 'ok [TOOL_CALLS][{"name": "f", "arguments": {"q": "x"}}]', "ok ", [("f", {"q": "x"})]),
        ("mistral", '[TOOL_CALLS]f[ARGS]{"q": 1}[TOOL_CALLS]g[ARGS]{}', None, [("f", {"q": 1}), ("g", {})]),
        ("mistral", "[TOOL_CALLS]Sure, here you go: [ARGS]{}", None, []),  # not a function of ours
        ("mistral", "[TOOL_CALLS]no args marker", None, []),
        (
            "hermes",
            'A <tool_call>{"name": "f", "arguments": {}}</tool_call> B\n<tool_call>{"name": "g", "arguments": "{}"}'
            "</tool_call>\nC",
            "A  BC",  # the text around calls stays
            [("f", {}), ("g", {})],
        ),
        ("hermes", '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>', None, []),
        ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', None, []),
        ("hermes", '<tool_call>{"name": "Alice", "arguments": {}}</tool_call>', None, []),  # unknown name
        ("llama3_json", '{"name": "Alice", "age": 30}', None, []),  # a JSON answer, not a call
        ("hermes", "<tool_call>" + "[" * 5000, None, []),  # deeper than Python's JSON decoder goes
    ],
)
def test_parsers_read_each_familys_format_and_leave_malformed_calls_as_text(parser, text, content, calls):
    got_content, got = tools.parse(parser, text, frozenset({"f", "g"}))
    if not calls:  # nothing parsed: the whole text is content, nothing dropped
        assert got == [] and got_content == text
        return
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)


def _stream(parser: str, text: str, cuts: list[int]) -> tuple[str, list]:
    sp = tools.StreamParser(parser, frozenset({"f"}))
    out, last = "", 0
    for c in sorted(cuts) + [len(text)]:
        out += sp.feed(text[last:c])
        last = c
    rest, calls = sp.finish()
    return out + rest, calls


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["hermes", "llama3_json", "mistral"]),
    st.text(alphabet="ab <>{}[]_|\n", max_size=12),
    st.booleans(),
    st.lists(st.integers(0, 200), max_size=8),
)
def test_streamed_content_and_calls_add_up_to_the_whole_output(parser, prefix, with_call, cuts):
    call = {
        "hermes": '<tool_call>\n{"name": "f", "arguments": {"a": "<tool"}}\n</tool_call>\nafter',
        "llama3_json": '<|python_tag|>{"name": "f", "parameters": {"a": "<tool"}}',
        "mistral": '[TOOL_CALLS][{"name": "f", "arguments": {"a": "<tool"}}]',
    }[parser]
    text = (prefix if parser != "llama3_json" or not with_call else "") + (call if with_call else "")
    content, calls = tools.parse(parser, text, frozenset({"f"}))
    streamed, scalls = _stream(parser, text, [c for c in cuts if c <= len(text)])
    assert streamed == (content or "" if calls else text)
    assert [(c.name, c.arguments) for c in scalls] == [(c.name, c.arguments) for c in calls]


def test_stream_parser_holds_back_only_what_may_start_a_call():
    sp = tools.StreamParser("hermes", frozenset({"f"}))
    assert sp.feed("Hello <tool") == "Hello "  # "<tool" may begin "<tool_call>"
    assert sp.feed("s are useful") == "<tools are useful"  # it did not
    assert sp.feed(' <tool_call>{"name": "f", "arguments": {}}') == " "
    assert sp.feed("</tool_call>") == ""
    rest, calls = sp.finish()
    assert rest == "" and [c.name for c in calls] == ["f"]


# ------------------------------------------------------------------------------------ rendering and checks

# A template in the Hermes style written for this test: it shows tools, past calls and results.
NATIVE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t.function | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONV = ASK + [
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18}'},
    {"role": "tool", "tool_call_id": "c2", "content": "booked"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from membound.model.registry import default_model_path

    return Tokenizer.from_model_path(str(default_model_path()))


def test_a_template_that_knows_tools_gets_them_and_the_calls_arguments_as_objects(tok, monkeypatch):
    monkeypatch.setattr(tok.hf, "chat_template", NATIVE)
    assert tools.pick_parser(NATIVE) == "hermes"
    body = ChatCompletionRequest.model_construct(messages=CONV, tools=[WEATHER])
    defs, choice = tools.checked_tools(body.checked_tools(), None)
    assert choice == "auto"
    text = render_conversation(tok, body.checked_messages(), defs, True)
    assert json.dumps(defs[0]["function"]) in text  # the template's own rendering of the tool
    # arguments reach the template as an object (tojson gives {"city": "Paris"}, not a quoted string)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert '<|im_start|>tool\n{"temp": 18}<|im_end|>' in text and "You may call functions" not in text


def test_a_template_without_tools_gets_the_hermes_preamble_and_tool_turns_as_tags(tok):
    assert not tools.template_knows_tools(tok.chat_template) and tools.pick_parser(tok.chat_template) == "hermes"
    body = ChatCompletionRequest.model_construct(messages=CONV, tools=[WEATHER, NOARGS])
    defs, _ = tools.checked_tools(body.checked_tools(), None)
    text = render_conversation(tok, body.checked_messages(), defs, True)
    assert text.startswith("<|im_start|>system\nYou may call functions") and json.dumps(WEATHER["function"]) in text
    assert '{"name": "ping", "parameters": {"type": "object", "properties": {}}}' in text  # a default schema
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    # consecutive results are one user turn (templates may insist that roles alternate)
    assert text.count("<|im_start|>user") == 2
    assert '<tool_response>\n{"temp": 18}\n</tool_response>\n<tool_response>\nbooked\n</tool_response>' in text


@pytest.mark.parametrize(
    ("template", "parser"),
    [
        ("{% for t in tools %}[TOOL_CALLS]{% endfor %}", "mistral"),
        ('{% if tools %}{"name": name, "parameters": ...}<|python_tag|>{% endif %}', "llama3_json"),
        ("{% if tools %}<tool_call>{% endif %}", "hermes"),
        ("{{ messages }}", "hermes"),
        (None, "hermes"),
    ],
)
def test_the_parser_follows_the_template(template, parser):
    assert tools.pick_parser(template) == parser
    assert tools.pick_parser(template, "mistral") == "mistral"
    with pytest.raises(ValueError, match="unknown tool call parser"):
        tools.pick_parser(template, "xml")


@pytest.mark.parametrize(
    ("tool_list", "choice", "needle"),
    [
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among tools (get_weather)"),
        ([WEATHER, WEATHER], None, "defined twice"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "letters, digits"),
        ([], "required", "needs tools"),
        ([], "auto", "needs tools"),
        ([{"type": "function", "function": {"name": "say", "parameters": {"type": "string"}}}], None, "of an object"),
    ],
)
def test_inconsistent_tools_are_refused_by_name(tool_list, choice, needle):
    body = ChatCompletionRequest.model_validate({"messages": ASK, "tools": tool_list, "tool_choice": choice})
    with pytest.raises(InvalidRequestError, match=re.escape(needle)):
        tools.checked_tools(body.checked_tools(), body.tool_choice)


# ------------------------------------------------------------------------------------ server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(["--max-model-len", "2048", "--kv-cache-memory", "128"], tmp_path_factory.mktemp("t") / "log")
    yield s
    assert s.stop() == 0, s.log_tail()


def _chat(server, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": ASK, "max_tokens": 120, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _chat_stream(server, **body) -> tuple[str | None, list[dict], str]:
    """Streamed deltas put back together as a client does: content, calls by index, finish reason."""
    content, calls, finish = None, {}, None
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={"messages": ASK, "max_tokens": 120, "stream": True, **body},
        timeout=300,
    ) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            (choice,) = json.loads(line[6:])["choices"]
            d = choice["delta"]
            if d.get("content"):
                content = (content or "") + d["content"]
            indexes = [tc["index"] for tc in d.get("tool_calls", [])]
            assert len(indexes) == len(set(indexes)), d  # SDKs merge entries by index across chunks only
            for tc in d.get("tool_calls", []):
                c = calls.setdefault(tc["index"], {"arguments": ""})
                c.update({k: tc[k] for k in ("id", "type") if k in tc})
                f = tc.get("function", {})
                c["name"] = f.get("name", c.get("name"))
                c["arguments"] += f.get("arguments", "")
            finish = choice["finish_reason"] or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.slow
@pytest.mark.parametrize("name", ["get_weather", "book_table", "ping"])
def test_a_named_choice_always_calls_that_function_with_valid_arguments(server, name):
    choice = {"type": "function", "function": {"name": name}}
    for temperature, seed in ((0, None), (1.0, 1), (1.0, 2)):
        out = _chat(server, tools=TOOLS, tool_choice=choice, temperature=temperature, seed=seed)["choices"][0]
        msg = out["message"]
        assert out["finish_reason"] == "stop" and msg["content"] is None  # OpenAI's for a forced function
        (call,) = msg["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == name and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
        if temperature == 0:
            greedy = call
    # streamed: the id and name first, then the arguments as they are generated; they add up the same
    content, calls, finish = _chat_stream(server, tools=TOOLS, tool_choice=choice, temperature=0)
    assert content is None and finish == "stop" and len(calls) == 1
    assert (calls[0]["name"], calls[0]["arguments"]) == (name, greedy["function"]["arguments"])


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_known_functions_with_valid_arguments(server, parallel):
    for seed in range(4):
        out = _chat(
            server, tools=TOOLS, tool_choice="required", temperature=0.8, seed=seed, parallel_tool_calls=parallel,
            max_tokens=400,
        )  # fmt: skip
        (choice,) = out["choices"]
        calls = choice["message"]["tool_calls"]
        # A list cut off by max_tokens still gives the calls it completed.
        assert choice["finish_reason"] in ("tool_calls", "length") and calls and (parallel or len(calls) == 1)
        for c in calls:
            jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
    want = _chat(server, tools=TOOLS, tool_choice="required", temperature=0)["choices"][0]["message"]["tool_calls"]
    _, calls, finish = _chat_stream(server, tools=TOOLS, tool_choice="required", temperature=0)
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (w["function"]["name"], w["function"]["arguments"]) for w in want
    ]


@pytest.mark.slow
def test_auto_answers_in_text_when_the_model_does_and_parses_calls_when_it_calls(server):
    hi = [{"role": "user", "content": "Say hello."}]
    out = _chat(server, messages=hi, tools=TOOLS, temperature=0)["choices"][0]
    assert out["finish_reason"] == "stop" and "tool_calls" not in out["message"]
    assert out["message"]["content"] and "<tool_call>" not in out["message"]["content"]
    # The model calling (steered into the Hermes format by a regex, as a model trained on it writes):
    # the call is read out of the text, content before it kept.
    regex = (
        r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": '
        r'\{"city": "(Paris|Lyon)", "unit": "celsius"\}\}\n</tool_call>'
    )
    body = {"tools": TOOLS, "temperature": 0, "structured_outputs": {"regex": regex}}
    out = _chat(server, **body)["choices"][0]
    assert out["finish_reason"] == "tool_calls" and out["message"]["content"] == "Checking.\n"
    (call,) = out["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    assert args["unit"] == "celsius" and args["city"] in ("Paris", "Lyon")
    content, calls, finish = _chat_stream(server, **body)
    assert (content, finish) == ("Checking.\n", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call["function"]["arguments"])]
    # tool_choice none: the same steered text stays text
    out = _chat(server, **body, tool_choice="none")["choices"][0]
    assert out["finish_reason"] == "stop" and "<tool_call>" in out["message"]["content"]


@pytest.mark.slow
def test_required_keeps_each_functions_defs_reachable(server):
    """Pydantic writes nested models as "$defs" + "$ref": they must resolve once the schema is inside
    required's list (and clashing definitions are refused by name)."""
    when = {"type": "object", "properties": {"day": {"type": "string", "maxLength": 12}}, "required": ["day"]}
    book = {
        "type": "function",
        "function": {
            "name": "book",
            "parameters": {
                "type": "object",
                "properties": {"when": {"$ref": "#/$defs/When"}},
                "required": ["when"],
                "$defs": {"When": when},
            },
        },
    }
    out = _chat(server, tools=[book, WEATHER], tool_choice="required", temperature=0, max_tokens=300)
    for c in out["choices"][0]["message"]["tool_calls"]:
        schema = {**book["function"]["parameters"]} if c["function"]["name"] == "book" else SCHEMAS["get_weather"]
        jsonschema.validate(json.loads(c["function"]["arguments"]), schema)
    other = json.loads(json.dumps(book))
    other["function"]["name"] = "book2"
    other["function"]["parameters"]["$defs"]["When"] = {"type": "string"}
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": ASK, "tools": [book, other], "tool_choice": "required", "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 400 and "define $defs 'When' differently" in r.text, r.text


@pytest.mark.slow
def test_text_after_a_call_stays_content_streamed_or_not(server):
    regex = r'<tool_call>\n\{"name": "ping", "arguments": \{\}\}\n</tool_call>\nDone, I asked\.'
    body = {"tools": TOOLS, "temperature": 0, "structured_outputs": {"regex": regex}}
    out = _chat(server, **body)["choices"][0]
    assert out["message"]["content"] == "Done, I asked." and out["finish_reason"] == "tool_calls"
    content, calls, _ = _chat_stream(server, **body)
    assert content == "Done, I asked." and [c["name"] for c in calls] == ["ping"]


@pytest.mark.slow
def test_a_conversation_with_tool_turns_is_answered_and_tokenize_counts_it_the_same(server):
    body = {"messages": CONV, "tools": TOOLS, "temperature": 0, "max_tokens": 8}
    out = _chat(server, **body)
    r = httpx.post(f"{server.url}/tokenize", json={"messages": CONV, "tools": TOOLS}, timeout=60)
    assert r.status_code == 200 and r.json()["count"] == out["usage"]["prompt_tokens"]
    bare = httpx.post(f"{server.url}/tokenize", json={"messages": CONV}, timeout=60).json()["count"]
    assert bare < r.json()["count"]  # the tools are in the prompt


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "not among tools"),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "a/b"}}]}, "letters, digits"),
        ({"tools": [WEATHER] * 129}, "at most 128"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "constrains the output already",
        ),
        ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "needs tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": CONV[1]["tool_calls"]}]}, "only assistant"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"properties": {"a": {"type": "nonsense"}}}},
                    }
                ],
                "tool_choice": "required",
            },
            "could not be compiled",
        ),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_problem(server, body, needle):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"], r.json()
    assert r.json()["error"]["param"] in ("tools", "tool_choice", "messages")  # what the client sent


class Booking(pydantic.BaseModel):
    restaurant: str = pydantic.Field(max_length=30)
    guests: int = pydantic.Field(ge=1, le=12)


@pytest.mark.slow
def test_the_openai_sdk_parses_a_forced_pydantic_tool_and_accumulates_a_stream(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    model = client.models.list().data[0].id
    tool = openai.pydantic_function_tool(Booking)
    choice = {"type": "function", "function": {"name": "Booking"}}
    done = client.chat.completions.parse(model=model, messages=ASK, tools=[tool], tool_choice=choice, temperature=0)
    (call,) = done.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Booking)
    with client.chat.completions.stream(
        model=model, messages=ASK, tools=[tool], tool_choice=choice, temperature=0
    ) as stream:
        final = stream.get_final_completion()
    (scall,) = final.choices[0].message.tool_calls
    assert scall.function.parsed_arguments == call.function.parsed_arguments
    # and plain create with n=2: each choice has its own call
    out = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", n=2, temperature=1.0, seed=5, max_tokens=120
    )
    assert [len(c.message.tool_calls) >= 1 for c in out.choices] == [True, True]


def test_special_tokens_are_told_apart_from_plain_added_ones(tok):
    assert tok.is_special_token("<|im_end|>") and tok.is_special_token("<repo_name>")  # decode drops both
    assert not tok.is_special_token("<tool_call>")  # not in SmolLM2's vocabulary: plain text


def test_a_required_list_cut_short_keeps_the_calls_it_completed():
    text = '[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"x": [1, 2]}}, {"name": "c", "param'
    assert [(c.name, c.arguments) for c in tools.forced_calls(text, "required")] == [
        ("a", "{}"),
        ("b", '{"x": [1, 2]}'),
    ]
    assert tools.forced_calls('[{"name', "required") == []
    spaced = ' [ {"name":"a","parameters":{}} ,\n{"name": "b", "parameters": {}} ]'
    assert [c.name for c in tools.forced_calls(spaced, "required")] == ["a", "b"]  # any separator
    assert tools.forced_calls('{"x": 1', {"name": "f"})[0].arguments == '{"x": 1'  # named: the text as generated
