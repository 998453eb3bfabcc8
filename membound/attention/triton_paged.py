"""Paged attention with the Triton kernels: the CUDA fast path.

Decodes go through the split-KV decode kernel in one launch, all prefill/extend chunks
through the varlen prefill kernel in another; K/V are written into the cache first.
"""

from __future__ import annotations

import torch

from membound.attention.base import AttentionMetadata
from membound.attention.torch_paged import TorchPagedAttention


class TritonPagedAttention(TorchPagedAttention):
    """The PyTorch backend's K/V write (`forward` = write, then `attend`), the Triton kernels' attention."""

    name = "triton"

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention over K/V already in the cache (this step's included)."""
        from membound.kernels.decode_attention import paged_decode_attention
        from membound.kernels.prefill_attention import paged_prefill_attention

        nd, starts = meta.num_decodes, meta.query_start_loc_host
        parts = []
        if nd:
            parts.append(
                paged_decode_attention(
                    q[:nd],
                    k_cache,
                    v_cache,
                    meta.block_tables[:nd],
                    meta.seq_lens[:nd],
                    scale,
                    sliding_window,
                    kv_scales=kv_scales,
                )
            )
        if nd < meta.num_seqs:
            parts.append(
                paged_prefill_attention(
                    q[starts[nd] :],
                    k_cache,
                    v_cache,
                    meta.block_tables[nd:],
                    meta.seq_lens[nd:],
                    meta.prefill_query_start_loc,
                    meta.max_prefill_query_len,
                    scale,
                    sliding_window,
                    kv_scales=kv_scales,
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
