"""The contract between the model and an attention implementation.

A step's tokens are flattened into one [T, ...] batch. Sequences that decode one
token come first (`num_decodes` of them), then sequences that prefill a chunk.
Every backend writes the step's K/V into the paged cache and attends over the
cached prefix plus the new tokens, causally.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import torch


@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of a step lives in the paged cache, and what it sees."""

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset for each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [B] int32: KV length of each sequence after this step
    query_start_loc: torch.Tensor  # [B + 1] int32: prefix sums of tokens per sequence
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    # Host copies, so backends that loop over sequences never sync on the device.
    seq_lens_host: tuple[int, ...]
    query_start_loc_host: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    # Derived once per step and shared by every layer (cached_property writes to __dict__,
    # which a frozen dataclass allows).
    @functools.cached_property
    def max_decode_len(self) -> int:
        return max(self.seq_lens_host[: self.num_decodes], default=0)

    @functools.cached_property
    def max_prefill_query_len(self) -> int:
        s, nd = self.query_start_loc_host, self.num_decodes
        return max((s[i + 1] - s[i] for i in range(nd, self.num_seqs)), default=0)

    @functools.cached_property
    def prefill_query_start_loc(self) -> torch.Tensor:
        """query_start_loc of the prefill sequences alone, starting at 0."""
        return self.query_start_loc[self.num_decodes :] - self.query_start_loc_host[self.num_decodes]


class AttentionBackend(Protocol):
    """`forward` writes this step's K/V into the cache, then attends; `attend` only attends, for a model
    whose layer kernels wrote K/V already (RoPE fused with the write). Both return [T, H, D]."""

    name: str

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,  # [T, KVH, D]
        k_cache: torch.Tensor,  # [KVH, num_blocks, block_size, D]
        v_cache: torch.Tensor,  # [KVH, num_blocks, block_size, D]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # int8 cache: [KVH, num_blocks, block_size]
    ) -> torch.Tensor: ...

    def attend(
        self,
        q: torch.Tensor,  # [T, H, D]
        k_cache: torch.Tensor,  # this step's K/V already written
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor: ...
