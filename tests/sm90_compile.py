"""Compile, for Hopper (sm_90a), every Triton kernel variant the engine can launch; no GPU needed.

    python tests/sm90_compile.py [--jobs N] [--json FILE]

Triton's own compiler runs against a stub driver that reports a cuda/90 target (ptxas and
cuobjdump ship with the triton wheel); launches are no-ops. The model runs on meta tensors
through the engine's own start-up warm-up (`membound.engine.warmup.warm_up_kernels`), which
launches every variant serving can reach (tests/test_kernel_variants.py), at real model shapes:
every dtype, KV cache dtype, block size and weight format. Each compiled kernel must have no
register spills (no local memory or stack in its cubin) and fit the H100/H200's shared memory.
Prints one line per variant and exits 1 on the first problem list.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real JIT functions
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# Head dims 128 / 64 / 128 / 256, GQA groups 4 / 3 / 2 / 4 (Gemma 3: sliding windows too).
MODELS = ("llama-3-8b", "smollm2-135m", "qwen3-0.6b", "gemma3-270m")
DTYPES = ("bfloat16", "float16", "float32")
KV_DTYPES = ("auto", "int8")
BLOCK_SIZES = (16, 32, 64, 128)
WEIGHTS = ("none", "int4", "int8")  # RTN formats; the GGUF group-wise ones are added by _gguf_formats
SHARED_LIMIT = 227 * 1024  # H100/H200: opt-in shared memory per block
MAX_REGS = 255


def _install_stub_driver():
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class Utils:
        def get_device_properties(self, device):
            return {"max_shared_mem": SHARED_LIMIT, "multiprocessor_count": 132, "max_num_regs": 65536}

        def load_binary(self, name, kernel, shared, device):
            return None, None, 0, 0, 1024  # module, function, regs, spills, max threads: read from the cubin

    class StubDriver:
        utils = Utils()

        def __init__(self):
            self.launcher_cls = lambda src, metadata: lambda *args, **kwargs: None

        def is_active(self):
            return True

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            raise RuntimeError("the compile check benchmarks nothing")

    driver.set_active(StubDriver())


def _kernels():
    from membound.kernels import decode_attention, fused, prefill_attention, quant_matmul

    mods = (decode_attention, prefill_attention, fused, quant_matmul)
    return {
        f"{m.__name__.rsplit('.', 1)[1]}.{n}": k
        for m in mods
        for n, k in vars(m).items()
        if hasattr(k, "device_caches")
    }


def _engine_case(model: str, dtype: str, kv: str, block_size: int, weights: str) -> None:
    import torch

    from membound.attention.triton_paged import TritonPagedAttention
    from membound.config import DTYPES as TORCH_DTYPES
    from membound.engine.kv_cache import KVCacheSpec, allocate_kv_cache
    from membound.engine.warmup import warm_up_kernels
    from membound.model.llama import LlamaForCausalLM
    from membound.model.registry import get_preset
    from membound.quant.linear import quantize_model

    cfg = get_preset(model)
    # Every layer launches the same variants; Gemma 3 has two kinds: one sliding-window layer, one global.
    kinds = ("sliding_attention", "full_attention") if cfg.layer_types else ()
    cfg = dataclasses.replace(cfg, num_layers=max(1, len(kinds)), layer_types=kinds)
    dt = TORCH_DTYPES[dtype]
    max_len = 4096
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg, TritonPagedAttention(), max_len).to(dt)
    if weights != "none":
        quantize_model(m, weights, 128)
    kv_dtype = torch.int8 if kv == "int8" else dt
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, kv_dtype)
    caches = allocate_kv_cache(spec, 64, torch.device("meta"))
    warm_up_kernels(m, caches, block_size, 256, 2048, max_len, 64)


def _gguf_formats(dtype: str) -> None:
    """The group-wise formats GGUF files keep packed: int4 group 32 (Q4_0/Q4_1/Q4_K), int8 group 32
    with and without zero (Q8_0, Q5_x), int8 group 16 (Q6_K); fp32 scales as gguf_blocks stores them."""
    import torch

    from membound.config import DTYPES as TORCH_DTYPES
    from membound.kernels.quant_matmul import int4_matmul, int8_matmul, warmup_rows

    dt, meta = TORCH_DTYPES[dtype], torch.device("meta")
    for n, k in ((576 * 3, 576), (49152, 576), (4096, 14336)):
        for m in warmup_rows(4096):
            x = torch.empty(m, k, dtype=dt, device=meta)
            s32 = torch.empty(n, k // 32, device=meta)
            int4_matmul(x, torch.empty(n, k // 2, dtype=torch.uint8, device=meta), s32, s32, 32)
            w8 = torch.empty(n, k, dtype=torch.int8, device=meta)
            int8_matmul(x, w8, s32, None, 32)
            int8_matmul(x, w8, s32, s32, 32)
            int8_matmul(x, w8, torch.empty(n, k // 16, device=meta), None, 16)


def _resources(cubin: bytes, workdir: pathlib.Path, name: str) -> dict:
    import triton

    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = workdir / f"{name}.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    path.unlink()
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


def _constexprs(compiled) -> str:
    names = compiled.src.fn.arg_names
    return " ".join(f"{names[k[0]]}={v}" for k, v in sorted(compiled.src.constants.items()) if len(k) == 1)


def _run(cases: list[tuple]) -> list[dict]:
    """Worker: compile the cases' variants; one record per compiled kernel."""
    import tempfile

    _install_stub_driver()
    for case in cases:
        if case[0] == "gguf":
            _gguf_formats(case[1])
        else:
            _engine_case(*case)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kernel in _kernels().items():
            for compiled in kernel.device_caches[0][0].values():
                res = _resources(compiled.asm["cubin"], pathlib.Path(tmp), compiled.name)
                records.append(
                    {
                        "kernel": name,
                        "hash": compiled.hash[:12],
                        "num_warps": compiled.metadata.num_warps,
                        "num_stages": compiled.metadata.num_stages,
                        "shared": compiled.metadata.shared,
                        "constexprs": _constexprs(compiled),
                        "pointers": sorted({v for v in compiled.src.signature.values() if v.startswith("*")}),
                        **res,
                    }
                )
    return records


