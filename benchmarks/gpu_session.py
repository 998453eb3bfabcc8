"""The GPU session: every GPU measurement of membound in one command, made to fit a short lease.

    bash scripts/gpu_check.sh [--smoke] [--phases tests,hf_peer:150]   # the wrapper: carried wheels, env
    python benchmarks/gpu_session.py [--smoke] [--out DIR] [--phases ...] [--list]

(--phases: a subset, in order; name:seconds replaces a phase's budget, e.g. for a rerun.)

Phases run one after another, cheapest and most telling first, each in its own subprocess that
is killed at its wall-clock budget (the rest still run; what a killed phase measured before the
kill is kept, since a phase rewrites its result file after every number):

  tests           pytest -m gpu over tests/ (files whose imports the machine lacks are reported, not run)
  teacher_forced  a random 4-layer Llama in bf16 on CUDA (graphs + async scheduling, the defaults),
                  its greedy tokens fed through the same weights in fp32 on CPU (HF transformers):
                  max |logit diff|, mean KL, top-1 agreement per step
  decode_8b       batch-1 decode tok/s, Llama-3-8B shape (dummy weights), bf16 and int4, async on/off
  decode_smollm2  SmolLM2-135M shape at batch 1 / 64 / 256, async on/off; batch 1 eager
  attention       the decode (batch 32 x 8K) and prefill (4K prompt) kernels next to SDPA
  quant           int4 / int8 dequantize-matmul kernels next to bf16 cuBLAS, Llama-3-8B layer shapes
  hf_peer         HF transformers at the decode_8b shape, static cache, torch.compile(reduce-overhead)

Bytes per decode step are the engine's own weight bytes + the KV bytes read; bandwidth shares are
against the copy bandwidth measured in the same phase (membound.plan.ceilings). Writes under OUT
(default benchmarks/results/gpu_<date>/; with --smoke a temporary folder): gpu_session.json
(every number, the device, versions, commit, each phase's status and time), gpu_session.log
(all phases' output) and gpu_session.png (the plots). The summary table is printed last.

--smoke runs the same phases on CPU at tiny sizes (Triton kernels in its interpreter), so the
script itself cannot rot; what needs CUDA (graphs, torch.compile) is recorded as skipped there.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if "--smoke" in sys.argv:  # CPU: Triton kernels run in its interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from membound.bench.common import commit, table  # noqa: E402
from membound.bench.hf import hf_llama_kwargs  # noqa: E402
from membound.bench.latency import decode_point  # noqa: E402
from membound.config import EngineConfig  # noqa: E402
from membound.engine.llm_engine import LLMEngine  # noqa: E402
from membound.entrypoints.llm import LLM  # noqa: E402
from membound.model.registry import PRESETS  # noqa: E402
from membound.plan.ceilings import Ceilings, measure  # noqa: E402
from membound.plan.gpus import match_device_name  # noqa: E402
from membound.sampling_params import SamplingParams  # noqa: E402

SESSION_S = 400  # phases' share of a 7-minute run on a cold GPU (start-up and plots take the rest)
SMOKE_SESSION_S = 240
RESERVE_S = 10  # kept back from the last phase for the plots and files
MIN_PHASE_S = 10
FILES = ("gpu_session.json", "gpu_session.log", "gpu_session.png")

# A random Llama for teacher forcing, with GQA. Larger initial weights make a random network chaotic
# (bf16 rounding grows through the layers); smaller ones flatten the logits into near-ties.
TEACHER = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.05,
)
# The shape every phase uses in --smoke (HF config names).
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,
)


def layer_shapes(preset: str) -> tuple[tuple[str, int, int], ...]:
    """(name, N, K) of one decoder layer's linear layers, from the preset."""
    c = PRESETS[preset]
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    h, i = c.hidden_size, c.intermediate_size
    return (("qkv", q + 2 * kv, h), ("o", h, q), ("gate_up", 2 * i, h), ("down", h, i))


LLAMA3_8B_LAYER = layer_shapes("llama-3-8b")
SMOKE_LAYER = (("qkv", 48, 128), ("o", 32, 128), ("gate_up", 96, 128), ("down", 32, 256))


# ---------------------------------------------------------------- what a phase reports


@dataclasses.dataclass
class Recorder:
    """A phase's findings, rewritten to its result file after every number: a phase killed at
    its budget still reports what it measured."""

    path: pathlib.Path
    smoke: bool
    status: str = "ok"
    note: str | None = None
    numbers: dict = dataclasses.field(default_factory=dict)
    key_numbers: list[str] = dataclasses.field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    def put(self, key: str, value) -> None:
        self.numbers[key] = value
        self.flush()

    def key(self, text: str) -> None:
        """A number for the summary table (also printed into the log)."""
        self.key_numbers.append(text)
        print(f"  {text}", flush=True)
        self.flush()

    def fail(self, why: str) -> None:
        self.status, self.note = "failed", why
        print(f"  FAILED: {why}", flush=True)
        self.flush()

    def skip(self, why: str) -> None:
        self.status, self.note = "skipped", why
        self.flush()

    def flush(self) -> None:
        data = {"status": self.status, "note": self.note, "key_numbers": self.key_numbers, "numbers": self.numbers}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.path)  # whole files only: the parent may read it after a kill


