"""vLLM's tokenizer routes (/tokenize, /detokenize, /tokenizer_info) on a real `membound serve`
process, and `membound tokenizer export` checked against transformers' AutoTokenizer.

The server runs the tiny random Llama with SmolLM2's tokenizer and chat template; the export runs on
the embedded SmolLM2 GGUF, whose tokenizer membound builds from the file's vocab."""

from __future__ import annotations

import json

import httpx
import jinja2
import pytest

from membound.entrypoints.cli import main
from membound.model.registry import default_model_path
from membound.model.tokenizer import Tokenizer
from membound.server.tokenize import MAX_MODEL_LEN_FACTOR
from tests.server_utils import ServerProcess, tiny_server_args

KEY = "sk-test"
MAX_LEN = 256
LIMIT = MAX_MODEL_LEN_FACTOR * MAX_LEN
HEADERS = {"Authorization": f"Bearer {KEY}"}

TEXTS = [
    "Hello world",
    "héllo wörld, 日本語のテキスト 🙂 ∑ x²",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "  leading spaces\t\ttabs\n\nand newlines  ",
    "",
]

CHATS = [
    [{"role": "user", "content": "Name three planets"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "3+3, in 日本語?"}]},
    ],
    [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
]


def _tiny_args(model_dir, *extra: str) -> list[str]:
    return tiny_server_args(model_dir, MAX_LEN, *extra)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "tokenizer-routes.log"
    s = ServerProcess(_tiny_args(tiny_model_dir, "--api-key", KEY, "--served-model-name", "tiny", "tiny-alias"), log)
    yield s
    assert s.stop() == 0, s.log_tail()


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    """The tokenizer the server loads, loaded the same way."""
    return Tokenizer.from_model_path(str(tiny_model_dir))


@pytest.fixture(scope="module")
def h(server):
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=60) as c:
        yield c


def _ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------- /tokenize


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_a_prompt_is_the_tokenizers_encode(h, tok, text):
    for path in ("/tokenize", "/v1/tokenize"):
        for add in (None, True, False):
            body = {"prompt": text} if add is None else {"prompt": text, "add_special_tokens": add}
            out = _ok(h.post(path, json=body))
            want = tok.encode(text, add_special_tokens=add is not False)
            assert out == {"count": len(want), "max_model_len": MAX_LEN, "tokens": want, "token_strs": None}
    out = _ok(h.post("/tokenize", json={"prompt": text, "return_token_strs": True, "model": "tiny-alias"}))
    assert out["token_strs"] == tok.hf.convert_ids_to_tokens(out["tokens"])


def test_tokenize_messages_counts_what_the_chat_route_counts(h, tok):
    for messages in CHATS:
        for gen in (True, False):
            out = _ok(h.post("/tokenize", json={"messages": messages, "add_generation_prompt": gen}))
            chat = _ok(
                h.post(
                    "/v1/chat/completions",
                    json={"messages": messages, "add_generation_prompt": gen, "max_tokens": 1, "model": "tiny"},
                )
            )
            assert out["count"] == len(out["tokens"]) == chat["usage"]["prompt_tokens"]
            plain = [
                {
                    "role": "system" if m["role"] == "developer" else m["role"],
                    "content": m["content"]
                    if isinstance(m["content"], str)
                    else "".join(p["text"] for p in m["content"]),
                }
                for m in messages
            ]
            rendered = tok.render_chat(plain, add_generation_prompt=gen)
            assert out["tokens"] == tok.encode_rendered(rendered)
            # add_special_tokens on top of the template: what the tokenizer adds (SmolLM2: no BOS)
            extra = _ok(
                h.post(
                    "/tokenize", json={"messages": messages, "add_generation_prompt": gen, "add_special_tokens": True}
                )
            )
            assert extra["tokens"] == tok.hf.encode(rendered, add_special_tokens=True)


