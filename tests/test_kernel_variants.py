"""Serving compiles nothing: every Triton variant the engine launches is compiled at start-up.

A JIT compile costs 0.5-1 s on a GPU; one mid-serving stalls every running stream, and one inside
a CUDA-graph capture breaks it. The keys are what Triton would compile for sm_90 (see
kernel_variants.py); the launches run in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from membound import LLM, SamplingParams
from tests.kernel_variants import record_variants

pytest.importorskip("triton")


def _engine_kernels() -> dict:
    from membound.kernels import decode_attention, fused, prefill_attention

    return {
        "decode": decode_attention._decode_split_kernel,
        "merge": decode_attention._merge_splits_kernel,
        "prefill": prefill_attention._prefill_kernel,
        "rope_write_kv": fused._rope_write_kv_kernel,
        "add_rmsnorm": fused._add_rmsnorm_kernel,
        "silu_and_mul": fused._silu_and_mul_kernel,
    }


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_serving_after_warm_up_compiles_no_new_variant(tiny_model_dir, kv_cache_dtype):
    kernels = _engine_kernels()
    with record_variants(kernels) as seen:
        llm = LLM(
            str(tiny_model_dir),
            attention_backend="triton",
            kv_cache_dtype=kv_cache_dtype,
            max_num_seqs=8,
            max_num_batched_tokens=48,  # long prompts go in chunks, beside running decodes
            max_model_len=256,
            kv_cache_memory_bytes=4 << 20,
        )
        warm = list(seen)
        gen = torch.Generator().manual_seed(0)
        shared = torch.randint(3, 2000, (40,), generator=gen).tolist()
        # Block tables 1..9 pages wide, batches of 1..7, prefix-cache hits, mixed decode + prefill.
        waves = [[3], [17, 33, 2], [130, 5, 64, 20]]
        for w, lens in enumerate(waves):
            prompts = [torch.randint(3, 2000, (n,), generator=gen).tolist() for n in lens]
            prompts += [shared + p[:5] for p in prompts[:w]]  # wave 0: one short request alone
            params = SamplingParams(max_tokens=4 + 2 * w, temperature=0, ignore_eos=True)
            llm.generate(prompts, params)
    assert {x.kernel for x in warm} == set(kernels), "the warm-up must launch every kernel"
    served = seen[len(warm) :]
    assert len(served) > 100
    new = {(x.kernel, x.key) for x in served} - {(x.kernel, x.key) for x in warm}
    assert not new, f"serving would compile new variants of {sorted({k for k, _ in new})}"
    # The workload is varied enough to catch it: specialising on every argument, as Triton does by
    # default, would have compiled new decode and prefill variants mid-serving.
    naive_new = {(x.kernel, x.naive_key) for x in served} - {(x.kernel, x.naive_key) for x in warm}
    assert {"decode", "prefill"} <= {k for k, _ in naive_new}


@pytest.mark.parametrize("fmt", ["int4", "int8_group", "int8_channel"])
def test_quant_matmul_row_counts_reuse_the_warm_up_variants(fmt):
    from membound.kernels import quant_matmul as qm

    n, k = 48, 256
    gen = torch.Generator().manual_seed(1)
    if fmt == "int4":
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
        scale, zero, group = torch.rand(n, k // 32, generator=gen), torch.randn(n, k // 32, generator=gen), 32

        def run(x):
            return qm.int4_matmul(x, w, scale, zero, group)
    else:
        group = 64 if fmt == "int8_group" else k
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        scale = torch.rand(n, k // group, generator=gen)

        def run(x):
            return qm.int8_matmul(x, w, scale, None, group)

    kernels = {"gemv": qm._gemv_kernel, "dot": qm._dot_kernel, "sum": qm._sum_splits_kernel}
    with record_variants(kernels) as seen:
        for m in qm.warmup_rows(4096):
            run(torch.randn(m, k, generator=gen))
        warm = {(x.kernel, x.key) for x in seen}
        mark = len(seen)
        for m in [*range(1, 20), 31, 32, 33, 48, 63, 64, 66, 96, 127, 128, 129, 200]:
            run(torch.randn(m, k, generator=gen))
    served = {(x.kernel, x.key) for x in seen[mark:]}
    assert not served - warm, f"new variants for row counts the warm-up did not run: {served - warm}"
    naive = {(x.kernel, x.naive_key) for x in seen[mark:]} - {(x.kernel, x.naive_key) for x in seen[:mark]}
    assert naive, "specialising on M would have compiled new variants"


def test_warm_up_rows_cover_every_regime():
    from membound.kernels import quant_matmul as qm

    rows = qm.warmup_rows(8192)
    assert {qm._regime(m) for m in range(1, 8193)} == {qm._regime(m) for m in rows}
    assert qm.warmup_rows(16) == [1, 2]  # never more rows than a step can hold


def test_rope_write_kv_variant_does_not_depend_on_where_positions_sit():
    """The CUDA-graph buffers hold positions and slots as rows of one [4, max_batch] int64 tensor:
    their 16-byte alignment depends on max_batch, and must not pick another compiled variant."""
    from membound.kernels import fused

    gen = torch.Generator().manual_seed(0)
    t, h, d, bs = 3, 2, 16, 16
    k_cache, v_cache = torch.zeros(h, 4, bs, d), torch.zeros(h, 4, bs, d)
    cos, sin = torch.randn(32, d // 2, generator=gen), torch.randn(32, d // 2, generator=gen)
    with record_variants({"rope": fused._rope_write_kv_kernel}) as seen:
        for width in (4, 3):  # rows start at 32 and 24 bytes: aligned and not
            rows = torch.zeros(4, width, dtype=torch.int64)
            rows[1, :t], rows[2, :t] = torch.arange(t), torch.arange(t) + bs
            q, k, v = (torch.randn(t, h, d, generator=gen) for _ in range(3))
            fused.rope_write_kv(q, k, v, cos, sin, rows[1, :t], k_cache, v_cache, rows[2, :t])
        keys = [(x.key, x.naive_key) for x in seen]
    assert keys[0][0] == keys[1][0]
    assert keys[0][1] != keys[1][1]  # Triton's default would have compiled a second variant
