"""membound vs llama.cpp (llama-cpp-python) vs HF transformers bf16 on CPU, on the same GGUF.

The default model is the embedded SmolLM2-135M-Instruct Q4_1 GGUF. membound runs it on the file's
own packed Q4_1 blocks, llama.cpp on the same file, and HF transformers gets the same weights
dequantized (membound's `quantization="none"`) and cast to bf16. Rows:

1. batch-1 decode tok/s: one prompt of --prompt-len tokens, --new-tokens greedy tokens. Decode
   rate = B x (N - 1) / (t(N new tokens) - t(1 new token)), which cancels prefill.
2. batched: --batch distinct prompts of --prompt-len tokens x --new-tokens each, all submitted at
   once: the same prefill-cancelled decode rate, and end-to-end output tokens / wall (B x N /
   t(N), prefill included). llama.cpp runs one `llama_decode` per step holding all B sequences
   (as llama-server batches its parallel slots), prompts in batches of up to 2048 tokens
   (membound's default step budget), greedy argmax in numpy on the logits.
3. prefill: time to first token (generate with max_tokens=1) for a --prefill-len-token prompt.
4. cold start: `membound generate "The capital of France is" --max-tokens 8` as a subprocess, and
   for llama.cpp a `python -c` that imports llama_cpp, loads the GGUF (n_ctx = the model's, as
   membound's default max_model_len) and streams 8 tokens. Both echo the prompt once the model is
   loaded, then stream tokens: wall from spawning the process to the echo ("loaded") and to the
   first generated text on stdout, and the process's peak RSS (ru_maxrss from wait4). The GGUF is
   in the page cache (earlier rows read it): this is process start, not disk, cost.
5. batch-1 decode again while a busy-loop process pinned to the first CPU competes for it;
   reported with its ratio to the quiet batch-1 rate of the same repeat.

Each measurement runs in its own subprocess (this script with `--worker ENGINE --task TASK`, a
job as JSON on stdin, one result line on stdout): llama.cpp's and torch's OpenMP runtimes stay
apart and every engine starts from a fresh process. A worker loads its engine, warms it up on
the same shapes with 2 new tokens, then times only generate calls. Engines alternate within each
repeat; the table gives median (min-max) over repeats and the median of the per-repeat ratios.
All engines get --threads threads: llama.cpp n_threads = n_threads_batch; torch.set_num_threads
for membound and HF, and OMP_NUM_THREADS for every subprocess; membound also gets num_threads (and
`generate --num-threads`) where it has them, unless --membound-threads auto leaves it its own
choice, which may adapt to a busy core. membound runs with prefix caching off, so the second call
on the same prompts prefills as the first did (llama.cpp's KV is cleared between calls; HF keeps
none).

    python benchmarks/cpu_vs_llamacpp.py [--repeats 3] [--new-tokens 128] [--prompt-len 64]
        [--batch 32] [--prefill-len 512] [--threads N] [--tasks decode1 batched prefill cold busy]
        [--engines membound llama.cpp hf] [--membound-threads fixed|auto] [--llamacpp-kv-unified]
        [--llamacpp-flash-attn auto|on|off] [--output FILE]

Writes JSON to benchmarks/results/cpu_vs_llamacpp_<date>.json.

llama-cpp-python is optional (its rows are skipped without it). Build it from source for this CPU:

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python --no-binary llama-cpp-python

On CPUs with AMX (Intel Sapphire Rapids and later) version 0.3.36 built that way segfaults in
`ggml_backend_amx_mul_mat` on this model; there, build without the AMX backend:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
        -DGGML_AVX512_VBMI=ON -DGGML_AMX_INT8=OFF" \
        pip install llama-cpp-python --no-binary llama-cpp-python
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENGINES = ("membound", "llama.cpp", "hf")
TASKS = ("decode1", "batched", "prefill", "cold", "busy")
COLD_PROMPT = "The capital of France is"
COLD_TOKENS = 8
RESULT_TAG = "RESULT "
LLAMACPP_INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python --no-binary llama-cpp-python'
TEXT = (
    "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
    "combined movable metal type, oil-based ink and a screw press adapted from wine making. "
)

# A token generator: (prompts, new tokens) -> (seconds, the first prompt's output token ids).
Runner = Callable[[list[list[int]], int], tuple[float, list[int]]]


# --------------------------------------------------------------------------- workers


def _kv_bytes(n_seq: int, seq_len: int) -> int:
    # 64 KiB a token covers SmolLM2-135M's fp32 KV (45 KiB); a floor keeps small jobs roomy.
    return max(256 << 20, n_seq * seq_len * (64 << 10))


def _membound_runner(job: dict[str, Any]) -> Runner:
    import dataclasses

    import torch

    from membound import LLM, EngineConfig, SamplingParams

    torch.set_num_threads(job["threads"])
    kw: dict[str, Any] = dict(
        max_model_len=job["seq_len"],
        kv_cache_memory_bytes=_kv_bytes(job["n_seq"], job["seq_len"]),
        max_num_seqs=max(256, job["n_seq"]),
        enable_prefix_caching=False,  # repeated prompts must prefill each time, as in the other engines
    )
    # fixed: exactly --threads, as the other engines get; auto: membound's own choice (and its
    # governor, where it has one, that drops a thread while another process keeps a core busy).
    if job["membound_threads"] == "fixed" and "num_threads" in {f.name for f in dataclasses.fields(EngineConfig)}:
        kw["num_threads"] = job["threads"]
    llm = LLM(job["model"], **kw)

    def run(prompts: list[list[int]], n: int) -> tuple[float, list[int]]:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return dt, list(outs[0].outputs[0].token_ids)

    return run


def _hf_runner(job: dict[str, Any]) -> Runner:
    import gc

    import torch

    from membound import LLM
    from membound.bench.hf import hf_twin

    torch.set_num_threads(job["threads"])
    # The same tensors as membound's, dequantized from the GGUF, then cast to bf16.
    llm = LLM(job["model"], quantization="none", dtype="float32", max_model_len=job["seq_len"])
    hf = hf_twin(llm.engine).to(torch.bfloat16).eval()
    del llm
    gc.collect()

    @torch.inference_mode()
    def run(prompts: list[list[int]], n: int) -> tuple[float, list[int]]:
        ids = torch.tensor(prompts)  # equal lengths: no padding
        t = time.perf_counter()
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        dt = time.perf_counter() - t
        assert out.shape[1] == ids.shape[1] + n
        return dt, out[0, ids.shape[1] :].tolist()

    return run


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's low-level API: every sequence of a call in one batch per step."""

    MAX_BATCH = 2048  # tokens per llama_decode while prefilling, as membound's default step budget

    def __init__(self, path: str, threads: int, n_seq: int, seq_len: int, kv_unified: bool, flash_attn: str):
        import llama_cpp as lc
        import numpy as np

        self.lc, self.np = lc, np
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        cp = lc.llama_context_default_params()
        per_seq = -(-seq_len // 256) * 256  # llama.cpp pads contexts to 256 cells anyway
        cp.n_ctx = per_seq * n_seq  # split into n_seq streams of per_seq cells unless kv_unified
        cp.n_batch = min(self.MAX_BATCH, cp.n_ctx)
        cp.n_ubatch = min(512, cp.n_batch)
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = kv_unified
        cp.flash_attn_type = {
            "auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO,
            "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        cp.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_batch = cp.n_batch
        self.batch = lc.llama_batch_init(max(self.n_batch, n_seq), 0, 1)
        self.mem = lc.llama_get_memory(self.ctx)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> Any:
        """One llama_decode of (token, position, sequence, wants logits); the greedy token of each output."""
        b, n_out = self.batch, 0
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
            n_out += out
        b.n_tokens = len(items)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        # Outputs are contiguous, in batch order.
        logits = self.np.ctypeslib.as_array(self.lc.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))
        return logits.argmax(axis=1)

    def __call__(self, prompts: list[list[int]], n: int) -> tuple[float, list[int]]:
        self.lc.llama_memory_clear(self.mem, False)
        t = time.perf_counter()
        items = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        cur = [0] * len(prompts)
        for c in range(0, len(items), self.n_batch):
            chunk = items[c : c + self.n_batch]
            for (_, _, s, _), tok in zip([x for x in chunk if x[3]], self._decode(chunk), strict=True):
                cur[s] = int(tok)
        first = [cur[0]]
        for step in range(1, n):  # the token of step k sits at position len(prompt) + k - 1
            cur = self._decode([(cur[s], len(p) + step - 1, s, True) for s, p in enumerate(prompts)]).tolist()
            first.append(cur[0])
        return time.perf_counter() - t, first


def _llamacpp_runner(job: dict[str, Any]) -> Runner:
    return LlamaCppRunner(
        job["model"], job["threads"], job["n_seq"], job["seq_len"], job["kv_unified"], job["flash_attn"]
    )


def worker(engine: str, task: str) -> None:
    """Load one engine, warm it up, time one task; print the result as one JSON line."""
    job = json.load(sys.stdin)
    prompts, n = job["prompts"], job["new_tokens"]
    make = {"membound": _membound_runner, "llama.cpp": _llamacpp_runner, "hf": _hf_runner}[engine]
    run = make(job)
    run(prompts, 2)  # warm-up: lazy init, allocator, graphs on these shapes
    if job.get("settle_tokens"):
        # Under a busy neighbour: run a while first, so an engine that adapts (membound's thread
        # governor reads the load every 0.5 s) is measured in its steady state, as a server would be.
        run(prompts, job["settle_tokens"])
    if task == "prefill":
        dt, toks = run(prompts, 1)
        res: dict[str, Any] = {"ttft_ms": dt * 1000}
    else:
        t1, _ = run(prompts, 1)
        tn, toks = run(prompts, n)
        b = len(prompts)
        rate = b * (n - 1) / (tn - t1) if tn > t1 else None  # None: too few tokens to tell decode from noise
        res = {"t1_s": t1, "tn_s": tn, "decode_tok_s": rate, "e2e_tok_s": b * n / tn}
    res["tokens"] = toks[:16]
    print(RESULT_TAG + json.dumps(res), flush=True)


# --------------------------------------------------------------------------- orchestrator


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_worker(engine: str, task: str, job: dict[str, Any], threads: int) -> dict[str, Any] | None:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", engine, "--task", task]
    p = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, env=_env(threads), timeout=3600)
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = "\n".join((p.stderr or "").strip().splitlines()[-15:])
    print(f"  {engine} {task}: worker failed (rc {p.returncode}):\n{tail}", file=sys.stderr)
    return None


