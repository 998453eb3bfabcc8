"""Runs one scheduled step: builds the flat input batch, runs the model, samples.

Host work per step: a few small index tensors go to the device; the sampled ids
(and logprobs when asked) come back in one non-blocking copy into pinned memory.
Logits are computed only for the rows that sample, never for every prompt token.
Pure decode steps replay a CUDA graph when the engine captured them.
"""

from __future__ import annotations

import dataclasses

import torch

from membound.attention.base import AttentionMetadata
from membound.engine.cuda_graphs import DecodeGraphs
from membound.engine.sampler import SamplerOutput, SamplingBatch, sample_on_device, unpack
from membound.engine.scheduler import SchedulerOutput
from membound.model.llama import LlamaForCausalLM


@dataclasses.dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # index of the last token of each sampling request


class HostCopier:
    """Device-to-host copies through reusable pinned buffers: the copy is asynchronous, and the
    host waits on an event for exactly that copy instead of a whole-device synchronize."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._event = torch.cuda.Event() if device.type == "cuda" else None

    def fetch(self, t: torch.Tensor) -> torch.Tensor:
        if self._event is None:
            return t
        buf = self._buffers.get(t.dtype)
        if buf is None or buf.numel() < t.numel():
            buf = torch.empty(max(t.numel(), 4096), dtype=t.dtype, pin_memory=True)
            self._buffers[t.dtype] = buf
        host = buf[: t.numel()].view(t.shape)
        host.copy_(t, non_blocking=True)
        self._event.record()
        self._event.synchronize()
        return host


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        device: torch.device,
        seed: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.vocab_size = model.config.vocab_size
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.copier = HostCopier(device)
        self.graphs: DecodeGraphs | None = None  # set by the engine when decode steps are padded/captured

    def prepare(self, sched: SchedulerOutput) -> ModelInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        rows: list[int] = []
        bs = self.block_size
        for s in sched.scheduled:
            req = s.request
            start, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
            ids.extend(req.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            starts.append(starts[-1] + s.num_new_tokens)
            if s.samples:
                rows.append(starts[-1] - 1)
        width = max(len(s.request.block_ids) for s in sched.scheduled)
        table = [s.request.block_ids + [0] * (width - len(s.request.block_ids)) for s in sched.scheduled]

        def dev(values, dtype=torch.int64):
            return torch.tensor(values, dtype=dtype, device=self.device)

        meta = AttentionMetadata(
            slot_mapping=dev(slots),
            block_tables=dev(table, torch.int32),
            seq_lens=dev(seq_lens, torch.int32),
            query_start_loc=dev(starts, torch.int32),
            num_decodes=sched.num_decodes,
            seq_lens_host=tuple(seq_lens),
            query_start_loc_host=tuple(starts),
        )
        return ModelInputs(dev(ids), dev(positions), meta, dev(rows))

    @torch.inference_mode()
    def forward_logits(self, inputs: ModelInputs) -> torch.Tensor:
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        return self.model.compute_logits(hidden[inputs.logits_rows])

    def _graph_decode(self, sched: SchedulerOutput) -> torch.Tensor | None:
        """Logits of a pure decode step through the static (and, on CUDA, captured) decode path."""
        g = self.graphs
        if g is None or sched.num_decodes != len(sched.scheduled) or len(sched.scheduled) > g.max_batch:
            return None
        if not all(s.samples for s in sched.scheduled):  # a one-token prompt chunk that is not the last
            return None
        bs = self.block_size
        ids, positions, slots, tables = [], [], [], []
        for s in sched.scheduled:
            req = s.request
            p = req.num_computed_tokens
            ids.append(req.token_ids[p])
            positions.append(p)
            slots.append(req.block_ids[p // bs] * bs + p % bs)
            tables.append(req.block_ids)
        return g.run(ids, positions, slots, tables)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> SamplerOutput | None:
        """Run the step; sample for every request that finished its pending tokens."""
        sampling = [s.request for s in sched.scheduled if s.samples]
        logits = self._graph_decode(sched)
        if logits is None:
            inputs = self.prepare(sched)
            if not sampling:
                self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
                return None
            logits = self.forward_logits(inputs)
        batch = SamplingBatch.build(
            [r.params for r in sampling],
            [r.generator for r in sampling],
            [r.token_ids for r in sampling],
            [len(r.prompt_token_ids) for r in sampling],
            self.vocab_size,
            self.device,
            [r.banned_token_ids() for r in sampling],
        )
        return unpack(self.copier.fetch(sample_on_device(logits, batch, self.generator)), batch)
