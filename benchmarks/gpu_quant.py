"""The fused int4 / int8 dequantize-matmul kernels against bf16 at Llama-3-8B decode shapes.

    python benchmarks/gpu_quant.py [--out FILE] [--group-size 128] [--iters 200]
    python benchmarks/gpu_quant.py --smoke     # tiny shapes on CPU (Triton interpreter): checks the script

M = 1 (batch-1 decode) through the four matrices of one decoder layer: qkv 6144x4096, o
4096x4096, gate_up 28672x4096, down 4096x14336 (N x K). Per shape: bf16 `x @ w.T` (cuBLAS),
`int4_matmul` (group-wise scale and zero, bf16) and `int8_matmul` (one bf16 scale per output
channel, as `Int8Linear` stores it). Times come from CUDA events around a CUDA graph of `--iters`
calls, replayed after warm-up (which also runs the kernels' autotune), so the host's launch cost
is not counted; `eager_us` beside it is the same loop launched from Python. The calls cycle
through enough copies of the weights to overflow L2 (an H100's 50 MB would otherwise hold the
8 MB int4 o_proj). GB/s = bytes of weight + scales (+ zeros) read per call / time; share = that
over the copy bandwidth measured on the same device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if "--smoke" in sys.argv:  # CPU: Triton kernels run in its interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from membound.bench.common import run_record  # noqa: E402
from membound.kernels.quant_matmul import int4_matmul, int4_matmul_ref, int8_matmul, int8_matmul_ref  # noqa: E402
from membound.plan.ceilings import measure  # noqa: E402

LLAMA3_8B = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
SMOKE = [("qkv", 48, 128), ("o", 32, 128), ("gate_up", 96, 128), ("down", 32, 256)]


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def make_weight(fmt: str, n: int, k: int, group: int, dtype: torch.dtype, dev: str) -> tuple:
    """One copy of a format's tensors: random codes, positive scales, random zeros."""
    if fmt == "int4":
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.int32, device=dev).to(torch.uint8)
        scale = (torch.rand(n, k // group, device=dev) * 0.02 + 0.005).to(dtype)
        return packed, scale, (torch.randn(n, k // group, device=dev) * 0.05).to(dtype)
    if fmt == "int8":
        q = torch.randint(-127, 128, (n, k), dtype=torch.int32, device=dev).to(torch.int8)
        return q, (torch.rand(n, 1, device=dev) * 0.002 + 0.0005).to(dtype)
    return ((torch.randn(n, k, device=dev) * 0.02).to(dtype),)


def kernels(fmt: str, k: int, group: int):
    """(call(x, tensors), reference(x, tensors) or None) of a format."""
    if fmt == "int4":
        return (lambda x, t: int4_matmul(x, *t, group)), (lambda x, t: int4_matmul_ref(x, *t, group))
    if fmt == "int8":  # one scale per output channel: group_size == K
        return (lambda x, t: int8_matmul(x, t[0], t[1], None, k)), (
            lambda x, t: int8_matmul_ref(x, t[0], t[1], None, k)
        )
    return (lambda x, t: x @ t[0].T), None


def copies_for(weight_bytes: int, dev: str) -> int:
    if dev != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    return max(1, math.ceil(2 * l2 / weight_bytes))


def time_calls(calls: list, dev: str, iters: int, repeats: int = 5) -> tuple[float, float | None]:
    """(us per call, eager us per call or None): the calls run round-robin, `iters` per timing."""
    for _ in range(2):  # warm-up: compiles, autotunes, fills caches of the allocator
        for c in calls:
            c()
    if dev != "cuda":
        t = time.perf_counter()
        for i in range(iters):
            calls[i % len(calls)]()
        return (time.perf_counter() - t) / iters * 1e6, None
    torch.cuda.synchronize()

    def loop():
        for i in range(iters):
            calls[i % len(calls)]()

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


def bench_shape(name: str, n: int, k: int, group: int, dev: str, iters: int, copy_gbs: float | None) -> dict:
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter mishandles bf16
    x = torch.randn(1, k, device=dev).to(dtype)
    base = "bf16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")
    row: dict = {"shape": name, "n": n, "k": k}
    base_us = None
    for fmt in (base, "int4", "int8"):
        call, ref = kernels(fmt, k, group)
        tensors = make_weight(fmt, n, k, group, dtype, dev)
        weight_bytes = nbytes(*tensors)
        copies = [tensors] + [
            make_weight(fmt, n, k, group, dtype, dev) for _ in range(copies_for(weight_bytes, dev) - 1)
        ]
        entry: dict = {"bytes": weight_bytes, "copies": len(copies)}
        if ref is not None:  # a correctness check before any timing
            want = ref(x, tensors).float()
            entry["max_err_rel"] = ((call(x, tensors).float() - want).abs().max() / want.abs().max()).item()
        us, eager = time_calls([lambda t=t, f=call: f(x, t) for t in copies], dev, iters)
        entry.update(us=us, eager_us=eager, gbs=weight_bytes / us / 1e3)
        if copy_gbs:
            entry["share_of_copy_bw"] = entry["gbs"] / copy_gbs
        if base_us is None:
            base_us = us
        else:
            entry["speedup"] = base_us / us
        row[fmt] = entry
        del copies
        if dev == "cuda":
            torch.cuda.empty_cache()
    return row


def print_table(rows: list[dict], fmts: list[str]) -> None:
    head = f"{'shape':>8} {'N x K':>12}"
    for f in fmts:
        head += f" | {f + ' us':>9} {'GB/s':>6}" + ("" if f == fmts[0] else f" {'x':>5}")
    print(head)
    for r in rows:
        line = f"{r['shape']:>8} {str(r['n']) + 'x' + str(r['k']):>12}"
        for f in fmts:
            e = r[f]
            line += f" | {e['us']:9.1f} {e['gbs']:6.0f}" + ("" if f == fmts[0] else f" {e['speedup']:5.2f}")
        print(line)
    total = {f: sum(r[f]["us"] for r in rows) for f in fmts}
    line = f"{'layer':>8} {'':>12}"
    for f in fmts:
        line += f" | {total[f]:9.1f} {'':>6}" + ("" if f == fmts[0] else f" {total[fmts[0]] / total[f]:5.2f}")
    print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", "--output", dest="out", default=None, help="JSON path")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size (int8 is per channel)")
    ap.add_argument("--iters", type=int, default=200, help="calls per timing")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script itself")
    a = ap.parse_args()
    dev = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    if dev == "cpu" and not a.smoke:
        sys.exit("no CUDA GPU: run with --smoke for a CPU check of the script")
    group = 32 if a.smoke else a.group_size
    iters = 3 if a.smoke else a.iters
    ceil = measure(dev, quick=a.smoke) if dev == "cuda" else None
    copy_gbs = ceil.copy_bandwidth_gbs if ceil else None
    torch.manual_seed(0)
    rows = [bench_shape(name, n, k, group, dev, iters, copy_gbs) for name, n, k in (SMOKE if a.smoke else LLAMA3_8B)]
    fmts = [f for f in rows[0] if isinstance(rows[0][f], dict)]
    result = run_record(
        benchmark="gpu_quant",
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)",
        triton=triton.__version__,
        smoke=a.smoke,
        m=1,
        int4_group_size=group,
        int8_group_size="per-channel",
        scale_dtype="bfloat16" if dev == "cuda" else "float32",
        iters=iters,
        cuda_graphs=dev == "cuda",
        copy_bandwidth_gbs=copy_gbs,
        shapes=rows,
    )
    if copy_gbs:
        print(f"device {result['device']}: copy bandwidth {copy_gbs:,.0f} GB/s")
    print_table(rows, fmts)
    errs = {f: max(r[f]["max_err_rel"] for r in rows) for f in fmts if "max_err_rel" in rows[0][f]}
    print("max relative error vs reference: " + ", ".join(f"{f} {e:.1e}" for f, e in errs.items()))
    day = datetime.date.today().isoformat()
    if a.out:
        path = pathlib.Path(a.out)
    elif a.smoke:  # smoke numbers are not results: keep them out of benchmarks/results
        path = pathlib.Path(tempfile.gettempdir()) / f"gpu_quant_smoke_{day}.json"
    else:
        path = ROOT / "benchmarks" / "results" / f"gpu_quant_{day}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
