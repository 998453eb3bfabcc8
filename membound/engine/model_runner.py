"""Runs one scheduled step: updates the persistent input batch, runs the model, samples.

Host work per step: one packed index tensor goes to the device (plus what changed: new
block-table entries, a new request's settings); the sampled ids go straight into the
device token pool, and (with logprobs when asked) to the host in one non-blocking copy
into pinned memory. Logits are computed only for the rows that sample. Pure decode steps
replay a CUDA graph when the builder captured them.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from membound.engine.cuda_graphs import DecodeGraphs
from membound.engine.input_batch import InputBatch
from membound.engine.kv_cache import storage_bytes, unique_storages
from membound.engine.request import Request
from membound.engine.sampler import (
    SamplerOutput,
    SamplingBatch,
    sample_on_device,
    score_tokens,
    unpack,
    verify_on_device,
)
from membound.engine.scheduler import SchedulerOutput
from membound.engine.transfer import to_device
from membound.model.llama import LlamaForCausalLM
from membound.outputs import position_logprobs


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
    pending: tuple[torch.Tensor, torch.cuda.Event | None] | None
    prepare_s: float = 0.0  # host time building the inputs
    launch_s: float = 0.0  # forward + sampling: launch time on CUDA, compute time on CPU
    rows_done: int = 0  # sampling rows the core has processed (the rest are abandoned if it fails)


@dataclasses.dataclass
class ForwardStep:
    """A step whose forward pass is queued and whose sampling is not (`ModelRunner.launch_sampling`)."""

    sched: SchedulerOutput
    sampling: list[Request]
    batch: SamplingBatch | None
    sample_slots: torch.Tensor
    hidden: torch.Tensor  # the sampling rows' last hidden states
    row_inputs: torch.Tensor | None  # the sampling rows' input tokens, where drafts are verified
    prepare_s: float = 0.0
    launch_s: float = 0.0
    rows_done: int = 0  # (none: if the step is abandoned here, every row is)


class ModelRunner:
    """Scheduler output -> input batch -> forward (eager, or a CUDA-graph replay) -> sampling."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, ...]],
        input_batch: InputBatch,
        device: torch.device,
        seed: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.input_batch = input_batch
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.copier = HostCopier(device)
        self.graphs: DecodeGraphs | None = None  # set by the builder when decode steps are padded/captured

    def launch(self, sched: SchedulerOutput) -> LaunchedStep:
        """Queue the step's forward pass and sampling on the device, and the copy of the result.
        Never waits for the device: the step may be launched while the previous one runs."""
        return self.launch_sampling(self.launch_forward(sched))

    @torch.inference_mode()
    def launch_forward(self, sched: SchedulerOutput) -> ForwardStep:
        """The first half of `launch`: inputs and the forward pass queued, nothing sampled yet. The
        core processes the previous step before the second half when a grammar needs its tokens
        (the matchers advance and the masks fill on the host while the device runs this forward)."""
        t0 = time.perf_counter()
        inputs, batch, sampling = self.input_batch.prepare(sched)
        t1 = time.perf_counter()
        g = self.graphs
        meta = inputs.meta
        if batch is None:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)
            self._prompt_logprobs(sched, hidden, meta.query_start_loc_host)
        elif g is not None and meta.num_decodes == meta.num_seqs == len(sampling) and len(sampling) <= g.max_batch:
            hidden = g.run(inputs)  # every row samples: no row selection
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)
            self._prompt_logprobs(sched, hidden, meta.query_start_loc_host)
            hidden = hidden[inputs.logits_rows]
        # Verification reads each scoring row's input: the drafts.
        row_inputs = inputs.input_ids[inputs.logits_rows] if batch is not None and batch.spec else None
        return ForwardStep(
            sched, sampling, batch, inputs.sample_slots, hidden, row_inputs, t1 - t0, time.perf_counter() - t1
        )

    @torch.inference_mode()
    def launch_sampling(self, fwd: ForwardStep) -> LaunchedStep:
        """The second half of `launch`: grammar masks from the matchers as they are now, sampling,
        the ids into the token pool and their copy to the host."""
        t0 = time.perf_counter()
        batch = fwd.batch
        if batch is None:
            return LaunchedStep(fwd.sched, [], None, None, fwd.prepare_s, fwd.launch_s)
        self.input_batch.fill_grammar_mask(batch, fwd.sampling)
        logits = self.model.compute_logits(fwd.hidden)
        result = sample_on_device(logits, batch, self.generator)
        if batch.spec:  # drafts verified: their rows hold what is emitted, a last column how many
            tokens, emitted = verify_on_device(logits, fwd.row_inputs, batch, self.generator)
            rows = [r + j for r, k in batch.spec for j in range(k + 1)]
            spec_rows = torch.zeros_like(tokens, dtype=torch.bool)
            spec_rows[to_device(rows, torch.int64, tokens.device)] = True  # one upload, not a write per sequence
            if result.dim() == 1:
                result = torch.stack([torch.where(spec_rows, tokens, result), emitted], dim=1)
            else:  # logprobs: each verification row reports the token it emits (its top-k stands)
                chosen, rank, _, _ = score_tokens(logits, tokens, 0)
                result[:, 0] = torch.where(spec_rows, tokens.float(), result[:, 0])
                result[:, 1] = torch.where(spec_rows, chosen, result[:, 1])
                result[:, 2] = torch.where(spec_rows, rank.float(), result[:, 2])
                result = torch.cat([result, emitted.float()[:, None]], dim=1)
        ids = result if result.dim() == 1 else result[:, 0].long()
        self.input_batch.write_tokens(fwd.sample_slots, ids)
        pending = self.copier.start(result)
        launch_s = fwd.launch_s + time.perf_counter() - t0
        return LaunchedStep(fwd.sched, fwd.sampling, batch, pending, fwd.prepare_s, launch_s)

    def _prompt_logprobs(self, sched: SchedulerOutput, hidden: torch.Tensor, starts: tuple[int, ...]) -> None:
        """For prefill chunks of requests that asked for prompt logprobs: each row's logits score the
        next prompt token (row p, token p + 1), appended to the request's list. Synchronous (a copy to
        the host), as only scoring requests pay it. Rows already scored (a recompute after preemption)
        are skipped."""
        # Every entry: a 1-token prompt chunk is scheduled among the decodes.
        for i, s in enumerate(sched.scheduled):
            req = s.request
            if not req.needs_prompt_logprobs:
                continue
            lo = len(req.prompt_logprobs) - 1  # the first position whose next token has no entry yet
            hi = min(s.end, len(req.prompt_token_ids) - 1)
            if hi <= lo:
                continue  # a recompute's rows past the scored ones, or the last prompt row
            if lo < s.start:  # every chunk scores its rows: a gap would mean one was skipped
                raise RuntimeError(f"prompt logprobs of {req.request_id} missed positions {lo}..{s.start - 1}")
            n = req.params.prompt_logprobs
            # In slices: a whole chunk's fp32 logits (2,048 rows x a 128k vocabulary: 1 GiB) are not
            # in the memory plan; max_num_seqs rows of them are (the sampling rows').
            step = max(1, self.input_batch.max_num_seqs)
            for a in range(lo, hi, step):
                b = min(hi, a + step)
                rows = slice(starts[i] + a - s.start, starts[i] + b - s.start)
                targets = torch.tensor(req.prompt_token_ids[a + 1 : b + 1], device=hidden.device)
                scored = score_tokens(self.model.compute_logits(hidden[rows]), targets, n)
                chosen, rank, top_vals, top_ids = (x.tolist() for x in scored)
                for j, tok in enumerate(req.prompt_token_ids[a + 1 : b + 1]):
                    req.prompt_logprobs.append(
                        position_logprobs(tok, chosen[j], rank[j], top_ids[j], top_vals[j], req.token_text)
                    )

    def fetch(self, step: LaunchedStep) -> SamplerOutput | None:
        """Wait for the step's result on the host."""
        if step.pending is None:
            return None
        return unpack(self.copier.wait(step.pending), step.batch)


