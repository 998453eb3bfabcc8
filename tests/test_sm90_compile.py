"""Every Triton kernel variant the engine can launch compiles for Hopper (sm_90a), with no register
spills and within the H100/H200's shared memory: the CPU's stand-in for "it compiles on a GPU".
The work happens in tests/sm90_compile.py (a subprocess: it needs Triton's compiler, not its
interpreter, which this test session uses)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
SCRIPT = pathlib.Path(__file__).with_name("sm90_compile.py")


@pytest.mark.slow
def test_every_engine_kernel_variant_compiles_for_sm90_without_spills(tmp_path):
    out = tmp_path / "variants.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    variants = json.loads(out.read_text())["variants"]
    kernels = {v["kernel"] for v in variants}
    for name in ("_decode_split_kernel", "_merge_splits_kernel", "_prefill_kernel", "_rope_write_kv_kernel",
                 "_add_rmsnorm_kernel", "_silu_and_mul_kernel", "_gemv_kernel", "_dot_kernel"):  # fmt: skip
        assert any(k.endswith(name) for k in kernels), f"{name} was never compiled"
    # Real model shapes, every block size and KV dtype: dozens of attention variants, each checked.
    assert sum(v["kernel"].endswith("_decode_split_kernel") for v in variants) >= 48
    assert all(v["local"] == 0 and v["stack"] == 0 and v["shared"] <= 227 * 1024 for v in variants)


def test_the_check_flags_spills_and_shared_memory():
    sys.path.insert(0, str(SCRIPT.parent))
    from sm90_compile import problems

    ok = {"kernel": "k", "hash": "h", "num_warps": 4, "num_stages": 3, "constexprs": "", "pointers": []}
    assert problems([{**ok, "shared": 1024, "reg": 80, "local": 0, "stack": 0}]) == []
    assert problems([{**ok, "shared": 1024, "reg": 255, "local": 0, "stack": 40}])
    assert problems([{**ok, "shared": 300_000, "reg": 80, "local": 0, "stack": 0}])
