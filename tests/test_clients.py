"""Real clients, unmodified, against a real `membound serve` on the default model (issue 17).

- lm-evaluation-harness (`lm-eval run --model local-completions`) scores a multiple-choice task defined
  here (a task YAML and a jsonl dataset in tmp_path; nothing downloaded), once with its remote tokenizer
  (membound's /tokenize, /detokenize, /tokenizer_info) and once with the folder `membound tokenizer export`
  writes. Every choice's loglikelihood it logs must be the one membound's Python API gives for the same
  tokens: `LLM.generate(ids, SamplingParams(prompt_logprobs=1, max_tokens=1))`, the continuation's
  prompt logprobs summed.
- guidellm (`guidellm run`) benchmarks the chat route with a synthetic text profile, the exported folder
  as its tokenizer; its per-request token counts must be what the exported tokenizer counts for the
  prompts it sent, and its totals what the server's own /metrics counters say it served.

Both clients come with the `test` extra. Without one the test is skipped, unless CI=true: there a
missing client is a failure."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from membound import SamplingParams
from membound.entrypoints.cli import main
from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow

NAME = "smollm2"
KEY = "sk-clients"
MAX_LEN = 1024

# The inline task: `doc_to_text` is the context, each choice (after lm-eval's " " delimiter) a
# continuation. Covered: a context ending in a space (lm-eval moves it into the continuation), non-ASCII
# text, multi-token choices, and an empty context (lm-eval puts the tokenizer's BOS in front instead).
DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "Berlin", "a small town in Peru"]},
    {"question": "2 + 2 =", "choices": ["4", "5", "22"]},
    {
        "question": "Question: What colour is the sky on a clear day?\nAnswer:",
        "choices": ["blue", "green", "bright orange with purple spots"],
    },
    {"question": "Water freezes at ", "choices": ["0 degrees Celsius", "100 degrees Celsius"]},
    {"question": "Der Himmel ist", "choices": ["blau", "grün", "日本語のテキスト 🙂"]},
    {"question": "", "choices": ["Hello world", "Goodbye"]},
    {
        "question": "Alice has three apples. She gives one to Bob and eats another one. "
        "How many apples does Alice have left? Alice has",
        "choices": ["one apple left", "two apples left", "three apples left", "no apples left"],
    },
]
DOCS = [{**d, "answer": 0} for d in DOCS]

TASK_YAML = """\
task: membound_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

# guidellm: a synthetic text profile small enough for two CPU cores; a fixed request count (not a
# duration) so that no request is cut off mid-stream and every token is accounted for on both sides.
GUIDELLM_REQUESTS = 64
GUIDELLM_STREAMS = 4
PROMPT_TOKENS = 32
OUTPUT_TOKENS = 16


def _client(module: str, package: str) -> None:
    """Skip when `module` is not importable, except under CI=true, where that is a failure."""
    if importlib.util.find_spec(module) is not None:
        return
    msg = f"{package} is not installed (it comes with the test extra: pip install -e '.[test]')"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {msg}")
    pytest.skip(msg)


def _env(tmp_path) -> dict[str, str]:
    """The clients' environment: offline, with their caches in tmp_path, the server's key for lm-eval."""
    return {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OPENAI_API_KEY": KEY,  # lm-eval's local-completions sends it as the bearer token
    }


def _run(cmd: list[str], tmp_path, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    return p, time.monotonic() - t0


def _tail(p: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-n:]}\n--- stderr\n{p.stderr[-n:]}"


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "clients-server.log"
    args = ["--max-model-len", str(MAX_LEN), "--kv-cache-memory", "128", "--served-model-name", NAME]
    s = ServerProcess([*args, "--api-key", KEY], log)
    yield s
    assert s.stop() == 0, s.log_tail()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "smollm2-tokenizer"
    assert main(["tokenizer", "export", str(out)]) == 0
    return out


