"""Decode steps replayed from CUDA graphs: one launch for the whole forward pass.

A decode step of a small model is a few hundred kernels, each a few microseconds of work;
launched one by one from Python, the gaps between them cost more than the kernels. A CUDA
graph records the launches once and replays them in one call. Graphs have fixed shapes, so
one is captured per batch size of a ladder (1, 2, 4, 8, then every 8) and a batch is padded
up to the next size. Padding rows decode token 0 at position 0 into a scratch KV block that
the allocator never hands out, so they cannot touch a real sequence.

Every graph reads its inputs from the same static buffers: the host fills pinned copies of
them and sends only the rows (and block-table columns) in use, asynchronously. The forward
pass is identical with or without capture; `capture=False` runs it eagerly on the padded
buffers, which is how the CPU tests check the padding.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from membound.attention.base import AttentionMetadata

log = logging.getLogger("membound")


def batch_ladder(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then multiples of 8, ending at max_batch."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return sizes + [max_batch]


def padded_size(ladder: list[int], batch: int) -> int:
    for s in ladder:
        if s >= batch:
            return s
    raise ValueError(f"batch {batch} is larger than the largest captured size {ladder[-1]}")


class DecodeGraphs:
    """Static decode buffers plus, on CUDA, one captured graph per ladder size."""

    def __init__(
        self,
        model,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_model_len: int,
        max_batch: int,
        pad_block: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.ladder = batch_ladder(max_batch)
        self.max_blocks = math.ceil(max_model_len / block_size)
        self.pad_block = pad_block
        self.device = device
        b, w = self.ladder[-1], self.max_blocks
        pin = device.type == "cuda"
        # [ids, positions, slots, seq_lens] per row, and the block table: host (pinned) and device twins.
        # Two host sets alternate: with overlapped scheduling the next step is filled while the
        # previous upload may still be in flight.
        self._host = [
            (torch.zeros(4, b, dtype=torch.int64, pin_memory=pin), torch.zeros(b, w, dtype=torch.int32, pin_memory=pin))
            for _ in range(2)
        ]
        self.host_rows, self.host_table = self._host[0]
        self.rows = torch.zeros(4, b, dtype=torch.int64, device=device)
        self.table = torch.full((b, w), pad_block, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        # Contiguous staging for the block table: a non-contiguous host-to-device copy would go
        # through pageable memory (and may wait for the stream); a device-to-device copy places it.
        self.table_staging = torch.zeros(b * w, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # each size's output; logits are computed outside
        self.pool = None
        self.graph_bytes = 0

    @property
    def max_batch(self) -> int:
        return self.ladder[-1]

    def _forward(self, bs: int, seq_lens_host: tuple[int, ...]) -> torch.Tensor:
        """The decode forward on the first bs static rows; [bs, hidden] final hidden states.

        Logits stay outside the graph: a [bs, vocab] fp32 output per captured size would hold
        gigabytes for a 128K vocabulary, and the LM head then skips the padding rows."""
        ids, positions, slots, _ = self.rows[:, :bs]
        # Written inside the graph, so the replay itself turns the int64 upload into int32 lengths.
        self.seq_lens[:bs].copy_(self.rows[3, :bs])
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=self.table[:bs],
            seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            num_decodes=bs,
            seq_lens_host=seq_lens_host,
            query_start_loc_host=tuple(range(bs + 1)),
        )
        return self.model(ids, positions, self.kv_caches, meta)

    @torch.inference_mode()
    def capture(self, sizes: list[int] | None = None) -> int:
        """Capture the ladder (or `sizes`), largest first so the smaller ones reuse its memory pool.

        Returns the bytes the graphs hold: their shared pool (what the device reports used, so
        the pool's cached free blocks count) plus the static buffers.
        """
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        t0 = time.perf_counter()
        self._fill_padding(0, self.max_batch)
        self.rows[:, :].copy_(self.host_rows)
        lens = (self.max_model_len,) * self.max_batch
        sizes = sorted(sizes or self.ladder, reverse=True)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Warm-up of every size on a side stream: Triton compiles (split counts differ per
            # batch), cuBLAS picks its algorithms; nothing may compile during a capture.
            for bs in sizes:
                self._forward(bs, lens[:bs])
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for bs in sizes:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.hidden[bs] = self._forward(bs, lens[:bs])
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        static = sum(t.numel() * t.element_size() for t in (self.rows, self.table, self.table_staging, self.seq_lens))
        self.graph_bytes = torch.cuda.memory_reserved(self.device) - before + static
        log.info(
            "captured %d CUDA graphs (batch %s) in %.1fs, %.1f MiB",
            len(self.graphs),
            ",".join(map(str, sorted(self.graphs))),
            time.perf_counter() - t0,
            self.graph_bytes / 2**20,
        )
        return self.graph_bytes

    def _fill_padding(self, lo: int, hi: int) -> None:
        """Rows lo..hi decode token 0 at position 0 into the scratch block."""
        self.host_rows[:, lo:hi] = 0
        self.host_rows[2, lo:hi] = self.pad_block * self.block_size
        self.host_rows[3, lo:hi] = 1

    def run(
        self,
        token_ids: list[int],
        positions: list[int],
        slots: list[int],
        block_tables: list[list[int]],
        prev: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One decode step for len(token_ids) sequences; [B, vocab] fp32 logits.

        positions[i] is the new token's position, so the sequence length is positions[i] + 1.
        prev: (device ids, row index) that replace token_ids, for a step scheduled ahead of its inputs."""
        n = len(token_ids)
        bs = padded_size(self.ladder, n)
        self._host.reverse()
        self.host_rows, self.host_table = self._host[0]
        rows = self.host_rows
        rows[0, :n] = torch.tensor(token_ids, dtype=torch.int64)
        rows[1, :n] = torch.tensor(positions, dtype=torch.int64)
        rows[2, :n] = torch.tensor(slots, dtype=torch.int64)
        rows[3, :n] = rows[1, :n] + 1
        self._fill_padding(n, bs)
        width = max(len(t) for t in block_tables)
        # Only the rows in use and the columns any of them reaches travel, packed contiguously:
        # rows as a whole (a few KB), the table as a [bs, width] block of the flat staging.
        table = self.host_table.view(-1)[: bs * width].view(bs, width)
        for i, t in enumerate(block_tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        table[n:bs, 0] = self.pad_block
        self.rows.copy_(rows, non_blocking=True)
        staged = self.table_staging[: bs * width]
        staged.copy_(self.host_table.view(-1)[: bs * width], non_blocking=True)
        self.table[:bs, :width].copy_(staged.view(bs, width))
        if prev is not None:
            self.rows[0, :n].copy_(prev[0][prev[1]])
        graph = self.graphs.get(bs)
        if graph is not None:
            graph.replay()
            hidden = self.hidden[bs]
        else:
            lens = tuple(p + 1 for p in positions) + (1,) * (bs - n)
            with torch.inference_mode():
                hidden = self._forward(bs, lens)
        with torch.inference_mode():
            return self.model.compute_logits(hidden[:n])
