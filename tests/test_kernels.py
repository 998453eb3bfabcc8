"""Every Triton kernel against its PyTorch reference on random inputs.

On CPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at small sizes,
in fp32 and fp16 (the interpreter mishandles bf16 arithmetic); on a GPU the `gpu`-marked
tests repeat them in bf16 at real sizes.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from membound.attention.torch_paged import decode_attention  # noqa: E402
from membound.kernels.decode_attention import paged_decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _paged_cache(kvh: int, seq_lens: list[int], block_size: int, d: int, dtype, gen: torch.Generator):
    """A cache holding random K/V for each sequence in scrambled blocks, and its block table."""
    pages = [(n + block_size - 1) // block_size for n in seq_lens]
    total = sum(pages) + 3
    k_cache = torch.randn(kvh, total, block_size, d, generator=gen).to(dtype)
    v_cache = torch.randn(kvh, total, block_size, d, generator=gen).to(dtype)
    order = torch.randperm(total, generator=gen).tolist()
    table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    used = 0
    for i, p in enumerate(pages):
        table[i, :p] = torch.tensor(order[used : used + p], dtype=torch.int32)
        used += p
    return k_cache.to(DEVICE), v_cache.to(DEVICE), table.to(DEVICE)


def _check_decode(seq_lens, heads, kv_heads, d, dtype, block_size=16, window=None, num_splits=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, table = _paged_cache(kv_heads, seq_lens, block_size, d, dtype, gen)
    q = torch.randn(len(seq_lens), heads, d, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = d**-0.5
    got = paged_decode_attention(q, k_cache, v_cache, table, lens, scale, window, num_splits)
    want = decode_attention(q.float(), k_cache.float(), v_cache.float(), table, lens, scale, window)
    tol = 2e-3 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_gqa_ragged_lengths(group, dtype):
    # Lengths on, just under and just past block boundaries, and a single token.
    _check_decode([1, 15, 16, 17, 40], heads=2 * group, kv_heads=2, d=32, dtype=dtype, seed=group)


def test_decode_attention_split_across_many_kv_splits():
    for splits in (1, 3, 8, 13):
        _check_decode([200, 7, 129], heads=4, kv_heads=2, d=64, dtype=torch.float32, num_splits=splits, seed=splits)


def test_decode_attention_sliding_window_and_odd_head_dim():
    _check_decode([50, 33, 5], heads=6, kv_heads=2, d=40, dtype=torch.float32, window=20, num_splits=4)
    _check_decode([64], heads=4, kv_heads=4, d=16, dtype=torch.float16, block_size=8, window=17, num_splits=3)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_attention_bf16_real_sizes_on_gpu(group):
    gen = torch.Generator().manual_seed(group)
    seq_lens = [1, 17, 1000, 4096, 8191]
    k_cache, v_cache, table = _paged_cache(8, seq_lens, 16, 128, torch.bfloat16, gen)
    q = torch.randn(len(seq_lens), 8 * group, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    got = paged_decode_attention(q, k_cache, v_cache, table, lens, 128**-0.5)
    want = decode_attention(q.float(), k_cache.float(), v_cache.float(), table, lens, 128**-0.5, None)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