def release(device: str) -> None:
    """Give a freed engine's memory back: collect first (engines hold reference cycles), then
    return the allocator's cached blocks."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def ceilings(rec: Recorder) -> Ceilings:
    c = measure(rec.device, quick=rec.smoke)
    spec = match_device_name(c.device) if rec.device == "cuda" else None
    rec.put("ceilings", {**dataclasses.asdict(c), "spec_bandwidth_gbs": spec.bandwidth_gbs if spec else None})
    return c


def graphs_on(engine: LLMEngine) -> bool:
    return engine.uses_cuda_graphs


def run_dtype(rec: Recorder) -> str:
    return "float32" if rec.smoke else "bfloat16"  # the Triton interpreter mishandles bf16


@contextlib.contextmanager
def dummy_model(rec: Recorder, preset: str):
    """What to load with load_format="dummy": the preset on the GPU; in --smoke a folder holding
    only a config.json of the TINY shape."""
    if not rec.smoke:
        yield preset
        return
    with tempfile.TemporaryDirectory() as d:
        cfg = {"architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5, **TINY}
        (pathlib.Path(d) / "config.json").write_text(json.dumps(cfg))
        yield d


def time_calls(calls: list[Callable], dev: str, iters: int, repeats: int = 5) -> tuple[float, float | None]:
    """(us per call, eager us per call or None): the calls run round-robin, `iters` per timing.

    On CUDA the loop is captured in a CUDA graph and replayed, so the host's launch cost is not
    counted; the eager figure beside it is the same loop launched from Python."""
    for _ in range(2):  # warm-up: compiles, fills the allocator's caches
        for c in calls:
            c()

    def loop():
        for i in range(iters):
            calls[i % len(calls)]()

    if dev != "cuda":
        t = time.perf_counter()
        loop()
        return (time.perf_counter() - t) / iters * 1e6, None

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / iters)
        return statistics.median(times)

    torch.cuda.synchronize()
    eager = timed(loop)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loop()
    graph.replay()
    us = timed(graph.replay)
    del graph
    return us, eager


# ---------------------------------------------------------------- phase: tests


def missing_imports(path: pathlib.Path, seen: set[pathlib.Path] | None = None) -> list[str]:
    """Top-level modules a test file (or a tests/ helper it imports) needs that are not installed."""
    seen = set() if seen is None else seen
    seen.add(path)
    missing = set()
    for node in ast.parse(path.read_text()).body:  # module level only: guarded imports are the file's business
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            base = ROOT / name.replace(".", "/")
            local = next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)
            if local is not None:  # this repository's own module: what it imports counts too
                if local not in seen:
                    missing.update(missing_imports(local, seen))
            elif importlib.util.find_spec(name.split(".")[0]) is None:
                missing.add(name.split(".")[0])
    return sorted(missing)


class PytestOutcomes:
    """A pytest plugin counting outcomes as they come, into the phase's result (kept if killed)."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.counts = dict.fromkeys(("passed", "failed", "errors", "skipped"), 0)
        self.failures: list[str] = []

    def _count(self, kind: str, nodeid: str | None = None) -> None:
        self.counts[kind] += 1
        if nodeid is not None:
            self.failures.append(nodeid)
        self.rec.put("counts", self.counts)
        self.rec.put("failures", self.failures)

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            self._count("failed" if report.when == "call" else "errors", report.nodeid)
        elif report.skipped:
            self._count("skipped")
        elif report.when == "call":
            self._count("passed")

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self._count("errors", report.nodeid or "collection")


def phase_tests(rec: Recorder) -> None:
    import pytest

    tests = ROOT / "tests"
    lacking = {str(p.relative_to(ROOT)): m for p in sorted(tests.glob("test_*.py")) if (m := missing_imports(p))}
    rec.put("not_collected", lacking)
    outcomes = PytestOutcomes(rec)
    # In --smoke the tests also marked `cpu` are left to the ordinary CPU suite; the rest skip there.
    marks = "gpu and not cpu" if rec.smoke else "gpu"
    rec.put("marks", marks)
    args = ["-q", "-m", marks, "-p", "no:cacheprovider", "-rfE", "--durations=5", str(tests)]
    rc = pytest.main(args + [f"--ignore={ROOT / f}" for f in lacking], plugins=[outcomes])
    c = outcomes.counts
    rec.put("pytest_exit", int(rc))
    rec.key(f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped")
    if lacking:
        rec.key(
            f"not collected (missing {', '.join(sorted({m for ms in lacking.values() for m in ms}))}): "
            f"{len(lacking)} files"
        )
    if c["failed"] or c["errors"]:
        rec.fail(f"{c['failed'] + c['errors']} failed: {', '.join(outcomes.failures[:3])}")
    elif rc not in (0, 5):  # 5: no test was collected
        rec.fail(f"pytest exited {int(rc)}")


# ---------------------------------------------------------------- phase: teacher_forced


def capture_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """Every logits tensor the engine computes, in order: the LM head runs outside the CUDA graphs,
    so this sees the graphed, look-ahead decode path as it runs."""
    seen: list[torch.Tensor] = []
    inner = engine.model.compute_logits

    def hook(hidden: torch.Tensor) -> torch.Tensor:
        out = inner(hidden)
        seen.append(out.detach().clone())  # on the device: no sync inside the pipeline
        return out

    engine.model.compute_logits = hook
    return seen


def engine_greedy(rec: Recorder, path: str, max_len: int, prompts: list[list[int]], new: int) -> list[dict]:
    """Greedy decode of each prompt alone (batch 1), with async scheduling (the CUDA default, asked
    for so that the CPU smoke runs the look-ahead too) and, on CUDA, graphs; per prompt its tokens,
    their logprobs (public API) and the full logits of every step (hook)."""
    llm = LLM(
        path,
        device=rec.device,
        dtype=run_dtype(rec),
        skip_tokenizer_init=True,
        async_scheduling=True,
        max_model_len=max_len,
        max_num_seqs=8,
        kv_cache_memory_bytes=64 << 20,
    )
    engine = llm.engine
    try:
        rec.put(
            "engine",
            {
                "dtype": run_dtype(rec),
                "cuda_graphs": graphs_on(engine),
                "async_scheduling": engine.async_scheduling,
                "attention_backend": engine.backend.name,
            },
        )
        seen = capture_logits(engine)
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, logprobs=0)
        runs = []
        for prompt in prompts:
            seen.clear()
            out = llm.generate(prompt, params)[0].outputs[0]
            n = len(out.token_ids)
            # A look-ahead step launched before the request's end adds trailing logits: dropped.
            logits = torch.cat(seen[:n]).float().cpu() if len(seen) >= n else None
            runs.append(
                {
                    "prompt": prompt,
                    "tokens": out.token_ids,
                    "logprobs": [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids, strict=True)],
                    "logits": logits,
                    "calls": len(seen),
                }
            )
        return runs
    finally:
        del llm, engine
        release(rec.device)