LLAMACPP_COLD = """
import sys
from llama_cpp import Llama
path, prompt, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = Llama(path, n_ctx=0, n_threads=threads, n_threads_batch=threads, verbose=False)
print(prompt, end="", flush=True)
for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.0, stream=True):
    print(chunk["choices"][0]["text"], end="", flush=True)
print()
"""


def _membound_cli() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "membound"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "membound.entrypoints.cli"]


def _generate_has_flag(flag: str) -> bool:
    from membound.entrypoints.cli import build_parser

    sub = next(x for x in build_parser()._actions if isinstance(x, argparse._SubParsersAction))
    return flag in sub.choices["generate"]._option_string_actions


def cold_start(engine: str, model: str, threads: int, fixed_threads: bool) -> dict[str, Any] | None:
    """Spawn a fresh process that loads the model, echoes the prompt and streams 8 tokens; time its stdout."""
    if engine == "membound":
        cmd = [*_membound_cli(), "generate", COLD_PROMPT, "--max-tokens", str(COLD_TOKENS), "--model", model]
        if fixed_threads and _generate_has_flag("--num-threads"):
            cmd += ["--num-threads", str(threads)]
    else:
        cmd = [sys.executable, "-c", LLAMACPP_COLD, model, COLD_PROMPT, str(COLD_TOKENS), str(threads)]
    echo = len(COLD_PROMPT.encode())
    out, loaded, first = b"", None, None
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=_env(threads), bufsize=0)
        fd = p.stdout.fileno()
        while chunk := os.read(fd, 4096):  # raw reads: each chunk as soon as the child flushes it
            now = time.perf_counter()
            out += chunk
            if loaded is None and len(out) >= echo:
                loaded = now
            if first is None and out[echo:].strip():
                first = now
        p.stdout.close()
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage, not every child's so far
        end = time.perf_counter()
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0 or first is None:
            err.seek(0)
            tail = "\n".join(err.read().decode(errors="replace").strip().splitlines()[-15:])
            print(f"  {engine} cold start failed (rc {p.returncode}):\n{tail}", file=sys.stderr)
            return None
    return {
        "loaded_ms": (loaded - t0) * 1000,
        "first_token_ms": (first - t0) * 1000,
        "total_ms": (end - t0) * 1000,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "text": out.decode(errors="replace").strip(),
    }


