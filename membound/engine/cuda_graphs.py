"""Decode steps replayed from CUDA graphs: one launch for the whole forward pass.

A decode step of a small model is a few hundred kernels, each a few microseconds of work;
launched one by one from Python, the gaps between them cost more than the kernels. A CUDA
graph records the launches once and replays them in one call. Graphs have fixed shapes, so
one is captured per batch size of a ladder (1, 2, 4, 8, then every 8) and a batch is padded
up to the next size. Padding rows decode token 0 at position 0 into a scratch KV block that
the allocator never hands out, so they cannot touch a real sequence.

Every graph reads its inputs from the same static buffers: the step's inputs, already on the
device (the persistent input batch built them), are copied in before the replay. The forward
pass is identical with or without capture; `capture=False` runs it eagerly on the padded
buffers, which is how the CPU tests check the padding.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from membound.engine.input_batch import ModelInputs

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
        # Static inputs every graph reads; a step copies its (device) inputs in, device to device.
        self.ids = torch.zeros(b, dtype=torch.int64, device=device)
        self.positions = torch.zeros(b, dtype=torch.int64, device=device)
        # The attention metadata's static twin belongs to the backend (its capture/replay hooks).
        self.backend = model.attention_backend
        self.meta_buffers = self.backend.init_graph_buffers(b, w, block_size, pad_block, device)
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
        meta = self.backend.graph_metadata(self.meta_buffers, bs, seq_lens_host)
        return self.model(self.ids[:bs], self.positions[:bs], self.kv_caches, meta)

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
        mb = self.meta_buffers
        static = sum(t.numel() * t.element_size() for t in (self.ids, self.positions, mb.slot_mapping, mb.block_tables))
        self.graph_bytes = torch.cuda.memory_reserved(self.device) - before + static
        log.info(
            "captured %d CUDA graphs (batch %s) in %.1fs, %.1f MiB",
            len(self.graphs),
            ",".join(map(str, sorted(self.graphs))),
            time.perf_counter() - t0,
            self.graph_bytes / 2**20,
        )
        return self.graph_bytes

    def run(self, inputs: ModelInputs) -> torch.Tensor:
        """One decode step for the inputs' sequences (every row one token); [B, hidden] states.

        Padding rows decode token 0 at position 0 into the scratch block; block-table columns
        past a row's length may hold an earlier step's entries, which no kernel reads."""
        meta = inputs.meta
        n = meta.num_seqs
        bs = padded_size(self.ladder, n)
        self.ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        if bs > n:
            self.ids[n:bs].zero_()
            self.positions[n:bs].zero_()
        self.backend.prepare_for_replay(self.meta_buffers, meta, bs)
        graph = self.graphs.get(bs)
        if graph is not None:
            graph.replay()
            return self.hidden[bs][:n]
        lens = meta.seq_lens_host + (1,) * (bs - n)
        with torch.inference_mode():
            return self._forward(bs, lens)[:n]