@torch.inference_mode()
def teacher_stats(teacher, run: dict) -> dict:
    """The engine's step logits against the fp32 teacher's on the engine's own tokens."""
    prompt, tokens = run["prompt"], run["tokens"]
    ref = teacher(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    lp_ref, lp_got = ref.log_softmax(-1), run["logits"].log_softmax(-1)
    tok = torch.tensor(tokens)[:, None]
    got_lp = torch.tensor(run["logprobs"])
    kl = (lp_ref.exp() * (lp_ref - lp_got)).sum(-1)  # KL(teacher || engine) per step
    return {
        "prompt_len": len(prompt),
        "steps": len(tokens),
        "max_abs_logit_diff": (run["logits"] - ref).abs().max().item(),
        "mean_kl": kl.mean().item(),
        "max_kl": kl.max().item(),
        "top1_agreement": (ref.argmax(-1) == tok[:, 0]).float().mean().item(),
        "max_abs_logprob_diff": (got_lp - lp_ref.gather(1, tok)[:, 0]).abs().max().item(),
        # The hook's logits must give the logprobs the engine returned: else it saw other steps.
        "hook_vs_logprobs": (got_lp - lp_got.gather(1, tok)[:, 0]).abs().max().item(),
    }


def phase_teacher_forced(rec: Recorder) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = TINY if rec.smoke else TEACHER
    lens, new = ((9, 40), 12) if rec.smoke else ((17, 100, 300), 64)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, shape["vocab_size"], (n,), generator=gen).tolist() for n in lens]
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(LlamaConfig(**shape)).float().eval()
        with torch.no_grad():  # weights bf16 holds exactly: the engine runs the very same numbers
            for p in teacher.parameters():
                p.copy_(p.bfloat16())
        teacher.save_pretrained(d, safe_serialization=True)
        runs = engine_greedy(rec, d, min(512, shape["max_position_embeddings"]), prompts, new)
    if any(r["logits"] is None for r in runs):
        rec.fail(f"the logits hook saw {[r['calls'] for r in runs]} calls for {new} tokens per prompt")
        return
    stats = [teacher_stats(teacher, r) for r in runs]
    rec.put("per_prompt", stats)
    worst = {
        "max_abs_logit_diff": max(s["max_abs_logit_diff"] for s in stats),
        "mean_kl": statistics.fmean(s["mean_kl"] for s in stats),
        "max_kl": max(s["max_kl"] for s in stats),
        "top1_agreement": min(s["top1_agreement"] for s in stats),
        "hook_vs_logprobs": max(s["hook_vs_logprobs"] for s in stats),
    }
    rec.put("worst", worst)
    rec.key(
        f"top-1 {worst['top1_agreement']:.1%}, mean KL {worst['mean_kl']:.2e}, "
        f"max |dlogit| {worst['max_abs_logit_diff']:.3f}"
    )
    if worst["hook_vs_logprobs"] > 1e-3:
        rec.fail(f"hook logits disagree with returned logprobs by {worst['hook_vs_logprobs']:.2e}")
    # bf16 rounding alone gives a mean KL near 1e-4 and ~95% top-1 (flips at near-ties); a wrong
    # token, position or KV block gives KL of order 1 at the steps it touches.
    elif worst["mean_kl"] > 0.01 or worst["max_kl"] > 0.1 or worst["top1_agreement"] < 0.8:
        rec.fail("the engine's logits drift from the fp32 teacher (mean KL > 0.01, a step > 0.1, or top-1 < 80%)")


# ---------------------------------------------------------------- phases: decode


def decode_engine(rec: Recorder, model: str, **kw) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=model, load_format="dummy", device=rec.device, dtype=run_dtype(rec), skip_tokenizer_init=True, **kw
        )
    )


def measure_decode(rec: Recorder, label: str, engine_kw: dict, batches, context: int, steps: int, ceil) -> dict:
    """Decode points (membound.bench.latency) of one engine, async scheduling on and off, each
    after a short warm-up run in the same mode. {key: point}."""
    spec = match_device_name(ceil.device) if rec.device == "cuda" else None
    engine = decode_engine(rec, **engine_kw)
    points = {}
    try:
        rng = random.Random(0)
        for batch in batches:
            for on in (True, False):
                engine.async_scheduling = on
                decode_point(engine, rng, batch, 16, 2, ceil)  # the first steps of a mode pay one-time costs
                p = decode_point(engine, rng, batch, context, steps, ceil)
                p.update(
                    dtype=str(engine.dtype).removeprefix("torch."),
                    quantization=engine.quantization,
                    cuda_graphs=graphs_on(engine),
                    async_scheduling=on,
                )
                if spec and "achieved_gbs" in p:
                    p["share_of_spec_bandwidth"] = p["achieved_gbs"] / spec.bandwidth_gbs
                key = f"{label}/b{batch}/{'async' if on else 'sync'}"
                rec.put(key, p)
                points[key] = p
    finally:
        del engine
        release(rec.device)
    return points


