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
from membound.engine.request import Request
from membound.engine.sampler import SamplerOutput, SamplingBatch, sample_on_device, unpack
from membound.engine.scheduler import SchedulerOutput
from membound.engine.transfer import to_device
from membound.model.llama import LlamaForCausalLM


@dataclasses.dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # index of the last token of each sampling request


class HostCopier:
    """Device-to-host copies into reusable pinned buffers: `start` enqueues the copy and returns at
    once, `wait` blocks on an event for exactly that copy (not a whole-device synchronize). Two
    buffers alternate, so one step's result can still be in flight while the next is copied."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: list[dict[torch.dtype, torch.Tensor]] = [{}, {}]
        # Blocking events: the waiting thread sleeps instead of spinning on a core the server needs.
        self._events = [torch.cuda.Event(blocking=True) for _ in range(2)] if device.type == "cuda" else None
        self._turn = 0

    def start(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if self._events is None:
            return t, None
        self._turn ^= 1
        buffers = self._buffers[self._turn]
        buf = buffers.get(t.dtype)
        if buf is None or buf.numel() < t.numel():
            buf = torch.empty(max(t.numel(), 4096), dtype=t.dtype, pin_memory=True)
            buffers[t.dtype] = buf
        host = buf[: t.numel()].view(t.shape)
        host.copy_(t, non_blocking=True)
        event = self._events[self._turn]
        event.record()
        return host, event

    @staticmethod
    def wait(pending: tuple[torch.Tensor, torch.cuda.Event | None]) -> torch.Tensor:
        host, event = pending
        if event is not None:
            event.synchronize()
        return host


@dataclasses.dataclass
class LaunchedStep:
    """A step whose work is queued on the device; `ModelRunner.fetch` brings its result back."""

    sched: SchedulerOutput
    sampling: list[Request]  # the requests behind the result's rows, in order
    batch: SamplingBatch | None
    ids: torch.Tensor | None  # sampled ids on the device [len(sampling)]: the next step's inputs
    pending: tuple[torch.Tensor, torch.cuda.Event | None] | None


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

    def prepare(self, sched: SchedulerOutput, prev: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModelInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        rows: list[int] = []
        bs = self.block_size
        for s in sched.scheduled:
            req = s.request
            if prev is None:
                start, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
                ids.extend(req.token_ids[start:end])
            else:  # decoding the token still on its way from the device: filled in below
                start, end = req.num_tokens, req.num_tokens + 1
                ids.append(0)
            positions.extend(range(start, end))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            starts.append(starts[-1] + s.num_new_tokens)
            if prev is not None or s.samples:
                rows.append(starts[-1] - 1)
        width = max(len(s.request.block_ids) for s in sched.scheduled)
        table = [s.request.block_ids + [0] * (width - len(s.request.block_ids)) for s in sched.scheduled]

        def dev(values, dtype=torch.int64):
            return to_device(values, dtype, self.device)

        meta = AttentionMetadata(
            slot_mapping=dev(slots),
            block_tables=dev(table, torch.int32),
            seq_lens=dev(seq_lens, torch.int32),
            query_start_loc=dev(starts, torch.int32),
            num_decodes=sched.num_decodes,
            seq_lens_host=tuple(seq_lens),
            query_start_loc_host=tuple(starts),
        )
        input_ids = dev(ids)
        if prev is not None:
            input_ids.copy_(prev[0][prev[1]])
        return ModelInputs(input_ids, dev(positions), meta, dev(rows))

    @torch.inference_mode()
    def forward_logits(self, inputs: ModelInputs) -> torch.Tensor:
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        return self.model.compute_logits(hidden[inputs.logits_rows])

    def _graph_decode(
        self, sched: SchedulerOutput, prev: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor | None:
        """Logits of a pure decode step through the static (and, on CUDA, captured) decode path."""
        g = self.graphs
        if g is None or sched.num_decodes != len(sched.scheduled) or len(sched.scheduled) > g.max_batch:
            return None
        bs = self.block_size
        ids, positions, slots, tables = [], [], [], []
        for s in sched.scheduled:
            req = s.request
            p = req.num_computed_tokens if prev is None else req.num_tokens
            ids.append(0 if prev is not None else req.token_ids[p])
            positions.append(p)
            slots.append(req.block_ids[p // bs] * bs + p % bs)
            tables.append(req.block_ids)
        return g.run(ids, positions, slots, tables, prev)

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev: tuple[torch.Tensor, torch.Tensor] | None = None) -> LaunchedStep:
        """Queue the step's forward pass and sampling on the device, and the copy of the result.

        prev: for a step scheduled before the previous one's tokens reached the host, (the
        previous step's sampled ids on the device, which of its rows each sequence takes); every
        sequence then decodes the token it sampled last, at position num_tokens.
        """
        if prev is None:
            sampling = [s.request for s in sched.scheduled if s.samples]
        else:
            sampling = [s.request for s in sched.scheduled]
            if sched.num_decodes != len(sampling):
                raise ValueError("a step built on the previous step's device ids must be all decodes")
        all_sample = bool(sampling) and len(sampling) == len(sched.scheduled)
        logits = self._graph_decode(sched, prev) if all_sample else None
        if logits is None:
            inputs = self.prepare(sched, prev)
            if not sampling:
                self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
                return LaunchedStep(sched, [], None, None, None)
            logits = self.forward_logits(inputs)
        pending = 0 if prev is None else 1  # the previous step's token is not in token_ids yet
        batch = SamplingBatch.build(
            [r.params for r in sampling],
            [r.generator for r in sampling],
            [r.token_ids for r in sampling],
            [len(r.prompt_token_ids) for r in sampling],
            self.vocab_size,
            self.device,
            [r.banned_token_ids(pending) for r in sampling],
        )
        result = sample_on_device(logits, batch, self.generator)
        ids = result if result.dim() == 1 else result[:, 0].long()
        return LaunchedStep(sched, sampling, batch, ids, self.copier.start(result))

    def fetch(self, step: LaunchedStep) -> SamplerOutput | None:
        """Wait for the step's result on the host."""
        if step.pending is None:
            return None
        return unpack(self.copier.wait(step.pending), step.batch)

    def execute(self, sched: SchedulerOutput) -> SamplerOutput | None:
        """Run the step and wait for it; sample for every request that finished its pending tokens."""
        return self.fetch(self.launch(sched))