# ---------------------------------------------------------------------- sleep / wake (LLMEngine.sleep)


def module_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor a model's modules hold: parameters, buffers, and plain tensor attributes (or
    lists, tuples and dicts of them), as packed layers keep some."""
    out: list[torch.Tensor] = []

    def add(v) -> None:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, list | tuple):
            for x in v:
                add(x)
        elif isinstance(v, dict):
            for x in v.values():
                add(x)

    for m in model.modules():
        for name, v in vars(m).items():
            if name != "_modules":
                add(v)
    return out


@dataclasses.dataclass
class OffloadedWeights:
    """A model's device storages, emptied, and the host copies that refill them (`reload_weights`)."""

    storages: list[torch.UntypedStorage]
    host: list[torch.Tensor]  # uint8, pinned where CUDA is; kept for the next sleep

    @property
    def nbytes(self) -> int:
        return sum(h.numel() for h in self.host)


def offload_weights(model: torch.nn.Module, device: torch.device, reuse: OffloadedWeights | None = None):
    """Copy the model's `device` storages to host memory (pinned where CUDA is) and free them; every
    tensor and view stays valid, pointing at no memory until `reload_weights`. `reuse`: an earlier
    offload's host buffers, used again where the sizes match. Storages that cannot be resized (memory
    mapped from a file) stay where they are."""
    storages = [s for s in unique_storages(module_tensors(model)) if s.device.type == device.type and s.resizable()]
    old = reuse.host if reuse is not None else []
    host = []
    pin = torch.cuda.is_available()
    for i, s in enumerate(storages):
        n = s.nbytes()
        buf = old[i] if i < len(old) and old[i].numel() == n else torch.empty(n, dtype=torch.uint8, pin_memory=pin)
        buf.copy_(storage_bytes(s))
        host.append(buf)
    for s in storages:
        s.resize_(0)
    return OffloadedWeights(storages, host)


def reload_weights(w: OffloadedWeights) -> None:
    """Memory for the offloaded storages again, refilled from the host copies (in the current
    stream's order; the caller synchronizes before anything else reads them from another stream)."""
    for s, h in zip(w.storages, w.host, strict=True):
        s.resize_(h.numel())
        storage_bytes(s).copy_(h, non_blocking=h.is_pinned())