def point_text(p: dict) -> str:
    if "tok_s" not in p:
        return f"skipped ({p.get('skipped')})"
    return f"{p['tok_s']:,.0f} tok/s ({p['roofline_share']:.0%} bw)"


def phase_decode_8b(rec: Recorder) -> None:
    ceil = ceilings(rec)
    context, steps = (32, 4) if rec.smoke else (512, 128)
    kw = dict(
        max_model_len=TINY["max_position_embeddings"] if rec.smoke else 1024,
        kv_cache_memory_bytes=(16 << 20) if rec.smoke else (2 << 30),
        max_num_seqs=4,
        max_num_batched_tokens=1024,
    )
    with dummy_model(rec, "llama-3-8b") as model:
        for quant, label in (("none", "dense"), ("int4", "int4")):
            pts = measure_decode(rec, label, dict(model=model, quantization=quant, **kw), [1], context, steps, ceil)
            name = quant if quant != "none" else "fp32" if rec.smoke else "bf16"
            rec.key(f"{name} {point_text(pts[f'{label}/b1/async'])}, sync {point_text(pts[f'{label}/b1/sync'])}")


def phase_decode_smollm2(rec: Recorder) -> None:
    ceil = ceilings(rec)
    batches, context, steps = ((1, 4), 32, 4) if rec.smoke else ((1, 64, 256), 256, 64)
    kw = dict(
        max_model_len=TINY["max_position_embeddings"] if rec.smoke else 1024,
        kv_cache_memory_bytes=(16 << 20) if rec.smoke else (4 << 30),
        max_num_seqs=max(batches),
        max_num_batched_tokens=8192,
    )
    with dummy_model(rec, "smollm2-135m") as model:
        pts = measure_decode(rec, "default", dict(model=model, **kw), batches, context, steps, ceil)
    for b in batches:
        rec.key(f"b{b} {point_text(pts[f'default/b{b}/async'])}, sync {point_text(pts[f'default/b{b}/sync'])}")
    if rec.smoke:
        rec.put("eager", "skipped: CUDA graphs need CUDA (decode on CPU is always eager)")
        return
    eager = measure_decode(
        rec,
        "eager",
        dict(model="smollm2-135m", enforce_eager=True, **{**kw, "max_num_seqs": 8}),
        [1],
        context,
        steps,
        ceil,
    )
    rec.key(f"b1 eager {point_text(eager['eager/b1/async'])}")


# ---------------------------------------------------------------- phase: attention


