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
    def row_kv(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Per query row: its sequence's block table [T, max_blocks], the KV length it attends to [T]
        int32 (its position + 1), and those lengths on the host. What a backend needs to attend each
        row on its own, as if it were a decode (the batch-invariant path)."""
        starts, lens = self.query_start_loc_host, self.seq_lens_host
        host: list[int] = []
        for i in range(self.num_seqs):
            q_len = starts[i + 1] - starts[i]
            host.extend(range(lens[i] - q_len + 1, lens[i] + 1))
        q_lens = torch.tensor([starts[i + 1] - starts[i] for i in range(self.num_seqs)], dtype=torch.long)
        seq_of_row = torch.repeat_interleave(torch.arange(self.num_seqs), q_lens).to(self.block_tables.device)
        kv_lens = torch.tensor(host, dtype=torch.int32, device=self.seq_lens.device)
        return self.block_tables.index_select(0, seq_of_row), kv_lens, host

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


@dataclasses.dataclass
class GraphMetadataBuffers:
    """Static metadata tensors a captured decode graph reads; a replay copies each step's into them."""

    slot_mapping: torch.Tensor  # [max_batch] int64, padding rows: the pad block's first slot
    block_tables: torch.Tensor  # [max_batch, max_blocks] int32
    seq_lens: torch.Tensor  # [max_batch] int32, padding rows: 1
    query_start_loc: torch.Tensor  # [max_batch + 1] int32: one query token per row
    pad_block: int
    block_size: int


class PagedAttentionBase:
    """What every backend shares: metadata is prepared here (one place), and the CUDA-graph
    hooks keep it in static buffers. A backend that needs its own planning per step (say,
    FlashInfer's) overrides these three methods; the runner and the graphs call nothing else."""

    name: str

    def prepare_metadata(
        self,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        num_decodes: int,
        seq_lens_host: tuple[int, ...],
        query_start_loc_host: tuple[int, ...],
    ) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping, block_tables, seq_lens, query_start_loc, num_decodes, seq_lens_host, query_start_loc_host
        )

    def init_graph_buffers(
        self, max_batch: int, max_blocks: int, block_size: int, pad_block: int, device: torch.device
    ) -> GraphMetadataBuffers:
        return GraphMetadataBuffers(
            slot_mapping=torch.full((max_batch,), pad_block * block_size, dtype=torch.int64, device=device),
            block_tables=torch.full((max_batch, max_blocks), pad_block, dtype=torch.int32, device=device),
            seq_lens=torch.ones(max_batch, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
            pad_block=pad_block,
            block_size=block_size,
        )

    def graph_metadata(self, buf: GraphMetadataBuffers, bs: int, seq_lens_host: tuple[int, ...]) -> AttentionMetadata:
        """Metadata over the first bs static rows: what a graph is captured (and eagerly run) with."""
        return self.prepare_metadata(
            buf.slot_mapping[:bs], buf.block_tables[:bs], buf.seq_lens[:bs], buf.query_start_loc[: bs + 1],
            bs, seq_lens_host, tuple(range(bs + 1)),
        )  # fmt: skip

    def prepare_for_replay(self, buf: GraphMetadataBuffers, meta: AttentionMetadata, bs: int) -> None:
        """Copy a decode step's metadata into the static rows, padding rows n..bs into the pad block.
        Block-table columns past a row's length may keep an earlier step's entries: no kernel reads them."""
        n = meta.num_seqs
        width = meta.block_tables.shape[1]
        buf.slot_mapping[:n].copy_(meta.slot_mapping)
        buf.seq_lens[:n].copy_(meta.seq_lens)
        buf.block_tables[:n, :width].copy_(meta.block_tables)
        if bs > n:
            buf.slot_mapping[n:bs].fill_(buf.pad_block * buf.block_size)
            buf.seq_lens[n:bs].fill_(1)
            buf.block_tables[n:bs, 0].fill_(buf.pad_block)
