"""Start-up forward passes on synthetic batches: the kernel warm-up, and the metadata they run on.

The warm-up compiles, at start-up, every Triton kernel variant serving can launch, so no request
waits for a JIT compile (0.5-1 s each on a GPU) and none happens inside a CUDA-graph capture.
The kernels specialise only on what is fixed for an engine (model shape, dtypes, block size)
and, for the quantized matmuls, on a regime of the row count: one decode step and one prefill
chunk per regime (`warmup_rows`) reach them all (tests/test_kernel_variants.py checks that
serving then compiles nothing new). The sm_90a compile check (tests/sm90_compile.py) runs the
same function on meta tensors.
"""

from __future__ import annotations

import torch

from membound.attention.base import AttentionMetadata
from membound.engine.kv_cache import blocks_needed


def synthetic_metadata(
    backend, q_lens: list[int], seq_len: int, table_row: list[int], block_size: int, device: torch.device
) -> AttentionMetadata:
    """Metadata for start-up runs: each sequence has seq_len tokens, its last q_len new, all
    sharing one block-table row (sequences of 1 query token come first, as the runner orders them)."""
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    bs = block_size
    slots = [table_row[p // bs] * bs + p % bs for q in q_lens for p in range(seq_len - q, seq_len)]
    return backend.prepare_metadata(
        slot_mapping=torch.tensor(slots, device=device),
        block_tables=torch.tensor([table_row] * len(q_lens), dtype=torch.int32, device=device),
        seq_lens=torch.tensor([seq_len] * len(q_lens), dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        num_decodes=sum(1 for q in q_lens if q == 1),
        seq_lens_host=(seq_len,) * len(q_lens),
        query_start_loc_host=tuple(starts),
    )


@torch.inference_mode()
def warm_up_kernels(
    model,
    kv_caches: list,
    block_size: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int,
    num_blocks: int,
) -> None:
    """Run one decode step and one prefill chunk per row-count regime. They write K/V into free
    blocks of the pool (nothing is cached in them yet) and sample nothing."""
    from membound.kernels.quant_matmul import warmup_rows

    device = kv_caches[0][0].device
    seq_len = 2 * block_size + 1  # three pages: a partial last page, and more than one split
    cap = min(max_model_len, num_blocks * block_size)  # all rows share one block-table row
    for m in warmup_rows(min(max_num_batched_tokens, max_model_len)):
        rows = min(m, max_num_seqs)
        # A prefill chunk of m tokens that the pool cannot hold, serving cannot run either.
        for q_lens in ([1] * rows, [m]) if 1 < m <= cap else ([1] * rows,):
            length = min(cap, max(seq_len, m))
            need = blocks_needed(length, block_size)
            meta = synthetic_metadata(model.attention_backend, q_lens, length, list(range(need)), block_size, device)
            positions = [p for q in q_lens for p in range(length - q, length)]
            ids = torch.zeros(len(positions), dtype=torch.int64, device=device)
            hidden = model(ids, torch.tensor(positions, device=device), kv_caches, meta)
            last = torch.tensor(meta.query_start_loc_host[1:], device=device) - 1
            model.compute_logits(hidden[last])
