"""The fused int4 / int8 dequantize-and-multiply kernels against PyTorch.

On CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at small sizes in
fp32 and fp16, covering all three kernels (M = 1: GEMV; 3: one padded tile, split K; 17 and
40: tiled GEMM), ragged last tiles, K chunks holding several groups and groups spanning several
chunks. The `gpu`-marked tests repeat them in bf16 at Llama-3-8B sizes.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from membound.kernels.quant_matmul import (  # noqa: E402
    int4_matmul,
    int4_matmul_ref,
    int8_matmul,
    int8_matmul_ref,
)
from membound.quant.linear import Int4Linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (group, N, K): N is never a multiple of the tile; K spans 11, 7 and 3 groups, and K=352 ends
# in half a chunk of the interpreter's 64-wide K tiles.
SHAPES = [(32, 40, 352), (64, 24, 448), (128, 72, 384)]


def _dequant_loop(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, g: int) -> torch.Tensor:
    """fp32 weight, one group at a time (written apart from the kernels' references)."""
    n, k = q.shape
    w = torch.empty(n, k)
    for j in range(k // g):
        cols = slice(j * g, (j + 1) * g)
        w[:, cols] = q[:, cols].float() * scale[:, j : j + 1].float()
        if zero is not None:
            w[:, cols] += zero[:, j : j + 1].float()
    return w


def _int4_data(n, k, g, sdtype, gen):
    q = torch.randint(0, 16, (n, k), generator=gen).to(torch.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    scale = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.005).to(sdtype)
    zero = (torch.randn(n, k // g, generator=gen) * 0.05).to(sdtype)
    w = _dequant_loop(q.float() - 8, scale, zero, g)
    return packed, scale, zero, w


def _int8_data(n, k, g, sdtype, with_zero, gen):
    q = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
    scale = (torch.rand(n, k // g, generator=gen) * 0.002 + 0.0005).to(sdtype)
    zero = (torch.randn(n, k // g, generator=gen) * 0.05).to(sdtype) if with_zero else None
    return q, scale, zero, _dequant_loop(q, scale, zero, g)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=tol * scale, rtol=tol)


def _to(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("m", [1, 3, 17, 40])
@pytest.mark.parametrize("g,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_matmul_matches_references(m, g, n, k, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + g)
    sdtype = torch.float16 if dtype == torch.float32 else torch.float32  # both scale dtypes, crossed
    packed, scale, zero, w = _int4_data(n, k, g, sdtype, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    x, packed, scale, zero = _to(x, packed, scale, zero)
    got = int4_matmul(x, packed, scale, zero, g)
    _close(got, int4_matmul_ref(x, packed, scale, zero, g), dtype)
    _close(got, (x.float().cpu() @ w.T).to(dtype), dtype)


@pytest.mark.parametrize("m", [1, 3, 17, 40])
@pytest.mark.parametrize("g,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_matmul_grouped_matches_references(m, g, n, k, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + g + 1)
    sdtype = torch.float16 if dtype == torch.float32 else torch.float32
    q, scale, zero, w = _int8_data(n, k, g, sdtype, with_zero=g != 64, gen=gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    x, q, scale, zero = _to(x, q, scale, zero)
    got = int8_matmul(x, q, scale, zero, g)
    _close(got, int8_matmul_ref(x, q, scale, zero, g), dtype)
    _close(got, (x.float().cpu() @ w.T).to(dtype), dtype)


@pytest.mark.parametrize("m", [1, 3, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_matmul_per_channel(m, dtype):
    # group_size == K: one scale per output row; K=200 is no multiple of any K tile.
    n, k = 40, 200
    gen = torch.Generator().manual_seed(m)
    for with_zero, sdtype in ((False, torch.float32), (True, torch.float16)):
        q, scale, zero, w = _int8_data(n, k, k, sdtype, with_zero, gen)
        x = torch.randn(m, k, generator=gen).to(dtype)
        x, q, scale, zero = _to(x, q, scale, zero)
        got = int8_matmul(x, q, scale, zero, k)
        _close(got, int8_matmul_ref(x, q, scale, zero, k), dtype)
        _close(got, (x.float().cpu() @ w.T).to(dtype), dtype)


@pytest.mark.parametrize("m", [1, 5])
def test_split_k_choices_agree(m):
    gen = torch.Generator().manual_seed(7)
    packed, scale, zero, w = _to(*_int4_data(24, 384, 32, torch.float32, gen))
    q8, s8, z8, w8 = _to(*_int8_data(24, 384, 64, torch.float32, True, gen))
    x = torch.randn(m, 384, generator=gen).to(DEVICE)
    for splits in (1, 4, 100):  # 100: more than there are K chunks
        _close(int4_matmul(x, packed, scale, zero, 32, split_k=splits), x.cpu() @ w.cpu().T, torch.float32)
        _close(int8_matmul(x, q8, s8, z8, 64, split_k=splits), x.cpu() @ w8.cpu().T, torch.float32)


@pytest.mark.parametrize("group", [32, 64])
def test_int4_matmul_on_int4linear_buffers(group):
    # N % 16 != 0 keeps the plain nibble layout on CPU (the CPU kernel's layout needs N % 16 == 0).
    gen = torch.Generator().manual_seed(group)
    weight = torch.randn(40, 256, generator=gen) * 0.05
    layer = Int4Linear.quantize(weight, group)
    assert layer.packed.shape == (40, 128)
    want_w = layer.dequantize(torch.float32)
    for m in (1, 6, 24):
        x = torch.randn(m, 256, generator=gen)
        got = int4_matmul(x.to(DEVICE), layer.packed.to(DEVICE), layer.scale.to(DEVICE), layer.zero.to(DEVICE), group)
        _close(got, x @ want_w.T, torch.float32)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 64)
    packed = torch.zeros(8, 32, dtype=torch.uint8)
    s = torch.ones(8, 2)
    q8 = torch.zeros(8, 64, dtype=torch.int8)
    cases = [
        (lambda: int4_matmul(x[0], packed, s, s, 32), "2-D"),
        (lambda: int4_matmul(x.to(torch.int32), packed, s, s, 32), "x must be float16"),
        (lambda: int4_matmul(x, packed.to(torch.int8), s, s, 32), "must be torch.uint8"),
        (lambda: int4_matmul(x, torch.zeros(8, 64, dtype=torch.uint8), s, s, 32), r"expected \[N, 32\]"),
        (lambda: int4_matmul(torch.randn(2, 63), packed, s, s, 32), "K must be even"),
        (lambda: int4_matmul(x, packed, s, s, 48), "group_size must be one of"),
        (lambda: int4_matmul(torch.randn(2, 96), torch.zeros(8, 48, dtype=torch.uint8), s, s, 64), "does not divide"),
        (lambda: int4_matmul(x, packed, torch.ones(8, 4), s, 32), r"scale shape \(8, 4\)"),
        (lambda: int4_matmul(x, packed, s, None, 32), "zero is required"),
        (lambda: int4_matmul(x, packed, s.to(torch.int32), s, 32), "scale must be a float16"),
        (lambda: int8_matmul(x, q8.to(torch.uint8), s, None, 32), "must be torch.int8"),
        (lambda: int8_matmul(x, q8, torch.ones(8, 3), None, 24), "power of two"),
        (lambda: int8_matmul(x, q8, s, torch.ones(8, 1), 32), r"zero shape \(8, 1\)"),
        (lambda: int8_matmul(x, q8, s, None, 0), "positive int"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


# ---------------------------------------------------------------------- GPU, bf16, real sizes


def _gpu_close(got: torch.Tensor, want: torch.Tensor) -> None:
    # bf16 output (both sides) and, for M > 1, the weight tile rounded to bf16 before tl.dot.
    want = want.float()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.std().item())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 256])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096)])
@pytest.mark.parametrize("group", [128, 32])
def test_int4_matmul_bf16_real_sizes_on_gpu(m, n, k, group):
    gen = torch.Generator(device="cuda").manual_seed(m + n + group)
    packed = torch.randint(0, 256, (n, k // 2), generator=gen, device="cuda", dtype=torch.int32).to(torch.uint8)
    scale = (torch.rand(n, k // group, generator=gen, device="cuda") * 0.02 + 0.005).to(torch.bfloat16)
    zero = (torch.randn(n, k // group, generator=gen, device="cuda") * 0.05).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    got = int4_matmul(x, packed, scale, zero, group)
    _gpu_close(got, int4_matmul_ref(x, packed, scale, zero, group))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 256])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096)])
@pytest.mark.parametrize("group", [128, 32, "per-channel"])
def test_int8_matmul_bf16_real_sizes_on_gpu(m, n, k, group):
    g = k if group == "per-channel" else group
    gen = torch.Generator(device="cuda").manual_seed(m + n + g)
    q = torch.randint(-127, 128, (n, k), generator=gen, device="cuda", dtype=torch.int32).to(torch.int8)
    scale = (torch.rand(n, k // g, generator=gen, device="cuda") * 0.002 + 0.0005).to(torch.bfloat16)
    zero = (
        None
        if group == "per-channel"
        else (torch.randn(n, k // g, generator=gen, device="cuda") * 0.05).to(torch.bfloat16)
    )
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    got = int8_matmul(x, q, scale, zero, g)
    _gpu_close(got, int8_matmul_ref(x, q, scale, zero, g))


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the other tests already run these configs")
@pytest.mark.parametrize("fmt", ["int4_g32", "int4_g128", "int8_g16", "int8_g32_zero", "int8_channel"])
def test_gpu_tile_configs_match_references_in_the_interpreter(monkeypatch, fmt):
    """The tiles a GPU runs (larger than the interpreter's own), numerically, one M per regime."""
    from membound.kernels import quant_matmul as qm

    monkeypatch.setattr(qm, "_CPU_CONFIGS", qm._GPU_CONFIGS)
    gen = torch.Generator().manual_seed(len(fmt))
    n, k = 72, 512  # a ragged last row tile for every BLOCK_N; K spans several chunks of each BLOCK_K
    for m in (1, 3, 17, 70):
        x = torch.randn(m, k, generator=gen).to(torch.float16)
        if fmt.startswith("int4"):
            g = int(fmt.split("_g")[1])
            packed, scale, zero, w = _int4_data(n, k, g, torch.float32, gen)
            got = int4_matmul(x, packed, scale, zero, g)
        else:
            g = k if fmt == "int8_channel" else int(fmt.split("_g")[1].split("_")[0])
            q, scale, zero, w = _int8_data(n, k, g, torch.float32, fmt.endswith("zero"), gen)
            got = int8_matmul(x, q, scale, zero, g)
        _close(got, (x.float() @ w.T).to(torch.float16), torch.float16)
