"""The engine loop's own costs on CPU (issue 14), all in one run:

1. host time per decode step (schedule + input preparation + output processing, from the engine's
   step timing) at 1, 64 and 256 running sequences, streaming (delta outputs); a tiny dummy model
   makes the forward nearly free;
2. the block pool at 100K blocks under steady churn, against the previous commit's dict queue;
3. per-step output work of one 4,096-token stream at token 100 and at token 4,000;
4. async scheduling under a Poisson arrival stream (32 requests, 1/4 penalised, some stop strings,
   a pool small enough to preempt): share of steps launched ahead; outputs against async off.

    python benchmarks/cpu_engine_loop.py [--output FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from membound import LLM, RequestOutputKind, SamplingParams  # noqa: E402
from membound.engine.block_pool import BlockPool  # noqa: E402

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 4096,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
}


def tiny(d: pathlib.Path, tokenizer: bool = False, **kw) -> LLM:
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(CONFIG)
    if tokenizer:  # the default model's tokenizer beside a dummy model: real stop strings
        from membound.model.loader import resolve_model
        from membound.model.tokenizer import Tokenizer

        tok = Tokenizer.from_model_path(resolve_model(None).path)
        tok.hf.save_pretrained(d)
        cfg["vocab_size"] = len(tok.hf)
    (d / "config.json").write_text(json.dumps(cfg))
    return LLM(str(d), load_format="dummy", skip_tokenizer_init=not tokenizer, **kw)


def host_per_step(root: pathlib.Path, n: int, steps: int, sampling: dict) -> dict:
    llm = tiny(root / f"h{n}", max_model_len=512, max_num_seqs=256, max_num_batched_tokens=4096,
               kv_cache_memory_bytes=256 << 20, async_scheduling=False)  # fmt: skip
    # (LLM: no prefill cap, so every sequence decodes from the third step on)
    eng = llm.engine
    for i in range(n):
        p = SamplingParams(**sampling, seed=i, max_tokens=steps + 20, ignore_eos=True,
                           output_kind=RequestOutputKind.DELTA)  # fmt: skip
        eng.add_request(str(i), [1 + i % 100] * 32, p)
    for _ in range(4):
        eng.step()  # prefills, then decodes
    parts = {"schedule": [], "prepare": [], "output": [], "host": [], "step": [], "step_minus_device": []}
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        parts["step"].append(time.perf_counter() - t)
        st = eng.last_step_timing
        for k in ("schedule", "prepare", "output", "host"):
            parts[k].append(getattr(st, k))
        # as the pre-v2 benchmark defined host time: the whole step minus forward + sampling
        parts["step_minus_device"].append(parts["step"][-1] - st.launch - st.wait)
    return {"running": n, **{f"{k}_ms": statistics.median(v) * 1000 for k, v in parts.items()}}


BASELINE = "17be575"  # the last commit before engine v2


def old_allocator():
    """The BlockAllocator before engine v2 (a dict used as the free queue), for the comparison."""
    src = subprocess.run(
        ["git", "show", f"{BASELINE}:membound/engine/kv_cache.py"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    if "class BlockAllocator" not in src:
        return None
    mod = types.ModuleType("old_kv_cache")
    sys.modules["old_kv_cache"] = mod  # dataclasses look their module up
    exec(compile(src, "old_kv_cache.py", "exec"), mod.__dict__)
    return mod.BlockAllocator


def pool_churn(make, num_blocks: int = 100_000, steps: int = 2000, per_step: int = 16) -> dict:
    """A full pool's steady state: each step `per_step` sequences cross into a new block and
    `per_step` blocks of finished sequences come back (as 256 decoding sequences of block 16 do)."""
    rng = random.Random(0)
    pool = make(num_blocks)
    held = pool.allocate(num_blocks - 4 * per_step)
    for i in range(0, len(held), 7):  # churn: deleted slots build up in a dict queue
        pool.free([held[i]])
        held[i] = pool.allocate(1)[0]
    times = []
    for _ in range(steps):
        out = [held.pop(rng.randrange(len(held))) for _ in range(per_step)]  # not timed: the test's own list
        t = time.perf_counter()
        new = pool.allocate(per_step)
        pool.free(out)
        times.append(time.perf_counter() - t)
        held.extend(new)
    return {
        "per_step_us": statistics.median(times) * 1e6,
        "max_us": max(times) * 1e6,
        "per_block_us": statistics.median(times) * 1e6 / (2 * per_step),
    }


def output_vs_length(root: pathlib.Path) -> dict:
    llm = tiny(root / "long", tokenizer=True, max_model_len=4200, kv_cache_memory_bytes=256 << 20,
               async_scheduling=False)  # fmt: skip
    eng = llm.engine
    p = SamplingParams(temperature=0.9, seed=0, max_tokens=4096, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    eng.add_request("s", [1, 2, 3, 4], p)
    out_ms: dict[int, list[float]] = {100: [], 4000: []}
    n = 0
    while eng.has_unfinished_requests():
        outs = eng.step()
        n += sum(len(o.delta_token_ids) for o in outs)
        for k in out_ms:
            if k <= n < k + 50:
                out_ms[k].append(eng.last_step_timing.output * 1000)
    return {f"output_ms_at_token_{k}": statistics.median(v) for k, v in out_ms.items()}


def poisson(root: pathlib.Path, async_scheduling: bool) -> dict:
    pool = 40 * 16 * 512  # 40 blocks of the tiny model: preemption
    llm = tiny(root / f"p{async_scheduling}", tokenizer=True, max_model_len=512, max_num_seqs=16,
               max_num_batched_tokens=256, kv_cache_memory_bytes=pool, async_scheduling=async_scheduling)  # fmt: skip
    eng, rng = llm.engine, random.Random(7)
    reqs = []
    for i in range(32):
        n = rng.randrange(8, 200)
        prompt = [rng.randrange(5, 4000) for _ in range(n)]
        kind = i % 4
        if kind == 0:
            p = SamplingParams(temperature=0.8, seed=i, max_tokens=80, presence_penalty=0.5, repetition_penalty=1.1)
        elif kind == 1:
            p = SamplingParams(temperature=0.9, seed=i, max_tokens=120, stop=[" the", "."], ignore_eos=True)
        elif kind == 2:
            p = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        else:
            p = SamplingParams(temperature=1.0, top_k=40, seed=i, max_tokens=60, min_tokens=20)
        reqs.append((prompt, p))
    arrivals, t = [], 0.0
    for _ in reqs:
        t += rng.expovariate(1 / 3.0)  # one arrival every 3 steps on average
        arrivals.append(int(t))
    outs, step, nxt = {}, 0, 0
    while nxt < len(reqs) or eng.has_unfinished_requests():
        while nxt < len(reqs) and arrivals[nxt] <= step:
            eng.add_request(str(nxt), *reqs[nxt])
            nxt += 1
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        step += 1
    s = eng.stats()
    return {
        "outputs": outs,
        "steps": s.num_steps,
        "ahead": s.num_steps_launched_ahead,
        "preemptions": s.num_preemptions,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=None)
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    result = {
        "benchmark": "cpu_engine_loop",
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),  # fmt: skip
    }
    with tempfile.TemporaryDirectory() as d:
        root = pathlib.Path(d)
        result["host_per_step"] = []
        for name, sampling in (("greedy", {"temperature": 0}), ("seeded top-p", {"temperature": 0.8, "top_p": 0.95})):
            for n in (1, 64, 256):
                r = {"sampling": name, **host_per_step(root, n, a.steps, sampling)}
                result["host_per_step"].append(r)
                parts = ", ".join(f"{k} {r[k + '_ms']:.3f}" for k in ("schedule", "prepare", "output"))
                print(
                    f"{name:>12} {n:>4} running: host {r['host_ms']:.3f} ms/step ({parts}; step {r['step_ms']:.2f}, "
                    f"step - device {r['step_minus_device_ms']:.3f})"
                )
        old = old_allocator()
        pools = {}
        for per_step in (1, 16):
            pools[f"this commit, {per_step}+{per_step}"] = pool_churn(BlockPool, per_step=per_step)
            if old is not None:
                pools[f"{BASELINE} (dict queue), {per_step}+{per_step}"] = pool_churn(old, per_step=per_step)
        result["block_pool_100k"] = pools
        for k, v in pools.items():
            print(f"block pool 100K, takes + frees per step, {k}: {v['per_step_us']:.1f} us (max {v['max_us']:.0f})")
        result["stream_4096"] = output_vs_length(root)
        print("4,096-token stream, output work per step:", result["stream_4096"])
        on, off = poisson(root, True), poisson(root, False)
        same = on["outputs"] == off["outputs"]
        result["poisson"] = {
            "steps": on["steps"], "launched_ahead": on["ahead"], "share": on["ahead"] / on["steps"],
            "preemptions": on["preemptions"], "identical_to_async_off": same,
        }  # fmt: skip
        print("poisson arrivals:", result["poisson"])
    path = pathlib.Path(a.output or ROOT / "benchmarks" / "results" / f"cpu_engine_loop_{result['date']}.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