def all_cases() -> list[tuple]:
    from membound.config import DTYPES as TORCH_DTYPES
    from membound.kernels.decode_attention import check_shapes
    from membound.model.registry import get_preset

    def runs(model, dtype, kv, bs) -> bool:  # what the engine accepts (it refuses the rest at start-up)
        cfg = get_preset(model)
        try:
            check_shapes(cfg.num_heads, cfg.num_kv_heads, bs, TORCH_DTYPES[dtype], kv == "int8", cfg.head_dim)
        except ValueError:
            return False
        return True

    cases = [
        (model, dtype, kv, bs, "none")
        for model, dtype, kv, bs in itertools.product(MODELS, DTYPES, KV_DTYPES, BLOCK_SIZES)
        if runs(model, dtype, kv, bs)
    ]
    # Weight formats change only the matmuls: one attention setting per model and dtype.
    cases += [
        (model, dtype, "auto", 16, w)
        for model, dtype, w in itertools.product(MODELS, DTYPES, WEIGHTS[1:])
        if runs(model, dtype, "auto", 16)
    ]
    cases += [("gguf", dtype) for dtype in DTYPES if dtype != "float32"]  # fp32 dequantizes instead
    return cases


def problems(records: list[dict]) -> list[str]:
    bad = []
    for r in records:
        where = f"{r['kernel']} {r['constexprs']} {r['pointers']} warps={r['num_warps']} stages={r['num_stages']}"
        if r.get("local", 0) or r.get("stack", 0):
            bad.append(f"{where}: spills (local {r.get('local')} B, stack {r.get('stack')} B)")
        if r["shared"] > SHARED_LIMIT:
            bad.append(f"{where}: {r['shared']} B of shared memory > {SHARED_LIMIT}")
        if r.get("reg", 0) > MAX_REGS:
            bad.append(f"{where}: {r['reg']} registers")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args()
    cases = all_cases()
    shards = [cases[i :: args.jobs] for i in range(args.jobs)]
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        records = [r for part in pool.map(_run, shards) for r in part]
    # Workers compile independently: the same variant can come back from both.
    unique = {(r["kernel"], r["hash"]): r for r in records}
    records = sorted(unique.values(), key=lambda r: (r["kernel"], r["hash"]))
    for r in records:
        print(
            f"{r['kernel']:40s} {r['hash']} warps={r['num_warps']} stages={r['num_stages']} "
            f"regs={r.get('reg')} shared={r['shared']} local={r.get('local')} stack={r.get('stack')}"
        )
    counts: dict[str, int] = {}
    for r in records:
        counts[r["kernel"]] = counts.get(r["kernel"], 0) + 1
    print(f"{len(records)} variants compiled for sm_90a from {len(cases)} cases: {counts}")
    if args.json:
        args.json.write_text(json.dumps({"cases": len(cases), "variants": records}, indent=1))
    bad = problems(records)
    for line in bad:
        print("PROBLEM", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