# ---------------------------------------------------------------------- lm-evaluation-harness


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into context and continuation tokens (TemplateLM.loglikelihood,
    _encode_pair; both tokenizer backends encode without special tokens)."""

    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    if context == "":
        cont = enc(continuation)
        bos = tok.hf.convert_tokens_to_ids(tok.hf.bos_token)
        return ([bos], cont) if bos != cont[0] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = enc(context + continuation)
    ctx = enc(context)
    return ctx, whole[len(ctx) :]


def _entry(e, tid: int) -> tuple[float, float]:
    """(the token's logprob, the best logprob at that position) from a prompt_logprobs entry, in either
    shape: vLLM's dict[int, Logprob] or the older TokenLogprob (.logprob, .top: id -> logprob)."""
    if isinstance(e, dict):
        return e[tid].logprob, max(v.logprob for v in e.values())
    return e.logprob, max([e.logprob, *e.top.values()])


@pytest.fixture(scope="module")
def reference(smollm2):
    """Each (doc, choice): its context and continuation, token ids, and membound's own
    (loglikelihood, is_greedy) for it, from the Python API on the same engine and dtype as the server.

    Each prompt is scored alone, as the server runs lm-eval's sequential requests: batched together
    (one prefill of 64+ rows) the bf16 CPU path takes another matmul kernel and the logprobs move
    by up to ~0.4 nats on this task, so a batched reference would not be the server's computation."""
    tok = smollm2.tokenizer
    ref = {}
    for i, doc in enumerate(DOCS):
        for j, choice in enumerate(doc["choices"]):
            context, continuation = doc["question"], " " + choice
            ctx, cont = _encode_pair(tok, context, continuation)
            ids = ctx + cont
            params = SamplingParams(prompt_logprobs=1, max_tokens=1, temperature=0)
            (out,) = smollm2.generate([ids], params)
            lps = out.prompt_logprobs
            assert len(lps) == len(ids)
            ll, greedy = 0.0, True
            for p in range(len(ctx), len(ids)):
                v, best = _entry(lps[p], ids[p])
                ll += v
                greedy &= v >= best
            ref[i, j] = {"context": context, "continuation": continuation, "ids": ids, "ll": ll, "greedy": greedy}
    return ref


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm-eval-task")
    data = d / "membound_mc.jsonl"
    data.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in DOCS))
    (d / "membound_mc.yaml").write_text(TASK_YAML.format(data=json.dumps(str(data))))
    return d


@pytest.mark.parametrize("backend", ["remote", "exported"])
def test_lm_eval_loglikelihoods_are_the_engines_prompt_logprobs(
    backend, server, exported, reference, task_dir, tmp_path
):
    _client("lm_eval", "lm-eval[api]")
    _client("aiohttp", "lm-eval[api]")
    tokenizer = (
        f"tokenizer_backend=remote,auth_token={KEY}"
        if backend == "remote"
        else f"tokenizer_backend=huggingface,tokenizer={exported}"
    )
    model_args = (
        f"model={NAME},base_url={server.url}/v1/completions,{tokenizer},"
        f"num_concurrent=1,max_retries=1,max_length={MAX_LEN}"
    )
    out_dir = tmp_path / "lm-eval-out"
    before = server.metrics()
    p, took = _run(
        [
            sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
            "--tasks", "membound_mc", "--include_path", str(task_dir),
            "--output_path", str(out_dir), "--log_samples",
        ],
        tmp_path,
        timeout=300,
    )  # fmt: skip
    after = server.metrics()
    assert p.returncode == 0, _tail(p)
    (samples_file,) = glob.glob(str(out_dir / "*" / "samples_membound_mc_*.jsonl"))
    lines = pathlib.Path(samples_file).read_text().splitlines()
    samples = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(DOCS)))

    diffs = []
    for s in samples:
        i = s["doc_id"]
        n = len(DOCS[i]["choices"])
        # lm-eval's requests are the task's (context, " " + choice) pairs, in choice order ...
        args = [s["arguments"][f"gen_args_{j}"] for j in range(n)]
        assert [(a["arg_0"], a["arg_1"]) for a in args] == [
            (reference[i, j]["context"], reference[i, j]["continuation"]) for j in range(n)
        ]
        # ... and each one's (loglikelihood, is_greedy) is membound's for the same tokens.
        assert len(s["filtered_resps"]) == n and all(len(r) == 1 for r in s["resps"])
        for j, ((ll, greedy), (ll_r, greedy_r)) in enumerate(
            zip(s["filtered_resps"], (r[0] for r in s["resps"]), strict=True)
        ):
            assert (ll, greedy) == (ll_r, greedy_r)  # no filter on a loglikelihood task
            want = reference[i, j]
            diffs.append(abs(float(ll) - want["ll"]))
            assert abs(float(ll) - want["ll"]) < 1e-4, (i, j, ll, want)
            assert (greedy == "True") == want["greedy"], (i, j, greedy, want)
        # lm-eval's accuracy for the doc follows from those numbers.
        best = max(range(n), key=lambda j: reference[i, j]["ll"])
        assert s["acc"] == float(best == DOCS[i]["answer"])
    print(f"lm-eval ({backend} tokenizer) took {took:.1f}s; max |loglikelihood - membound's| = {max(diffs):.3g}")

    # The server saw exactly those token sequences, each scored once with one generated token.
    want_prompt = sum(len(r["ids"]) for r in reference.values())
    assert _delta(before, after, "membound:prompt_tokens_total") == want_prompt
    assert _delta(before, after, "membound:generation_tokens_total") == len(reference)
    assert _delta(before, after, "membound:request_success_total{finished_reason=length}") == len(reference)