def paged_kv(kvh: int, seqs: int, pages: int, bs: int, d: int, dtype, dev: str):
    """A paged K/V cache of seqs x pages blocks in scrambled order, its block table, and the
    contiguous [seqs, kvh, pages * bs, d] copies of the same bytes (for SDPA)."""
    k = torch.randn(kvh, seqs * pages, bs, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    table_ = torch.randperm(seqs * pages, device=dev).to(torch.int32).view(seqs, pages)

    def contiguous(c: torch.Tensor) -> torch.Tensor:
        return c[:, table_.long()].permute(1, 0, 2, 3, 4).reshape(seqs, kvh, pages * bs, d).contiguous()

    return k, v, table_, contiguous(k), contiguous(v)


def difference(got: torch.Tensor, want: torch.Tensor) -> dict:
    err = (got.float() - want.float()).abs().max().item()
    return {"max_abs_err_vs_sdpa": err, "rel_err_vs_sdpa": err / want.float().abs().max().item()}


def decode_attention(dev: str, dtype, shape: tuple, batch: int, context: int, iters: int, bw_gbs: float) -> dict:
    from membound.kernels.decode_attention import paged_decode_attention

    heads, kvh, d, bs = shape
    k, v, table_, kc, vc = paged_kv(kvh, batch, context // bs, bs, d, dtype, dev)
    q = torch.randn(batch, heads, d, device=dev, dtype=dtype)
    lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    q4 = q[:, :, None].contiguous()
    scale = d**-0.5

    def kernel():
        return paged_decode_attention(q, k, v, table_, lens, scale)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q4, kc, vc, scale=scale, enable_gqa=True)

    nbytes = 2 * batch * context * kvh * d * k.element_size()
    row = {"batch": batch, "context": context, "kv_bytes": nbytes, **difference(kernel(), sdpa()[:, :, 0])}
    for name, fn in (("kernel", kernel), ("sdpa", sdpa)):
        us, eager = time_calls([fn], dev, iters)
        row[name] = {
            "us": us,
            "eager_us": eager,
            "gbs": nbytes / us / 1e3,
            "share_of_copy_bw": nbytes / us / 1e3 / bw_gbs,
        }
    return row


def prefill_attention(dev: str, dtype, shape: tuple, prompt: int, iters: int) -> dict:
    from membound.kernels.prefill_attention import paged_prefill_attention

    heads, kvh, d, bs = shape
    k, v, table_, kc, vc = paged_kv(kvh, 1, prompt // bs, bs, d, dtype, dev)
    q = torch.randn(prompt, heads, d, device=dev, dtype=dtype)
    qh = q.transpose(0, 1)[None].contiguous()
    lens = torch.tensor([prompt], dtype=torch.int32, device=dev)
    starts = torch.tensor([0, prompt], dtype=torch.int32, device=dev)
    scale = d**-0.5

    def kernel():
        return paged_prefill_attention(q, k, v, table_, lens, starts, prompt, scale)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(
            qh, kc, vc, is_causal=True, scale=scale, enable_gqa=True
        )

    flops = 4 * heads * d * prompt * (prompt + 1) / 2  # QK^T and PV over the causal triangle
    row = {"prompt": prompt, "flops": flops, **difference(kernel(), sdpa()[0].transpose(0, 1))}
    for name, fn in (("kernel", kernel), ("sdpa", sdpa)):
        us, eager = time_calls([fn], dev, iters)
        row[name] = {"us": us, "eager_us": eager, "tflops": flops / us / 1e6}
    return row


def phase_attention(rec: Recorder) -> None:
    ceil = ceilings(rec)
    dtype = torch.float32 if rec.smoke else torch.bfloat16
    shape = (4, 2, 32, 16) if rec.smoke else (32, 8, 128, 16)  # q heads, KV heads, head_dim, block_size
    batch, context, prompt, iters = (2, 64, 32, 2) if rec.smoke else (32, 8192, 4096, 20)
    dec = decode_attention(rec.device, dtype, shape, batch, context, iters, ceil.copy_bandwidth_gbs)
    rec.put("decode", dec)
    rec.key(
        f"decode b{batch}x{context}: {dec['kernel']['gbs']:,.0f} GB/s "
        f"({dec['kernel']['share_of_copy_bw']:.0%} bw), SDPA {dec['sdpa']['gbs']:,.0f}"
    )
    pre = prefill_attention(rec.device, dtype, shape, prompt, iters)
    rec.put("prefill", pre)
    rec.key(f"prefill {prompt}: {pre['kernel']['tflops']:,.1f} TFLOP/s, SDPA {pre['sdpa']['tflops']:,.1f}")
    # Relative to the largest output: bf16 rounding is ~1e-2 of it, a wrong key, head or mask ~1.
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-3
    if max(dec["rel_err_vs_sdpa"], pre["rel_err_vs_sdpa"]) > tol:
        rec.fail(f"a kernel's output differs from SDPA's by more than {tol} of its largest value")


# ---------------------------------------------------------------- phase: quant


def make_weight(fmt: str, n: int, k: int, group: int, dtype, dev: str) -> tuple:
    """One copy of a format's tensors: random codes, positive scales, random zeros."""
    if fmt == "int4":
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.int32, device=dev).to(torch.uint8)
        scale = (torch.rand(n, k // group, device=dev) * 0.02 + 0.005).to(dtype)
        return packed, scale, (torch.randn(n, k // group, device=dev) * 0.05).to(dtype)
    if fmt == "int8":
        q = torch.randint(-127, 128, (n, k), dtype=torch.int32, device=dev).to(torch.int8)
        return q, (torch.rand(n, 1, device=dev) * 0.002 + 0.0005).to(dtype)
    return ((torch.randn(n, k, device=dev) * 0.02).to(dtype),)


def quant_kernels(fmt: str, k: int, group: int):
    """(call(x, tensors), reference(x, tensors) or None) of a format."""
    from membound.kernels.quant_matmul import int4_matmul, int4_matmul_ref, int8_matmul, int8_matmul_ref

    if fmt == "int4":
        return (lambda x, t: int4_matmul(x, *t, group)), (lambda x, t: int4_matmul_ref(x, *t, group))
    if fmt == "int8":  # one scale per output channel (as Int8Linear stores it): group_size == K
        return (lambda x, t: int8_matmul(x, t[0], t[1], None, k)), (
            lambda x, t: int8_matmul_ref(x, t[0], t[1], None, k)
        )
    return (lambda x, t: x @ t[0].T), None


def copies_for(weight_bytes: int, dev: str) -> int:
    """Copies of a weight that overflow L2 twice over (an H100's 50 MB would hold an int4 o_proj)."""
    if dev != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    return max(1, math.ceil(2 * l2 / weight_bytes))


def quant_shape(name: str, n: int, k: int, group: int, dev: str, iters: int, copy_gbs: float) -> dict:
    """M = 1 through one N x K matrix: the dense matmul, int4_matmul and int8_matmul."""
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    x = torch.randn(1, k, device=dev).to(dtype)
    row: dict = {"shape": name, "n": n, "k": k}
    base_us = None
    for fmt in ("dense", "int4", "int8"):
        call, ref = quant_kernels(fmt, k, group)
        tensors = make_weight(fmt, n, k, group, dtype, dev)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        copies = [tensors] + [make_weight(fmt, n, k, group, dtype, dev) for _ in range(copies_for(nbytes, dev) - 1)]
        entry: dict = {"bytes": nbytes, "copies": len(copies)}
        if ref is not None:  # a correctness check before any timing
            want = ref(x, tensors).float()
            entry["max_err_rel"] = ((call(x, tensors).float() - want).abs().max() / want.abs().max()).item()
        us, eager = time_calls([lambda t=t, f=call: f(x, t) for t in copies], dev, iters)
        entry.update(us=us, eager_us=eager, gbs=nbytes / us / 1e3, share_of_copy_bw=nbytes / us / 1e3 / copy_gbs)
        base_us = base_us or us
        entry["speedup"] = base_us / us
        row[fmt] = entry
        del copies
        release(dev)
    return row


def phase_quant(rec: Recorder) -> None:
    ceil = ceilings(rec)
    group, iters = (32, 3) if rec.smoke else (128, 200)
    rec.put(
        "setup",
        {
            "m": 1,
            "int4_group_size": group,
            "int8_group_size": "per-channel",
            "iters": iters,
            "dense": "bf16 x @ w.T (cuBLAS)" if rec.device == "cuda" else "fp32 x @ w.T",
        },
    )
    rows = []
    for name, n, k in SMOKE_LAYER if rec.smoke else LLAMA3_8B_LAYER:
        rows.append(quant_shape(name, n, k, group, rec.device, iters, ceil.copy_bandwidth_gbs))
        rec.put("shapes", rows)
    flat = [
        {
            "shape": r["shape"],
            **{f"{f}_{m}": r[f][m] for f in ("dense", "int4", "int8") for m in ("us", "gbs")},
            "int4_x": r["int4"]["speedup"],
            "int8_x": r["int8"]["speedup"],
        }
        for r in rows
    ]
    cols = (
        [("shape", "shape", "s")]
        + [(f"{f}_{m}", f"{f} {m}", ".1f") for f in ("dense", "int4", "int8") for m in ("us", "gbs")]
        + [("int4_x", "int4 x", ".2f"), ("int8_x", "int8 x", ".2f")]
    )
    print(table(flat, cols), flush=True)
    total = {f: sum(r[f]["us"] for r in rows) for f in ("dense", "int4", "int8")}
    err = max(r[f]["max_err_rel"] for r in rows for f in ("int4", "int8"))
    rec.put("layer_us", total)
    rec.key(
        f"layer: int4 x{total['dense'] / total['int4']:.2f}, int8 x{total['dense'] / total['int8']:.2f} "
        f"vs dense; max rel err {err:.1e}"
    )
    if err > 2e-2:
        rec.fail(f"a quantized matmul is off its reference by {err:.1e} (relative)")


# ---------------------------------------------------------------- phase: hf_peer


def hf_llama(shape: dict, dev: str, dtype):
    """transformers' LlamaForCausalLM with random weights, built on the device in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # weights are created in bf16 directly: no fp32 copy of 8B first
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def hf_decode(model, ids: torch.Tensor, new: int) -> dict:
    """One greedy generate() with a static cache; decode step time = the median gap between
    successive logits-processor calls (generate syncs every step, so gaps are whole steps)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamps(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    stamps = Stamps()
    t = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=0,
        logits_processor=LogitsProcessorList([stamps]),
    )
    wall = time.perf_counter() - t
    gaps = [b - a for a, b in zip(stamps.times, stamps.times[1:], strict=False)][2:]  # past the first steps
    step = statistics.median(gaps)
    return {"prompt_len": ids.shape[1], "new_tokens": new, "generate_s": wall, "step_ms": step * 1e3, "tok_s": 1 / step}


def phase_hf_peer(rec: Recorder) -> None:
    import transformers

    shape = TINY if rec.smoke else hf_llama_kwargs(PRESETS["llama-3-8b"], max_position_embeddings=1024)
    prompt, new = (32, 8) if rec.smoke else (512, 128)  # decode_8b's context and steps
    t = time.perf_counter()
    model = hf_llama(shape, rec.device, torch.float32 if rec.smoke else torch.bfloat16)
    rec.put("setup", {"transformers": transformers.__version__, "build_s": time.perf_counter() - t, "shape": shape})
    ids = torch.randint(1, shape["vocab_size"], (1, prompt), device=rec.device)
    # Eager first: a number even if compiling runs past the budget.
    model.generation_config.disable_compile = True
    eager = hf_decode(model, ids, new)
    rec.put("eager", eager)
    rec.key(f"static cache eager {eager['tok_s']:,.1f} tok/s")
    if rec.smoke:
        rec.put("compiled", "skipped: torch.compile(mode='reduce-overhead') needs CUDA graphs")
        return
    model.generation_config.disable_compile = False
    try:
        from transformers import CompileConfig
    except ImportError:  # before transformers' own compile of decode steps: compile the forward
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    else:
        model.generation_config.compile_config = CompileConfig(mode="reduce-overhead", fullgraph=True)
    t = time.perf_counter()
    hf_decode(model, ids, new)  # compiles (same shapes as the timed call: no recompiles)
    rec.put("compile_s", time.perf_counter() - t)
    compiled = hf_decode(model, ids, new)
    rec.put("compiled", compiled)
    rec.key(f"compiled {compiled['tok_s']:,.1f} tok/s (compile {rec.numbers['compile_s']:.0f} s)")


# ---------------------------------------------------------------- the phases


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    budget_s: int  # on the GPU; the seven add up to SESSION_S
    smoke_budget_s: int
    run: Callable[[Recorder], None]


PHASES = (
    Phase("tests", 85, 60, phase_tests),
    Phase("teacher_forced", 35, 60, phase_teacher_forced),
    Phase("decode_8b", 95, 60, phase_decode_8b),
    Phase("decode_smollm2", 50, 60, phase_decode_smollm2),
    Phase("attention", 25, 60, phase_attention),
    Phase("quant", 30, 60, phase_quant),
    Phase("hf_peer", 80, 60, phase_hf_peer),
)


def phase_named(name: str) -> Phase:
    for p in PHASES:
        if p.name == name:
            return p
    raise SystemExit(f"unknown phase {name!r}; phases: {', '.join(p.name for p in PHASES)}")


# ---------------------------------------------------------------- the session (parent process)


def gpu_info() -> dict | None:
    """The GPU as nvidia-smi names it (NVML where nvidia-smi is missing); None without one."""
    fields = ("name", "driver_version", "memory.total", "clocks.max.sm", "power.limit")
    try:
        r = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode == 0 and r.stdout.strip():
            values = [v.strip() for v in r.stdout.splitlines()[0].split(",")]
            return {"source": "nvidia-smi", **dict(zip(fields, values, strict=False))}
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {
            "source": "nvml",
            "name": pynvml.nvmlDeviceGetName(h),
            "driver_version": pynvml.nvmlSystemGetDriverVersion(),
            "memory.total": pynvml.nvmlDeviceGetMemoryInfo(h).total,
        }
    except Exception:  # noqa: BLE001 - no driver, no GPU, or no nvidia-ml-py
        return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "transformers", "numpy", "gguf", "pytest"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def tail(path: pathlib.Path, offset: int, chars: int = 3000) -> str:
    with open(path, "rb") as f:
        f.seek(max(offset, os.path.getsize(path) - chars))
        return f.read().decode(errors="replace")


def stop(proc: subprocess.Popen) -> None:
    """End a phase and everything it started (its own process group): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_phase(phase: Phase, budget: float, smoke: bool, log_path: pathlib.Path, work: pathlib.Path) -> dict:
    """The phase in its own subprocess, its output appended to the log, killed at its budget."""
    result = work / f"{phase.name}.json"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--phase", phase.name, "--result", str(result)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    with open(log_path, "a") as log:
        log.write(f"\n===== {phase.name} (budget {budget:.0f} s) =====\n")
        offset = log.tell()
        log.flush()
        t = time.monotonic()
        proc = subprocess.Popen(
            cmd + (["--smoke"] if smoke else []),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        try:
            rc, killed = proc.wait(timeout=budget), False
        except subprocess.TimeoutExpired:
            stop(proc)
            rc, killed = proc.returncode, True
        except BaseException:  # interrupted or terminated: the phase, in its own session, must not outlive us
            stop(proc)
            raise
    seconds = time.monotonic() - t
    found = json.loads(result.read_text()) if result.is_file() else {}
    status = "killed" if killed else found.get("status", "failed") if rc == 0 else "failed"
    entry = {"status": status, "seconds": round(seconds, 1), "budget_s": round(budget), "rc": rc, **found}
    entry["status"] = status
    if killed:
        entry["note"] = f"killed at its {budget:.0f} s budget"
    elif rc != 0 and not entry.get("note"):
        entry["note"] = f"exited {rc}"
    if status in ("failed", "killed"):
        entry["tail"] = tail(log_path, offset)
    return entry


def derived(phases: dict) -> dict:
    """Numbers across phases: membound against the HF peer at the same shape, batch 1."""
    ours = phases.get("decode_8b", {}).get("numbers", {}).get("dense/b1/async", {}).get("tok_s")
    hf = phases.get("hf_peer", {}).get("numbers", {})
    out = {}
    for mode in ("eager", "compiled"):
        theirs = hf.get(mode, {}).get("tok_s") if isinstance(hf.get(mode), dict) else None
        if ours and theirs:
            out[f"membound_over_hf_{mode}_batch1"] = ours / theirs
    return out


def summary(phases: dict, extra: dict) -> str:
    rows = []
    for name, e in phases.items():
        key = "; ".join(e.get("key_numbers") or [])
        if e["status"] in ("failed", "killed", "skipped") and e.get("note"):
            key = f"{e['note']}" + (f" | {key}" if key else "")
        rows.append({"phase": name, "status": e["status"], "seconds": e.get("seconds"), "key": key})
    for k, v in extra.items():
        rows.append({"phase": "derived", "status": "", "seconds": None, "key": f"{k} = {v:.2f}"})
    return table(
        rows, [("phase", "phase", "s"), ("status", "status", "s"), ("seconds", "s", ".1f"), ("key", "key numbers", "s")]
    )


def bars(ax, labels: list[str], values: list[float], ylabel: str, title: str) -> bool:
    if not values:
        ax.set_axis_off()
        return False
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    for i, v in enumerate(values):
        ax.annotate(f"{v:,.3g}", (i, v), ha="center", va="bottom", fontsize=7)
    return True


def plot(phases: dict, path: pathlib.Path, title: str) -> str | None:
    """One PNG with a panel per measuring phase (None if nothing was measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def nums(name: str) -> dict:
        return phases.get(name, {}).get("numbers", {})

    def tok_s(name: str) -> tuple[list[str], list[float]]:
        pts = {k: v for k, v in nums(name).items() if isinstance(v, dict) and "tok_s" in v and "/" in k}
        return list(pts), [v["tok_s"] for v in pts.values()]

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    labels, values = tok_s("decode_8b")
    for mode in ("eager", "compiled"):
        if isinstance(nums("hf_peer").get(mode), dict):
            labels.append(f"HF {mode}")
            values.append(nums("hf_peer")[mode]["tok_s"])
    drew = bars(axes[0, 0], labels, values, "tok/s", "batch-1 decode, Llama-3-8B shape")
    drew |= bars(axes[0, 1], *tok_s("decode_smollm2"), "tok/s (aggregate)", "SmolLM2-135M shape decode")
    att = nums("attention")
    ratios = {f"decode {w} GB/s": att["decode"][w]["gbs"] for w in ("kernel", "sdpa") if "decode" in att}
    ratios |= {f"prefill {w} TFLOP/s": att["prefill"][w]["tflops"] for w in ("kernel", "sdpa") if "prefill" in att}
    drew |= bars(axes[1, 0], list(ratios), list(ratios.values()), "GB/s or TFLOP/s", "attention kernels vs SDPA")
    shapes = nums("quant").get("shapes", [])
    q = {f"{r['shape']} {f}": r[f]["gbs"] for r in shapes for f in ("dense", "int4", "int8")}
    drew |= bars(axes[1, 1], list(q), list(q.values()), "GB/s of weights", "quantized matmul, M = 1")
    if drew:
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path) if drew else None


def parse_phases(spec: str, smoke: bool) -> list[tuple[Phase, float]]:
    """ "tests,hf_peer:150" -> the phases in that order, each with its budget (given, or its own)."""
    plan = []
    for item in filter(None, (i.strip() for i in spec.split(","))):
        name, _, seconds = item.partition(":")
        phase = phase_named(name)
        plan.append((phase, float(seconds) if seconds else phase.smoke_budget_s if smoke else phase.budget_s))
    return plan


def session(smoke: bool, out: pathlib.Path, plan: list[tuple[Phase, float]]) -> int:
    start = time.monotonic()
    gpu = gpu_info()
    if gpu is None and not smoke:
        print("no GPU found (nvidia-smi / NVML): run with --smoke for the CPU check of this script")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    json_path, log_path, png_path = (out / f for f in FILES)
    for f in (json_path, png_path):
        f.unlink(missing_ok=True)  # nothing of an earlier run passes for this one's
    log_path.write_text("")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a running phase is stopped with us
    record = {
        "session": "gpu_session",
        "smoke": smoke,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit() or os.environ.get("GPU_SESSION_COMMIT"),
        "device": gpu or {"name": "cpu (Triton interpreter)", "cpu_count": os.cpu_count()},
        "host": platform.node(),
        "versions": versions(),
        "carried_wheels": os.environ.get("GPU_SESSION_WHEELS", "").split(),
        "session_budget_s": SMOKE_SESSION_S if smoke else SESSION_S,
        "phases": {},
    }
    print(
        f"gpu session on {record['device']['name']}: torch {record['versions']['torch']}, "
        f"triton {record['versions']['triton']}, commit {record['commit']}",
        flush=True,
    )
    deadline = start + record["session_budget_s"]
    with tempfile.TemporaryDirectory(prefix="gpu_session_") as work:
        for i, (phase, wanted) in enumerate(plan, 1):
            name = phase.name
            budget = min(wanted, deadline - time.monotonic() - RESERVE_S)
            if budget < MIN_PHASE_S:
                why = "the session's time is spent" if budget < wanted else f"a budget under {MIN_PHASE_S} s"
                entry = {"status": "skipped", "seconds": 0.0, "note": f"skipped: {why}"}
            else:
                print(f"[{i}/{len(plan)}] {name} (budget {budget:.0f} s) ...", flush=True)
                entry = run_phase(phase, budget, smoke, log_path, pathlib.Path(work))
            record["phases"][name] = entry
            print(
                f"[{i}/{len(plan)}] {name}: {entry['status']} in {entry['seconds']:.1f} s; "
                + "; ".join(entry.get("key_numbers") or [entry.get("note") or ""]),
                flush=True,
            )
            if entry["status"] in ("failed", "killed"):
                print("    " + entry["tail"][-1200:].replace("\n", "\n    "), flush=True)
            json_path.write_text(json.dumps(record, indent=1, default=str))  # a lease cut short keeps what ran
    record["derived"] = derived(record["phases"])
    try:
        title = f"membound on {record['device']['name']}, {record['date'][:10]}, {record['commit']}"
        record["plot"] = plot(record["phases"], png_path, title)
    except Exception as e:  # noqa: BLE001 - the numbers matter more than their picture
        record["plot"] = f"failed: {e!r}"
    record["wall_s"] = round(time.monotonic() - start, 1)
    json_path.write_text(json.dumps(record, indent=1, default=str))
    bad = [n for n, e in record["phases"].items() if e["status"] in ("failed", "killed")]
    print(
        f"wrote {', '.join(str(p) for p in (json_path, log_path, png_path) if p.is_file())} in {record['wall_s']:.0f} s"
    )
    print()
    print(summary(record["phases"], record["derived"]), flush=True)
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same phases on CPU at tiny sizes")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default: $OUT, else see above)")
    ap.add_argument(
        "--phases",
        default=",".join(p.name for p in PHASES),
        help="comma-separated, run in this order; name:seconds overrides a budget (e.g. hf_peer:150)",
    )
    ap.add_argument("--list", action="store_true", help="print the phases and their budgets")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase (the child process)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.list:
        for p in PHASES:
            print(f"{p.name:<16} {p.budget_s:>4} s on the GPU, {p.smoke_budget_s:>3} s in --smoke")
        return
    if a.phase:
        rec = Recorder(pathlib.Path(a.result), a.smoke)
        rec.flush()
        if not a.smoke and not torch.cuda.is_available():
            rec.fail("torch sees no CUDA device")
            sys.exit(1)
        phase_named(a.phase).run(rec)
        return
    day = datetime.date.today().isoformat()
    if a.out:
        out = pathlib.Path(a.out)
    elif a.smoke:  # smoke numbers are not results: keep them out of benchmarks/results
        out = pathlib.Path(tempfile.gettempdir()) / f"gpu_session_smoke_{day}"
    else:
        out = ROOT / "benchmarks" / "results" / f"gpu_{day}"
    sys.exit(session(a.smoke, out, parse_phases(a.phases, a.smoke)))


if __name__ == "__main__":
    main()