def test_a_prompt_past_max_model_len_still_tokenizes_up_to_the_bound(h, tok):
    text = "word " * 400
    out = _ok(h.post("/tokenize", json={"prompt": text}))
    assert out["count"] == len(tok.encode(text)) > MAX_LEN
    # The completions route refuses the same text: tokenizing is not generating.
    r = h.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
    assert r.status_code == 400 and "maximum context length" in r.text


# ---------------------------------------------------------------------- /detokenize


@pytest.mark.parametrize("text", TEXTS)
def test_detokenize_round_trips(h, tok, text):
    ids = tok.encode(text)
    for path in ("/detokenize", "/v1/detokenize"):
        out = _ok(h.post(path, json={"tokens": ids, "model": "tiny"}))
        assert out == {"prompt": tok.decode(ids, skip_special_tokens=False)}
        assert out["prompt"] == text  # special tokens kept, so the text comes back whole


# ---------------------------------------------------------------------- /tokenizer_info


def test_tokenizer_info_is_what_lm_evals_remote_tokenizer_reads(h, tok):
    info = _ok(h.get("/tokenizer_info"))
    assert _ok(h.get("/v1/tokenizer_info")) == info
    hf = tok.hf
    assert info["tokenizer_class"] == type(hf).__name__
    assert info["model_max_length"] == MAX_LEN and info["vocab_size"] == len(hf) == 49152
    assert info["name_or_path"] == "tiny"  # the served name, not a path on the server
    for name in ("bos", "eos", "pad", "unk"):
        assert info[f"{name}_token"] == getattr(hf, f"{name}_token")
        assert info[f"{name}_token_id"] == getattr(hf, f"{name}_token_id")
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"] == hf.chat_template
    assert info["added_tokens_decoder"]["0"] == "<|endoftext|>"
    assert not {"vocab_file", "merges_file", "tokenizer_file", "is_local", "local_files_only"} & set(info)

    # lm-eval's RemoteTokenizer: special token ids by tokenizing their text without special tokens ...
    for name in ("eos", "bos"):
        ids = _ok(h.post("/tokenize", json={"prompt": info[f"{name}_token"], "add_special_tokens": False}))["tokens"]
        assert ids[0] == getattr(hf, f"{name}_token_id")
    # ... and the chat template rendered with plain jinja2, as it renders it, gives the server's text.
    env = jinja2.Environment(loader=jinja2.BaseLoader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = env.from_string(info["chat_template"])
    messages = [{"role": "user", "content": "Name three planets"}]
    text = template.render(messages=messages, add_generation_prompt=True)
    assert text == tok.render_chat(messages)
    assert (
        _ok(h.post("/tokenize", json={"prompt": text, "add_special_tokens": False}))["tokens"]
        == (_ok(h.post("/tokenize", json={"messages": messages}))["tokens"])
    )


# ---------------------------------------------------------------------- auth and bad input


def test_the_api_key_is_required_on_the_tokenizer_routes_only(server):
    routes = [("POST", p, {"prompt": "hi"}) for p in ("/tokenize", "/v1/tokenize", "/tokenize/")]
    routes += [("POST", p, {"tokens": [1]}) for p in ("/detokenize", "/v1/detokenize")]
    routes += [("GET", p, None) for p in ("/tokenizer_info", "/v1/tokenizer_info")]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
        if not path.endswith("/"):
            assert httpx.request(method, f"{server.url}{path}", json=body, headers=HEADERS).status_code == 200
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 200


MSG = [{"role": "user", "content": "hi"}]
BAD = [
    ("tokenize", "{not json", "not valid JSON", None),
    ("tokenize", "[1, 2]", "JSON object", None),
    ("tokenize", {}, "prompt (a string) or messages", "prompt"),
    ("tokenize", {"prompt": 5}, "prompt", "prompt"),
    ("tokenize", {"prompt": ["a", "b"]}, "prompt", "prompt"),
    ("tokenize", {"prompt": "x", "messages": MSG}, "not both", "messages"),
    ("tokenize", {"prompt": "x", "model": "gpt-4"}, "not served here; this server serves tiny, tiny-alias", "model"),
    ("tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens", "add_special_tokens"),
    ("tokenize", {"prompt": "x", "return_token_strs": 1}, "return_token_strs", "return_token_strs"),
    ("tokenize", {"prompt": "hi \ud800 there"}, "lone surrogate", "prompt"),
    ("tokenize", {"prompt": "word " * (LIMIT + 100)}, f"at most {LIMIT} tokens", "prompt"),
    ("tokenize", {"prompt": "\u0800" * (LIMIT * 81 // 3 + 100)}, "bytes of text", "prompt"),  # refused unencoded
    ("tokenize", {"messages": []}, "messages", "messages"),
    ("tokenize", {"messages": "hi"}, "messages", "messages"),
    ("tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, "role", "messages"),
    ("tokenize", {"messages": [{"role": "user", "content": 3}]}, "content", "messages"),
    ("tokenize", {"messages": [{"role": "user", "content": "a\ud800"}]}, "lone surrogate", "messages[0].content"),
    (
        "tokenize",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "only text content parts",
        "messages",
    ),
    ("tokenize", {"messages": [{"role": "user", "content": ""}] * (LIMIT + 1)}, f"{LIMIT + 1} messages", "messages"),
    ("tokenize", {"messages": [{"role": "user", "content": "word " * (LIMIT + 100)}]}, "at most", "messages"),
    ("tokenize", {"messages": MSG, "continue_final_message": True}, "not supported", "continue_final_message"),
    ("tokenize", {"messages": MSG, "chat_template": "{{ 1 }}"}, "not supported", "chat_template"),
    ("tokenize", {"messages": MSG, "tools": [{"type": "function"}]}, "tools.0.function", "tools"),
    ("tokenize", {"messages": MSG, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "letters", "tools"),
    ("detokenize", {}, "tokens", "tokens"),
    ("detokenize", {"tokens": "abc"}, "must be a list", "tokens"),
    ("detokenize", {"tokens": [1.5]}, "must be integers", "tokens"),
    ("detokenize", {"tokens": [True]}, "must be integers", "tokens"),
    (
        "detokenize",
        {"tokens": [49152]},
        "out of range: 49152; this tokenizer's token ids are integers in [0, 49152)",
        "tokens",
    ),
    (
        "detokenize",
        {"tokens": [-1, 5, 10**30] + [10**6] * 5},
        "7 token id(s) out of range: -1, 100000000000... (31 digits), 1000000",
        "tokens",
    ),
    ("detokenize", {"tokens": [5] * (LIMIT + 1)}, f"at most {LIMIT} tokens", "tokens"),
    ("detokenize", {"tokens": [1], "model": "nope"}, "not served here", "model"),
]


@pytest.mark.parametrize(("route", "body", "needle", "param"), BAD, ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field(h, route, body, needle, param):
    raw = body if isinstance(body, str) else json.dumps(body)
    r = h.post(f"/{route}", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert needle in err["message"], err["message"]
    assert err["param"] == param, err


def test_fuzzing_the_tokenizer_routes_finds_no_5xx(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures, ran, statuses = [], set(), []
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path not in ("/tokenize", "/detokenize", "/tokenizer_info"):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                case.headers = {**(case.headers or {}), **HEADERS}
                r = case.call(base_url=server.url, timeout=60)
                statuses.append(r.status_code)
                if r.status_code >= 500:
                    failures.append((case.operation.label, case.body, r.status_code, r.text[:300]))

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE and op.method == "get"
                continue
            ran.add(op.label)
    assert ran == {"POST /tokenize", "POST /detokenize", "GET /tokenizer_info"}
    assert not failures, failures[:5]
    assert statuses.count(200) >= 5 and statuses.count(400) >= 5, sorted(statuses)
    assert httpx.get(f"{server.url}/health").status_code == 200


# ---------------------------------------------------------------------- membound tokenizer export


@pytest.fixture(scope="module")
def smol_tok() -> Tokenizer:
    return Tokenizer.from_model_path(str(default_model_path()))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "smollm2-tokenizer"
    assert main(["tokenizer", "export", str(out)]) == 0
    return out


def test_export_loads_in_autotokenizer_and_encodes_as_membound(exported, smol_tok):
    from transformers import AutoTokenizer

    assert sorted(p.name for p in exported.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((exported / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["model_max_length"] == 8192
    assert cfg["chat_template"] == smol_tok.hf.chat_template and cfg["eos_token"] == "<|im_end|>"
    hf = AutoTokenizer.from_pretrained(str(exported))
    for text in [*TEXTS, "<repo_name>x<file_sep>y", "Ünïcödé ⁂ 𝔘 \u200b zero-width"]:
        for add in (True, False):
            assert hf.encode(text, add_special_tokens=add) == smol_tok.encode(text, add_special_tokens=add), text
        ids = smol_tok.encode(text)
        assert hf.decode(ids) == smol_tok.decode(ids, skip_special_tokens=False) == text
        assert hf.decode(ids, skip_special_tokens=True) == smol_tok.decode(ids)
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(hf, f"{name}_token") == getattr(smol_tok.hf, f"{name}_token")
        assert getattr(hf, f"{name}_token_id") == getattr(smol_tok.hf, f"{name}_token_id")
    assert len(hf) == smol_tok.vocab_size
    plain = [*CHATS[:1], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "日本語?"}]]
    for messages in plain:
        for gen in (True, False):
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert text == smol_tok.render_chat(messages, add_generation_prompt=gen)


def test_export_of_a_hf_folder(tiny_model_dir, tok, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tiny"
    assert main(["tokenizer", "export", str(out), "--model", str(tiny_model_dir)]) == 0
    hf = AutoTokenizer.from_pretrained(str(out))
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 512
    for text in TEXTS:
        assert hf.encode(text) == tok.encode(text)
    assert hf.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True) == tok.render_chat(CHATS[0])


def test_export_refuses_a_non_empty_folder_unless_forced(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "chat_template.jinja").write_text("{{ 'stale' }}")
    assert main(["tokenizer", "export", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exists and is not empty" in err and "--force" in err
    assert main(["tokenizer", "export", str(out), "--force"]) == 0
    assert not (out / "chat_template.jinja").exists()  # it would shadow the exported template
    assert main(["tokenizer", "export", str(out / "tokenizer.json")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_add_special_tokens_follows_a_tokenizer_that_adds_a_bos(exported):
    """SmolLM2 adds no BOS; its export loaded with add_bos_token does, and the jobs follow it: a prompt
    gets one unless add_special_tokens is false, chat messages only when it is true (as vLLM's)."""
    from transformers import AutoTokenizer

    from membound.server.serving import ServingContext
    from membound.server.tokenize import TokenizeRequest, tokenize_job

    tok = Tokenizer(AutoTokenizer.from_pretrained(str(exported), add_bos_token=True))
    ctx = ServingContext(engine=None, tokenizer=tok, model_names=("m",), max_model_len=MAX_LEN, max_num_seqs=4)
    bos = tok.hf.bos_token_id
    plain = tok.encode("hi", add_special_tokens=False)
    assert tok.encode("hi") == [bos, *plain]

    def ids(**body) -> list[int]:
        return tokenize_job(ctx, TokenizeRequest.model_validate(body))["tokens"]

    assert ids(prompt="hi") == ids(prompt="hi", add_special_tokens=True) == [bos, *plain]
    assert ids(prompt="hi", add_special_tokens=False) == plain
    rendered = tok.encode_rendered(tok.render_chat(MSG))
    assert ids(messages=MSG) == ids(messages=MSG, add_special_tokens=False) == rendered
    assert ids(messages=MSG, add_special_tokens=True) == [bos, *rendered]