# ---------------------------------------------------------------------- guidellm


def test_guidellm_benchmark_token_counts_match_the_servers(server, exported, tmp_path):
    _client("guidellm", "guidellm")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(exported))
    out = tmp_path / "guidellm.json"
    before = server.metrics()
    p, took = _run(
        [
            sys.executable, "-m", "guidellm", "run",
            "--backend", f"kind=openai_http,target={server.url},model={NAME},api_key={KEY}",
            "--profile", f"kind=concurrent,streams={GUIDELLM_STREAMS}",
            "--constraint", f"kind=max_requests,count={GUIDELLM_REQUESTS}",
            "--constraint", "kind=max_duration,seconds=240",  # a backstop only: the count ends the run
            "--tokenizer", f"kind=huggingface_auto,model={exported}",
            "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
            "--output", f"kind=json,path={out}",
            "--disable-console",
        ],
        tmp_path,
        timeout=300,
    )  # fmt: skip
    after = server.metrics()
    assert p.returncode == 0, _tail(p)
    (bench,) = json.loads(out.read_text())["benchmarks"]
    assert bench["metrics"]["request_totals"] == {
        "successful": GUIDELLM_REQUESTS,
        "errored": 0,
        "incomplete": 0,
        "total": GUIDELLM_REQUESTS,
    }, _tail(p)
    reqs = bench["requests"]["successful"]
    assert len(reqs) == GUIDELLM_REQUESTS

    for r in reqs:
        body = json.loads(r["request_args"])["body"]
        assert body["stream"] is True and body["ignore_eos"] is True
        assert body["max_completion_tokens"] == OUTPUT_TOKENS
        (message,) = body["messages"]
        text = "".join(part["text"] for part in message["content"])
        # guidellm built a PROMPT_TOKENS-token prompt with the exported tokenizer; the server counted
        # that prompt inside the chat template exactly as the exported tokenizer and template do.
        assert len(hf.encode(text, add_special_tokens=False)) == PROMPT_TOKENS
        rendered = hf.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        assert r["prompt_tokens"] == len(hf.encode(rendered, add_special_tokens=False)), r["request_id"]
        assert r["output_tokens"] == OUTPUT_TOKENS, r["request_id"]  # ignore_eos: max tokens every time

    # guidellm's totals are the sums over its requests, and the server served exactly that.
    prompt = sum(r["prompt_tokens"] for r in reqs)
    output = sum(r["output_tokens"] for r in reqs)
    assert bench["metrics"]["prompt_token_count"]["successful"]["total_sum"] == prompt
    assert bench["metrics"]["output_token_count"]["successful"]["total_sum"] == output
    assert _delta(before, after, "membound:prompt_tokens_total") == prompt
    assert _delta(before, after, "membound:generation_tokens_total") == output
    assert _delta(before, after, "membound:request_success_total{finished_reason=length}") == GUIDELLM_REQUESTS
    for reason in ("abort", "error", "stop"):
        assert _delta(before, after, f"membound:request_success_total{{finished_reason={reason}}}") == 0
    print(f"guidellm took {took:.1f}s: {GUIDELLM_REQUESTS} requests, {prompt} prompt + {output} output tokens")
