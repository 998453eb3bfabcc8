"""Several models in one server (`membound serve A B ...`): naming and options, the memory split, the
engine's sleep / wake, routing by the `model` field, and --max-loaded-models.

Served together: the embedded SmolLM2 twice (under two names) and a tiny random Llama with SmolLM2's
tokenizer. The issue's pair is SmolLM2 + Gemma 3; Gemma 3 is added in `SERVED_SETS` below once it loads.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import re
import threading
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from membound import LLM, SamplingParams
from membound.config import EngineConfig
from membound.engine.llm_engine import LLMEngine
from membound.entrypoints.cli import _engine_config, build_parser, main
from membound.model.registry import default_model_path
from membound.model.tokenizer import Tokenizer
from membound.server import AsyncEngine, ServedModel, ServerConfig, build_app, build_models_app
from membound.server.metrics import MetricFamilies, ServerMetrics
from membound.server.models import DeviceGate, Residency, parse_models, plan_models
from tests.conftest import gemma3_gguf_path, save_tiny_hf_model
from tests.server_utils import ServerProcess

SMOL = str(default_model_path())
GREEDY = {"temperature": 0, "max_tokens": 12}
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]


def _metrics(text: str) -> dict[tuple[str, str, str], float]:
    """/metrics samples by (name, model_name, other labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            other = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[(s.name, s.labels.get("model_name", ""), other)] = s.value
    return out


def _kv_total(log: str) -> tuple[int, int]:
    """From the start-up log's memory split: KV bytes (of the models loaded at once) and the budget."""
    m = re.search(r"  total: weights .*KV.* (\d+) of (\d+) budget bytes \(within the budget\)", log)
    assert m, log
    return int(m[1]), int(m[2])


def _text(r: httpx.Response, chat: bool = False) -> str:
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c["message"]["content"] if chat else c["text"]


@pytest.fixture(scope="module")
def tiny_b_dir(tmp_path_factory):
    """A second tiny random Llama (other weights than tiny_model_dir), SmolLM2's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-b")
    tok = Tokenizer.from_model_path(SMOL)
    save_tiny_hf_model(path, "llama", seed=1, vocab_size=len(tok.hf), max_position_embeddings=512)
    tok.hf.save_pretrained(path)
    return path


# ---------------------------------------------------------------------- names, options, the split


def test_models_are_named_by_name_or_file_and_options_parse(tiny_model_dir):
    specs = parse_models(
        [f"smol={SMOL}", str(tiny_model_dir)], options=[[tiny_model_dir.name, "share=0.25", "max_model_len=256"]]
    )
    assert [s.names for s in specs] == [("smol",), (tiny_model_dir.name,)]
    assert specs[1].options == {"share": 0.25, "max_model_len": 256}
    # One model keeps what `serve` always did: named by --served-model-name or by `run` (its file name).
    assert parse_models([SMOL])[0].names == ()
    assert parse_models([SMOL], ["a", "b"])[0].names == ("a", "b")
    assert parse_models([f"smol={SMOL}"])[0].names == ("smol",)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([f"a={SMOL}", f"a={SMOL}"], "two models are named 'a'"),
        ([SMOL, SMOL], "two models are named 'SmolLM2-135M-Instruct.Q4_1'; give each its own name"),
        ([f"a={SMOL}", f"b={SMOL}", "--served-model-name", "x"], "--served-model-name names the one model"),
        (["=x"], "a model is PATH or NAME=PATH"),
        (["a="], "NAME=PATH needs a path"),
        ([f"a={SMOL}", f"b={SMOL}", "--model-option", "c", "share=0.5"], "no model is named 'c'; the models are a, b"),
        ([f"a={SMOL}", f"b={SMOL}", "--model-option", "a"], "--model-option NAME KEY=VALUE"),
        ([f"a={SMOL}", f"b={SMOL}", "--model-option", "a", "colour=red"], "KEY one of share, max_model_len"),
        ([f"a={SMOL}", f"b={SMOL}", "--model-option", "a", "share=1.5"], "a fraction of the memory budget, in (0, 1]"),
        ([f"a={SMOL}", f"b={SMOL}", "--model-option", "a", "max_num_seqs=0"], "must be a positive integer"),
        ([f"a={SMOL}", f"b={SMOL}", "--model-option", "a", "share=0.7", "--model-option", "b", "share=0.6"],
         "the models' shares sum to 1.3"),
        ([f"a={SMOL}", f"b={SMOL}", f"c={SMOL}", "--model-option", "a", "share=1"], "leaving nothing for b, c"),
        ([f"a={SMOL}", f"b={SMOL}", "--max-loaded-models", "0"], "--max-loaded-models must be a positive integer"),
        ([f"a={SMOL}", f"b={SMOL}", f"c={SMOL}", "--max-loaded-models", "2", "--model-option", "a", "share=0.6",
          "--model-option", "b", "share=0.6"], "the 2 largest shares (--max-loaded-models 2) sum to 1.2"),
        ([f"a={SMOL}", f"b={SMOL}", "--model-option", "a", "max_num_batched_tokens=8"],
         "model 'a': max_num_batched_tokens (8) must be at least max_num_seqs"),
        ([f"a={SMOL}", "b=/no/such/model.gguf", "--port", "0"], "model 'b': model '/no/such/model.gguf' not found"),
        ([SMOL, "--model", "b.gguf"], "two models given"),
    ],
)  # fmt: skip
def test_serve_rejects_bad_model_arguments_before_loading(args, needle, capsys):
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def _plan(args: list[str]):
    a = build_parser().parse_args(["serve", *args])
    specs = parse_models(a.model_tag, a.served_model_name, a.model_option, a.load_format)
    return plan_models(specs, _engine_config(a), a.max_loaded_models)


def test_one_models_integer_max_model_len_beside_a_global_auto():
    """--max-model-len auto for all, one model pinned: the pinned one takes no target_concurrency."""
    planned, _ = _plan([f"a={SMOL}", f"b={SMOL}", "--max-model-len", "auto", "--target-concurrency", "4",
                        "--model-option", "b", "max_model_len=512"])  # fmt: skip
    a, b = (p.config for p in planned)
    assert (a.max_model_len, a.target_concurrency) == ("auto", 4)
    assert (b.max_model_len, b.target_concurrency) == (512, None)


def test_the_kv_budget_is_split_by_share_and_sums_within_it(monkeypatch):
    planned, budget = _plan([f"a={SMOL}", f"b={SMOL}", f"c={SMOL}", "--kv-cache-memory", "90",
                             "--model-option", "c", "share=0.5", "kv_cache_memory=4"])  # fmt: skip
    assert budget.kv_bytes == 90 << 20 and budget.max_loaded == 3
    assert [p.share for p in planned] == [0.25, 0.25, 0.5]
    kv = [p.config.kv_cache_memory_bytes for p in planned]
    assert kv == [int(0.25 * (90 << 20))] * 2 + [4 << 20]  # c's own KV size overrides its share
    assert sum(kv) <= budget.kv_bytes
    # Beyond --max-loaded-models K a model's default share is 1/K: any K awake at once fit.
    planned, budget = _plan([f"a={SMOL}", f"b={SMOL}", f"c={SMOL}", "--kv-cache-memory", "90",
                             "--max-loaded-models", "2"])  # fmt: skip
    assert budget.max_loaded == 2 and [p.share for p in planned] == [0.5] * 3
    # On CUDA (without --kv-cache-memory) a share scales gpu_memory_utilization instead.
    monkeypatch.setattr(EngineConfig, "torch_device", lambda self: torch.device("cuda"))  # all the plan asks
    planned, budget = _plan([f"a={SMOL}", f"b={SMOL}", "--gpu-memory-utilization", "0.8"])
    assert [p.config.gpu_memory_utilization for p in planned] == [0.4, 0.4]
    assert all(p.config.kv_cache_memory_bytes is None for p in planned) and budget.kv_bytes is None


# ---------------------------------------------------------------------- the engine asleep


@pytest.mark.parametrize("offload", [False, True], ids=["kv-only", "weights-too"])
def test_sleep_frees_the_kv_cache_and_wake_gives_identical_outputs(tiny_model_dir, offload):
    llm = LLM(str(tiny_model_dir), max_model_len=256, kv_cache_memory_bytes=4 << 20)
    e = llm.engine
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = ["A prompt long enough to fill a whole block of the prefix cache, and more", "Hi"]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert e.stats().num_cached_blocks > 0
    e.add_request("busy", "x", params)
    with pytest.raises(RuntimeError, match="1 requests unfinished"):
        e.sleep()
    e.abort_request("busy")
    # The CUDA path (weights to host memory, storages emptied) runs on CPU too when asked for.
    assert e.sleep(offload_weights=offload) >= 0 and e.sleeping
    assert e.stats().num_cached_blocks == 0  # the prefix cache forgot the KV it indexed
    if offload:
        assert all(p.untyped_storage().nbytes() == 0 for p in e.model.parameters())
    assert e.wake() >= 0 and not e.sleeping
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    e.sleep(offload_weights=offload)  # the next step wakes it by itself
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want and not e.sleeping


@pytest.mark.parametrize("cpu", [True, False], ids=["cpu-thread", "exclusive"])
def test_device_gate_orders_exclusive_sections_first_come_first_served(cpu):
    gate = DeviceGate(exclusive_steps=cpu)
    order, threads_seen = [], set()
    start = threading.Barrier(2)

    def section(name: str) -> None:
        threads_seen.add(threading.get_ident())
        order.append(name)
        time.sleep(0.01)

    def worker(name: str) -> None:
        start.wait()
        for _ in range(3):
            (gate.run if cpu else gate.run_alone)(section, name)

    threads = [threading.Thread(target=worker, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(order) == list("aaabbb")
    assert max(len(list(run)) for _, run in itertools.groupby(order)) <= 2  # no engine starves the other
    # On CPU one thread does every engine's device work (one OpenMP pool: see DeviceGate).
    assert len(threads_seen) == (1 if cpu else 2)
    gate.close()


# ---------------------------------------------------------------------- in process, K = 1


def _tiny_models(dirs: dict, max_loaded: int | None):
    """AsyncEngines as `run_models` builds them, loaded one after another (past K the LRU sleeps first)."""
    specs = parse_models([f"{n}={d}" for n, d in dirs.items()])
    base = EngineConfig(max_model_len=256, kv_cache_memory_bytes=16 << 20, long_prefill_token_threshold=8)
    planned, budget = plan_models(specs, base, max_loaded)
    families = MetricFamilies()
    gate = DeviceGate(exclusive_steps=True)
    residency = Residency(budget.max_loaded, gate) if budget.max_loaded < len(planned) else None
    models = []
    for p in planned:
        if residency is not None and residency.num_awake() >= budget.max_loaded:
            residency.least_recently_used().request_sleep().result(30)
        engine = AsyncEngine(
            lambda c=p.config: LLMEngine(c), 64, metrics=ServerMetrics(p.name, families=families), name=p.name,
            residency=residency, gate=gate, own_stream=True,
        )  # fmt: skip
        engine.start()
        assert engine.wait_loaded(120), engine.load_error
        models.append(ServedModel(p.names, engine, 256))
    return models, planned, budget


def test_routing_404_models_list_metrics_and_sleep_wake_with_one_loaded(tiny_model_dir, tiny_b_dir):
    models, planned, budget = _tiny_models({"tiny-a": tiny_model_dir, "tiny-b": tiny_b_dir}, max_loaded=1)
    kv = sorted((m.engine.engine.memory.kv_bytes for m in models), reverse=True)
    assert sum(kv[: budget.max_loaded]) <= budget.kv_bytes  # whichever one is awake fits
    a, b = (m.engine.engine for m in models)
    assert a.sleeping and not b.sleeping  # a slept so that b could load
    body = {"prompt": "Tell me a story about", "ignore_eos": True, **GREEDY}
    with TestClient(build_models_app(models, ServerConfig())) as h:
        assert [m["id"] for m in h.get("/v1/models").json()["data"]] == ["tiny-a", "tiny-b"]
        r = h.post("/v1/completions", json={**body, "model": "gpt-4"})
        assert r.status_code == 404
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model" and err["type"] == "invalid_request_error"
        assert "model 'gpt-4' is not served here; this server serves tiny-a, tiny-b" == err["message"]
        assert h.post("/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404
        assert h.get("/tokenizer_info", params={"model": "nope"}).status_code == 404
        assert h.get("/tokenizer_info", params={"model": "tiny-b"}).json()["name_or_path"] == "tiny-b"

        first_b = _text(h.post("/v1/completions", json={**body, "model": "tiny-b"}))
        first_a = _text(h.post("/v1/completions", json={**body, "model": "tiny-a"}))  # b sleeps, a wakes
        assert b.sleeping and not a.sleeping
        assert first_a != first_b  # other weights: the request went where its model field said
        assert h.post("/v1/completions", json={**body, "model": "tiny-a"}).json()["model"] == "tiny-a"
        # No model field: the first model. Each woken model answers exactly as before it slept.
        assert _text(h.post("/v1/completions", json=body)) == first_a
        assert _text(h.post("/v1/completions", json={**body, "model": "tiny-b"})) == first_b
        assert _text(h.post("/v1/completions", json={**body, "model": "tiny-a"})) == first_a

        # A request for the sleeping model while the other one is busy waits for it to finish; nothing is lost.
        long = {"prompt": "A long one", "max_tokens": 200, "ignore_eos": True, "temperature": 0, "model": "tiny-a"}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            busy = pool.submit(h.post, "/v1/completions", json=long)
            deadline = time.monotonic() + 60
            while not a.has_unfinished_requests() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert a.has_unfinished_requests() and b.sleeping
            waiting = pool.submit(h.post, "/v1/completions", json={**body, "model": "tiny-b"})
            done = busy.result(120)
            assert done.json()["usage"]["completion_tokens"] == 200
            assert _text(waiting.result(120)) == first_b
        m = _metrics(h.get("/metrics").text)
    for key in [
        ("membound:model_wake_seconds_count", "tiny-a", ""),
        ("membound:model_wake_seconds_count", "tiny-b", ""),
    ]:
        assert m[key] >= 2, key
    assert m[("membound:model_awake", "tiny-b", "")] == 1 and m[("membound:model_awake", "tiny-a", "")] == 0
    assert m[("membound:request_success_total", "tiny-a", "finished_reason=length")] == 5
    assert m[("membound:request_success_total", "tiny-b", "finished_reason=length")] == 3


def test_single_model_app_keeps_its_400_for_a_wrong_model(tiny_model_dir):
    engine = AsyncEngine(
        lambda: LLMEngine(EngineConfig(model=str(tiny_model_dir), max_model_len=256, kv_cache_memory_bytes=4 << 20)),
        8,
        metrics=ServerMetrics("tiny"),
    )
    with TestClient(build_app(engine, ServerConfig(), ("tiny",), 256)) as h:
        assert engine.wait_loaded(120)
        r = h.post("/v1/completions", json={"prompt": "x", "model": "gpt-4", "max_tokens": 2})
        assert r.status_code == 400 and "not served here; this server serves tiny" in r.json()["error"]["message"]
        assert [m["id"] for m in h.get("/v1/models").json()["data"]] == ["tiny"]


# ---------------------------------------------------------------------- real servers


# What is served together, by kind; the paths come from `_path`. The test pair is SmolLM2 +
SERVED_SETS = [
    pytest.param((("smol-a", "smollm2"), ("smol-b", "smollm2"), ("tiny", "tiny")), id="smollm2x2+tiny"),
    pytest.param((("smol", "smollm2"), ("gemma", "gemma3")), id="smollm2+gemma3"),  # two architectures
]


def _path(kind: str, tiny_dir) -> str:
    if kind == "gemma3":
        return gemma3_gguf_path()
    return {"smollm2": SMOL, "tiny": str(tiny_dir)}[kind]


def _served_args(served, tiny_dir) -> list[str]:
    names = [n for n, _ in served]
    args = [f"{n}={_path(kind, tiny_dir)}" for n, kind in served]
    args += ["--max-model-len", "512", "--kv-cache-memory", "96", "--log-interval", "1"]
    if "tiny" in names:  # per-model options: a smaller share and context for the tiny model
        args += ["--model-option", "tiny", "share=0.2", "max_model_len=256"]
    return args


@pytest.fixture(scope="module", params=SERVED_SETS)
def served(request, tiny_model_dir, tmp_path_factory):
    served = request.param
    args = _served_args(served, tiny_model_dir)
    s = ServerProcess(args, tmp_path_factory.mktemp("logs") / "multi.log")
    yield s, served, args
    assert s.stop() == 0, s.log_tail()


def _alone(args: list[str], name: str, requests: list[tuple[str, dict]]) -> list[str]:
    """The model `name` of `args` served alone (in process, the single-model app, its planned config)."""
    planned, _ = _plan(args)
    (p,) = [p for p in planned if p.name == name]
    engine = AsyncEngine(lambda: LLMEngine(p.config), 64, metrics=ServerMetrics(name))
    with TestClient(build_app(engine, ServerConfig(), (name,), None)) as h:
        assert engine.wait_loaded(300), engine.load_error
        return [_text(h.post(f"/v1/{route}", json=body), route.startswith("chat")) for route, body in requests]


def _requests(name: str) -> list[tuple[str, dict]]:
    out = [("completions", {"model": name, "prompt": p, **GREEDY}) for p in PROMPTS]
    out += [("chat/completions", {"model": name, "messages": [{"role": "user", "content": p}], **GREEDY})
            for p in PROMPTS[:2]]  # fmt: skip
    return out


def test_concurrent_requests_to_every_model_equal_each_served_alone(served):
    """Every model's requests at once, one at a time per model (so each engine's batches are what they
    are alone: SmolLM2's greedy tokens may change with the batch's shape, not with other engines)."""
    server, models, args = served
    names = [n for n, _ in models]

    def lane(name: str) -> list[str]:
        with httpx.Client(base_url=server.url, timeout=300) as h:
            return [
                _text(h.post(f"/v1/{route}", json=body), route.startswith("chat")) for route, body in _requests(name)
            ]

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        got = dict(zip(names, pool.map(lane, names), strict=True))
    kinds = dict(models)
    refs: dict[str, list[str]] = {}  # one reference per kind of model: smol-a and smol-b are the same model
    for n in names:
        if kinds[n] not in refs:
            refs[kinds[n]] = _alone(args, n, _requests(n))
        assert got[n] == refs[kinds[n]], n


def test_models_list_404_metrics_and_the_logged_memory_split(served):
    server, models, args = served
    names = [n for n, _ in models]
    cards = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [c["id"] for c in cards] == names
    assert {c["id"]: c["max_model_len"] for c in cards}.get("tiny", 256) == 256
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["message"].endswith(f"this server serves {', '.join(names)}")
    for n in names:
        _text(httpx.post(f"{server.url}/v1/completions", json={"model": n, "prompt": "Hi", **GREEDY}, timeout=120))
    m = _metrics(httpx.get(f"{server.url}/metrics").text)
    for n in names:
        assert m[("membound:request_success_total", n, "finished_reason=length")] >= 1, n
        assert ("membound:kv_cache_usage_perc", n, "") in m and m[("membound:model_awake", n, "")] == 1
    log = server.log_tail(100_000)
    assert f"{len(names)} models on cpu, at most {len(names)} loaded at once; KV budget 0.094 GiB" in log
    for n in names:
        assert f"  {n}: share " in log
    used, budget = _kv_total(log)
    assert used <= budget == 96 << 20


def test_max_loaded_models_1_sleeps_the_idle_model_and_wakes_it_with_identical_outputs(tiny_model_dir, tmp_path):
    args = [f"smol={SMOL}", f"tiny={tiny_model_dir}", "--max-model-len", "512", "--kv-cache-memory", "64",
            "--max-loaded-models", "1", "--log-interval", "1"]  # fmt: skip
    s = ServerProcess(args, tmp_path / "k1.log")
    try:
        body = {"prompt": "The capital of France is", **GREEDY}

        def ask(name: str, **kw) -> str:
            return _text(httpx.post(f"{s.url}/v1/completions", json={**body, "model": name, **kw}, timeout=300))

        smol = ask("smol")  # smol slept while tiny loaded: it wakes now
        tiny = ask("tiny")
        assert ask("smol") == smol and ask("tiny") == tiny
        # smol asked for while tiny runs a long request: it waits, then both complete.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long = pool.submit(ask, "tiny", max_tokens=300, ignore_eos=True)
            time.sleep(0.5)
            waiting = pool.submit(ask, "smol")
            assert len(long.result(300)) > 0 and waiting.result(300) == smol
        m = _metrics(httpx.get(f"{s.url}/metrics").text)
        assert m[("membound:model_wake_seconds_count", "smol", "")] >= 3
        assert m[("membound:model_wake_seconds_count", "tiny", "")] >= 2
        assert m[("membound:model_wake_seconds_sum", "smol", "")] > 0
        log = s.log_tail(100_000)
        assert "2 models on cpu, at most 1 loaded at once" in log
        used, budget = _kv_total(log)  # the larger of the two KV caches: one is loaded at a time
        assert used <= budget == 64 << 20
        assert "model smol woke in " in log and "model tiny asleep in " in log
        assert m[("membound:model_awake", "smol", "")] == 1
    finally:
        assert s.stop() == 0, s.log_tail()