BUSY = "import os\nos.sched_setaffinity(0, {%d})\nwhile True:\n    pass\n"


def _fmt(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


def cpu_info() -> dict[str, Any]:
    model, flags = "unknown", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    noted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    return {"model": model, "flags": {f: f in flags for f in noted}, "cpus_allowed": len(os.sched_getaffinity(0))}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# Table rows: key, label, where the per-repeat values come from, field, format, which way is better.
def _rows(a: argparse.Namespace) -> list[tuple[str, str, str, str, str]]:
    n, b = a.new_tokens, a.batch
    return [
        ("decode1", f"batch-1 decode tok/s ({n} new, {a.prompt_len}-token prompt) ↑", "decode1", "decode_tok_s", ".1f"),
        ("batched", f"batch-{b} decode tok/s, prefill cancelled ↑", "batched", "decode_tok_s", ".1f"),
        ("batched_e2e", f"batch-{b} output tok/s, {b}x{n} / wall ↑", "batched", "e2e_tok_s", ".1f"),
        ("prefill", f"prefill {a.prefill_len} tokens: TTFT ms ↓", "prefill", "ttft_ms", ".0f"),
        ("cold_loaded", "cold start: model loaded (prompt echoed) ms ↓", "cold", "loaded_ms", ".0f"),
        ("cold_first", f"cold start: first token ms ({COLD_TOKENS}-token generate) ↓", "cold", "first_token_ms", ".0f"),
        ("cold_rss", "cold start: peak RSS MiB ↓", "cold", "peak_rss_mib", ".0f"),
        ("busy", "batch-1 decode tok/s, CPU 0 busy ↑", "busy", "decode_tok_s", ".1f"),
        ("busy_ratio", "busy / quiet batch-1 decode ↑", "busy_ratio", "ratio", ".2f"),
    ]


def _cell(xs: list[float | None], fmt: str) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    med = format(statistics.median(xs), fmt)
    return med if len(xs) == 1 else f"{med} ({format(min(xs), fmt)}–{format(max(xs), fmt)})"


def _ratios(xs: list[float | None], ys: list[float | None]) -> list[float | None]:
    return [x / y if x is not None and y else None for x, y in zip(xs, ys, strict=True)]


def summarize(a: argparse.Namespace, raw: dict[str, dict[str, list]], engines: list[str]) -> tuple[str, dict]:
    """The markdown table and the per-row numbers for the JSON."""
    # busy / quiet of the same engine and repeat
    raw["busy_ratio"] = {
        e: [
            {"ratio": b["decode_tok_s"] / q["decode_tok_s"]}
            if b and q and b["decode_tok_s"] and q["decode_tok_s"]
            else None
            for b, q in zip(raw.get("busy", {}).get(e, []), raw.get("decode1", {}).get(e, []), strict=False)
        ]
        for e in engines
    }
    names = {"membound": "membound", "llama.cpp": "llama.cpp", "hf": "HF bf16"}
    lines = [
        "| | membound | llama.cpp | HF bf16 | membound / llama.cpp | membound / HF |",
        "|---|---|---|---|---|---|",
    ]
    rows = {}
    for key, label, src, field, fmt in _rows(a):
        if src not in raw:
            continue
        vals = {e: [r[field] if r else None for r in raw[src].get(e, [])] for e in ENGINES}
        if not any(v is not None for vs in vals.values() for v in vs):
            continue
        ratio = {o: _ratios(vals["membound"], vals[o]) if vals[o] else [] for o in ("llama.cpp", "hf")}
        cells = [_cell(vals[e], fmt) for e in ENGINES] + [_cell(ratio[o], ".2f") for o in ("llama.cpp", "hf")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        rows[key] = {
            "label": label,
            **{names[e]: vals[e] for e in ENGINES},
            "membound / llama.cpp": ratio["llama.cpp"],
            "membound / HF bf16": ratio["hf"],
        }
    return "\n".join(lines), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128, help="output tokens per sequence (rows 1, 2, 5)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence (rows 1, 2, 5)")
    ap.add_argument("--batch", type=int, default=32, help="sequences in the batched row")
    ap.add_argument("--prefill-len", type=int, default=512, help="prompt tokens of the prefill row")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument(
        "--llamacpp-kv-unified",
        action="store_true",
        help="one KV buffer shared by all sequences (default: a stream per sequence, each attending only its own)",
    )
    ap.add_argument("--llamacpp-flash-attn", choices=["auto", "on", "off"], default="auto")
    ap.add_argument(
        "--membound-threads",
        choices=["fixed", "auto"],
        default="fixed",
        help="fixed: num_threads=--threads where membound has that setting; auto: membound picks (default: fixed)",
    )
    ap.add_argument(
        "--output", default=None, help="JSON path (default: benchmarks/results/cpu_vs_llamacpp_<date>.json)"
    )
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.task)
        return

    from membound.model.registry import default_model_path
    from membound.model.tokenizer import Tokenizer

    model = a.model or default_model_path()
    engines = list(a.engines)
    if "llama.cpp" in engines and importlib.util.find_spec("llama_cpp") is None:
        print(f"llama-cpp-python is not installed; skipping its rows. Install it with:\n  {LLAMACPP_INSTALL}")
        print("(on CPUs with AMX see this script's docstring for the flags that avoid a segfault)")
        engines.remove("llama.cpp")

    # Token ids made once here, so every engine sees the very same prompts.
    base = Tokenizer.from_model_path(model).encode(TEXT * (1 + (a.batch + a.prefill_len) // 20))
    assert len(base) >= max(a.batch + a.prompt_len, a.prefill_len), "prompt text too short"
    common = {"model": model, "threads": a.threads, "kv_unified": a.llamacpp_kv_unified}
    common.update(flash_attn=a.llamacpp_flash_attn, membound_threads=a.membound_threads)

    def job(prompts: list[list[int]], n: int) -> dict[str, Any]:
        seq_len = -(-(len(prompts[0]) + n) // 16) * 16
        return {**common, "prompts": prompts, "new_tokens": n, "n_seq": len(prompts), "seq_len": seq_len}

    jobs = {
        "decode1": job([base[: a.prompt_len]], a.new_tokens),
        "batched": job([base[i : i + a.prompt_len] for i in range(a.batch)], a.new_tokens),  # distinct, equal length
        "prefill": job([base[: a.prefill_len]], 1),
    }
    jobs["busy"] = {**jobs["decode1"], "settle_tokens": 48}
    fields = {"decode1": "decode_tok_s", "batched": "decode_tok_s", "prefill": "ttft_ms", "busy": "decode_tok_s"}
    raw: dict[str, dict[str, list]] = {t: {e: [] for e in engines} for t in a.tasks}
    busy_cpu = min(os.sched_getaffinity(0))

    for r in range(a.repeats):
        for task in a.tasks:
            if task == "cold":
                for e in engines:
                    if e == "hf":
                        continue  # HF's own cold path (transformers' GGUF loader) is not what it runs here
                    res = cold_start(e, model, a.threads, a.membound_threads == "fixed")
                    raw[task][e].append(res)
                    if res:
                        print(
                            f"repeat {r + 1}/{a.repeats} cold {e}: first token {res['first_token_ms']:.0f} ms, "
                            f"peak RSS {res['peak_rss_mib']:.0f} MiB",
                            file=sys.stderr,
                        )
                continue
            busy = None
            if task == "busy":  # a spinning process on one CPU for the whole task
                busy = subprocess.Popen([sys.executable, "-c", BUSY % busy_cpu])
                time.sleep(0.5)
            try:
                for e in engines:
                    res = run_worker(e, "decode1" if task == "busy" else task, jobs[task], a.threads)
                    raw[task][e].append(res)
                    if res:
                        print(f"repeat {r + 1}/{a.repeats} {task} {e}: {_fmt(res[fields[task]])}", file=sys.stderr)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()

    table, rows = summarize(a, raw, engines)
    print(table)
    print(
        f"\n↑/↓: higher/lower is better; ratios are membound's value over the other's, median over repeats. "
        f"{a.threads} threads; batched decode = B x (N-1) / (t(N) - t(1)), batched output = B x N / t(N)."
    )
    # Greedy outputs of the first prompt: same file, so membound and llama.cpp should mostly agree.
    toks = {e: (raw.get("decode1", {}).get(e) or [None])[0] for e in engines}
    toks = {e: r["tokens"] for e, r in toks.items() if r}
    if len(toks) > 1:
        print("greedy tokens of prompt 0 (first 16): " + "; ".join(f"{e} {t}" for e, t in toks.items()))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    date = datetime.date.today().isoformat()
    result = {
        "benchmark": "cpu_vs_llamacpp",
        "date": date,
        "commit": commit.stdout.strip(),
        "cpu": cpu_info(),
        "threads": a.threads,
        "versions": {
            "python": sys.version.split()[0],
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            "llama_cpp_python": _version("llama_cpp_python"),
            "membound": _version("membound"),
        },
        "model": model,
        "args": {k: v for k, v in vars(a).items() if k not in ("worker", "task")},
        "engines": engines,
        "rows": rows,
        "raw": raw,
    }
    dest = pathlib.Path(a.output) if a.output else ROOT / "benchmarks" / "results" / f"cpu_vs_llamacpp_{date}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
