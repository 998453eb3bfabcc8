"""The PyTorch paged attention against dense causal attention on random inputs."""

from __future__ import annotations

import pytest
import torch

from membound.attention import TorchPagedAttention
from membound.attention.base import AttentionMetadata


def dense_reference(q, k, v, scale, window):
    """Plain causal softmax attention for one sequence, K/V repeated for GQA."""
    t, h, _ = q.shape
    groups = h // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    qpos, kpos = torch.arange(t)[:, None], torch.arange(t)[None, :]
    mask = kpos <= qpos
    if window:
        mask &= kpos > qpos - window
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("groups", [1, 3, 4])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("gather_cap", [1 << 16, 40])
def test_paged_prefill_chunks_and_decodes_match_dense(groups, window, gather_cap, monkeypatch):
    """Sequences of ragged lengths arrive as chunks + decodes over scrambled blocks.

    A small gather cap splits the batched decode into several sub-batches."""
    monkeypatch.setattr("membound.attention.torch_paged.DECODE_GATHER_TOKENS", gather_cap)
    g = torch.Generator().manual_seed(groups)
    kvh, d, bs, nblocks = 2, 16, 4, 64
    h = kvh * groups
    lens = [1, 3, 4, 5, 17, 30]
    k_cache = torch.randn(kvh, nblocks, bs, d, generator=g)  # stale garbage must be ignored
    v_cache = torch.randn(kvh, nblocks, bs, d, generator=g)
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, seqs = [], []
    for n in lens:
        need = (n + bs - 1) // bs
        tables.append([perm.pop() for _ in range(need)])
        seqs.append(tuple(torch.randn(n, x, d, generator=g) for x in (h, kvh, kvh)))
    backend, scale = TorchPagedAttention(), d**-0.5
    outs = [torch.empty(n, h, d) for n in lens]
    computed = [0] * len(lens)
    while any(c < n for c, n in zip(computed, lens, strict=True)):
        # Each step: sequences in their decode phase give one token, others a chunk of up to 6.
        step = []
        for i, n in enumerate(lens):
            if computed[i] < n:
                chunk = 1 if computed[i] >= n // 2 else min(6, n - computed[i])
                step.append((i, chunk))
        step.sort(key=lambda x: x[1] > 1)
        qs, ks, vs, slots, starts, seq_lens = [], [], [], [], [0], []
        for i, c in step:
            lo, hi = computed[i], computed[i] + c
            q, k, v = seqs[i]
            qs.append(q[lo:hi]), ks.append(k[lo:hi]), vs.append(v[lo:hi])
            slots += [tables[i][p // bs] * bs + p % bs for p in range(lo, hi)]
            starts.append(starts[-1] + c)
            seq_lens.append(hi)
        width = max(len(tables[i]) for i, _ in step)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i, _ in step], dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            num_decodes=sum(1 for _, c in step if c == 1),
            seq_lens_host=tuple(seq_lens),
            query_start_loc_host=tuple(starts),
        )
        out = backend.forward(torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, meta, scale, window)
        for j, (i, c) in enumerate(step):
            outs[i][computed[i] : computed[i] + c] = out[starts[j] : starts[j + 1]]
            computed[i] += c
    for i, (q, k, v) in enumerate(seqs):
        torch.testing.assert_close(outs[i], dense_reference(q, k, v, scale, window), atol=1e-5, rtol=1e-5)
