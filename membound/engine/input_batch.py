"""The persistent input batch: per-slot rows on the device that live as long as their request.

A running request owns one slot. Its block-table row, sampling settings, penalty counts and
last sampled token stay on the device between steps; a step writes only what changed (a new
request's row, blocks added since the last step) and sends one small packed tensor of
per-token indices. Decode inputs are gathered on the device from the token pool the sampler
writes, so a step can be launched before the previous step's tokens reach the host.
"""

from __future__ import annotations

import dataclasses

import torch

from membound.attention.base import AttentionBackend, AttentionMetadata
from membound.engine.request import SAMPLES, SPECIAL, TRUNCATES, Request
from membound.engine.sampler import SamplingBatch, apply_penalties, logit_bias_rows
from membound.engine.scheduler import SchedulerOutput
from membound.engine.structured import token_bitmask
from membound.engine.transfer import to_device

PENDING = -1  # an input id the host does not know yet: the token pool has it


@dataclasses.dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # [S] index of the last token of each sampling row
    sample_slots: torch.Tensor  # [S] the slot of each sampling row (where its token goes)


class PenaltyRows:
    """Token counts of penalised requests, on the device, one row each; grows on demand up to one
    row per slot (the memory plan reserves that much on CUDA: `bytes_at_capacity`).

    Counts are set from the host once, when a request (re)enters the batch, and from then on
    bumped on the device by the sampled ids: penalties never need a token on the host."""

    def __init__(self, vocab_size: int, max_rows: int, device: torch.device) -> None:
        self.vocab_size, self.max_rows, self.device = vocab_size, max_rows, device
        self.counts = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)  # output occurrences
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # in prompt or output
        self.weights = torch.zeros(0, 3, dtype=torch.float32, device=device)  # repetition, presence, frequency
        self._row_of_slot: dict[int, int] = {}
        self._free: list[int] = []

    @staticmethod
    def bytes_at_capacity(vocab_size: int, max_rows: int) -> int:
        """Device bytes of a full table: fp32 counts and bool flags per token, 3 weights per row."""
        return max_rows * (vocab_size * 5 + 12)

    def row(self, slot: int) -> int | None:
        return self._row_of_slot.get(slot)

    def add(self, slot: int, req: Request) -> None:
        if not self._free:
            self._grow(min(self.max_rows, max(4, 2 * self.counts.shape[0])))
        row = self._free.pop()
        self._row_of_slot[slot] = row
        p = req.params
        n_prompt = len(req.prompt_token_ids)
        ids = to_device(req.token_ids, torch.int64, self.device)
        is_out = torch.arange(len(req.token_ids), device=self.device) >= n_prompt
        self.counts[row].zero_().index_add_(0, ids, is_out.float())
        self.seen[row].zero_()[ids] = True
        w = to_device([p.repetition_penalty, p.presence_penalty, p.frequency_penalty], torch.float32, self.device)
        self.weights[row].copy_(w)

    def release(self, slot: int) -> None:
        row = self._row_of_slot.pop(slot, None)
        if row is not None:
            self._free.append(row)

    def _grow(self, cap: int) -> None:
        old = self.counts.shape[0]
        for name in ("counts", "seen", "weights"):
            t = getattr(self, name)
            bigger = torch.zeros(cap, *t.shape[1:], dtype=t.dtype, device=self.device)
            bigger[:old] = t
            setattr(self, name, bigger)
        self._free.extend(range(cap - 1, old - 1, -1))


@dataclasses.dataclass
class StepPenalties:
    """The penalised rows of one step's sampling batch: applied before the draw, bumped after."""

    store: PenaltyRows
    rows: torch.Tensor  # [P] sampling rows with penalties
    prows: torch.Tensor  # [P] their rows in the store

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.store
        w = s.weights[self.prows]
        sub = apply_penalties(
            logits[self.rows], s.seen[self.prows], s.counts[self.prows], w[:, 0:1], w[:, 1:2], w[:, 2:3]
        )
        return logits.index_copy(0, self.rows, sub)

    def record(self, ids: torch.Tensor) -> None:
        s, tok = self.store, ids[self.rows]
        s.counts.index_put_((self.prows, tok), torch.ones_like(tok, dtype=torch.float32), accumulate=True)
        s.seen.index_put_((self.prows, tok), torch.ones_like(tok, dtype=torch.bool))


class InputBatch:
    def __init__(
        self,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        vocab_size: int,
        device: torch.device,
        backend: AttentionBackend,
    ) -> None:
        self.backend = backend  # prepares the attention metadata from this batch's tensors
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.vocab_size = vocab_size
        self.device = device
        self.max_blocks = -(-max_model_len // block_size)
        self.block_table = torch.zeros(max_num_seqs, self.max_blocks, dtype=torch.int32, device=device)
        self.token_pool = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self.arange = torch.arange(max_num_seqs + 1, dtype=torch.int64, device=device)
        # temperature, top_p, min_p (fp32) and top_k (int64) per slot
        self.float_params = torch.ones(max_num_seqs, 3, dtype=torch.float32, device=device)
        self.top_k = torch.full((max_num_seqs,), vocab_size, dtype=torch.int64, device=device)
        self.penalties = PenaltyRows(vocab_size, max_num_seqs, device)
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self._synced_blocks = [0] * max_num_seqs  # block-table entries written per slot

    def release(self, req: Request) -> None:
        """The request left the batch (finished, aborted, preempted): its slot is free again.
        A step in flight may still write its old row; a new owner's writes come after it in
        stream order."""
        slot = req.slot
        if slot is None:
            return
        req.slot = None
        self.penalties.release(slot)
        self._free_slots.append(slot)

    def blocks_trimmed(self, req: Request) -> None:
        """The request gave blocks back from its tail (rejected drafts): entries written past its
        table's new end are rewritten when it grows again."""
        if req.slot is not None:
            self._synced_blocks[req.slot] = min(self._synced_blocks[req.slot], len(req.block_ids))

    def _admit(self, req: Request, new_params: list) -> int:
        slot = self._free_slots.pop()
        req.slot = slot
        self._synced_blocks[slot] = 0
        req.set_sampling_flags(self.vocab_size)
        p = req.params
        new_params.append((slot, p.temperature, p.top_p, p.min_p, p.top_k if p.top_k > 0 else self.vocab_size))
        if p.uses_penalties:
            self.penalties.add(slot, req)
        return slot

    def prepare(self, sched: SchedulerOutput) -> tuple[ModelInputs, SamplingBatch | None, list[Request]]:
        """Apply what changed since the last step and build this step's inputs.

        Returns the model inputs, the sampling batch (None when nothing samples) and the
        requests behind the sampling rows, in order."""
        bs = self.block_size
        scheduled = sched.scheduled
        nd = sched.num_decodes
        table_idx: list[int] = []
        table_val: list[int] = []
        new_params: list = []
        synced = self._synced_blocks
        for s in scheduled:  # what changed: new requests, blocks added since the last step
            req = s.request
            slot = req.slot
            if slot is None:
                slot = self._admit(req, new_params)
            blocks = req.block_ids
            if len(blocks) > synced[slot]:  # only the entries added since the last step travel
                base = slot * self.max_blocks
                table_idx.extend(range(base + synced[slot], base + len(blocks)))
                table_val.extend(blocks[synced[slot] :])
                synced[slot] = len(blocks)
        # Single-token rows (decodes) first, as list comprehensions: the common case at a large batch.
        dec = scheduled[:nd]
        dec_reqs = [s.request for s in dec]
        positions = [s.start for s in dec]
        ids = [
            r.token_ids[p] if p < len(r.token_ids) else PENDING  # PENDING: a launched step sampled it
            for r, p in zip(dec_reqs, positions, strict=True)
        ]
        row_slots = [r.slot for r in dec_reqs]
        token_slots = list(row_slots)
        seq_lens = [p + 1 for p in positions]
        starts = list(range(nd + 1))
        width = max((len(r.block_ids) for r in dec_reqs), default=0)
        samples = [s.samples for s in dec]
        for s in scheduled[nd:]:  # prefill chunks (and decodes with drafts): few rows, many tokens
            req, start, end = s.request, s.start, s.end
            known = req.num_tokens
            ids.extend(req.token_ids[start : min(end, known)])
            if s.num_spec:  # the last token, then the drafts to verify
                ids.extend(req.spec_token_ids[: s.num_spec])
            elif end > known:  # the chunk ends on the token a launched step sampled
                ids.extend([PENDING] * (end - max(start, known)))
            positions.extend(range(start, end))
            token_slots.extend([req.slot] * (end - start))
            seq_lens.append(end)
            starts.append(starts[-1] + end - start)
            row_slots.append(req.slot)
            width = max(width, len(req.block_ids))
            samples.append(s.samples)
        spec: list[tuple[int, int]] = []  # (first sampling row, drafts) of each entry verifying drafts
        if sched.num_spec_tokens:
            sampling, logits_rows, sample_slots = [], [], []
            for i, s in enumerate(scheduled):
                if not s.samples:
                    continue
                if s.num_spec:  # every row scores: the drafts' and the one after them
                    spec.append((len(sampling), s.num_spec))
                n = 1 + s.num_spec
                sampling += [s.request] * n
                logits_rows += range(starts[i + 1] - n, starts[i + 1])
                sample_slots += [row_slots[i]] * n
        elif all(samples):
            sampling = [s.request for s in scheduled]
            logits_rows = [x - 1 for x in starts[1:]]
            sample_slots = row_slots
        else:
            rows = [i for i, x in enumerate(samples) if x]
            sampling = [scheduled[i].request for i in rows]
            logits_rows = [starts[i + 1] - 1 for i in rows]
            sample_slots = [row_slots[i] for i in rows]
        dev = self.device
        if table_idx:
            t = to_device([table_idx, table_val], torch.int64, dev)
            self.block_table.view(-1).index_copy_(0, t[0], t[1].to(torch.int32))
        if new_params:
            p = to_device(new_params, torch.float32, dev)
            slots = p[:, 0].long()
            self.float_params.index_copy_(0, slots, p[:, 1:4].contiguous())
            self.top_k.index_copy_(0, slots, p[:, 4].long())
        t_len, b, n_s = len(ids), len(seq_lens), len(logits_rows)
        if nd == b and n_s == b:
            # Pure decode: one token and one sampling row per sequence; send ids, positions and
            # slots, derive the rest (the common step at a large batch: a third of the upload).
            packed = to_device(ids + positions + row_slots, torch.int64, dev)
            raw_ids, pos, rslots = packed[:b], packed[b : 2 * b], packed[2 * b :]
            tok_slot = sslots = rslots
            lens = pos + 1
            qsl, lrows = self.arange[: b + 1], self.arange[:b]
        else:
            packed = to_device(
                ids + positions + token_slots + seq_lens + starts + row_slots + logits_rows + sample_slots,
                torch.int64,
                dev,
            )
            o = 0

            def take(n: int) -> torch.Tensor:
                nonlocal o
                o += n
                return packed[o - n : o]

            raw_ids, pos, tok_slot = take(t_len), take(t_len), take(t_len)
            lens, qsl, rslots, lrows, sslots = take(b), take(b + 1), take(b), take(n_s), take(n_s)
        # Gather from the token pool only when a launched step holds some input (async scheduling).
        input_ids = torch.where(raw_ids == PENDING, self.token_pool[tok_slot], raw_ids) if PENDING in ids else raw_ids
        slot_mapping = self.block_table[tok_slot, pos // bs].long() * bs + pos % bs
        meta = self.backend.prepare_metadata(
            slot_mapping=slot_mapping,
            block_tables=self.block_table[rslots, :width],
            seq_lens=lens.to(torch.int32),
            query_start_loc=qsl.to(torch.int32),
            num_decodes=sched.num_decodes,
            seq_lens_host=tuple(seq_lens),
            query_start_loc_host=tuple(starts),
        )
        inputs = ModelInputs(input_ids, pos, meta, lrows, sslots)
        batch = self._sampling_batch(sampling, sslots) if sampling else None
        if batch is not None and spec:
            batch.spec = tuple(spec)
        return inputs, batch, sampling

    def _sampling_batch(self, reqs: list[Request], slots: torch.Tensor) -> SamplingBatch:
        flags = [r.sampling_flags for r in reqs]  # computed once per request (Request.sampling_flags)
        greedy = not any(f & SAMPLES for f in flags)
        trunc = any(f & TRUNCATES for f in flags)
        special = [i for i, f in enumerate(flags) if f & SPECIAL]
        params = [r.params for r in reqs]
        asked = [params[i].logprobs for i in special if params[i].logprobs is not None]
        generators = [reqs[i].generator for i in special]
        generators = [r.generator for r in reqs] if any(g is not None for g in generators) else []
        pen_rows, pen_prows, banned_rows, banned_ids = [], [], [], []
        for i in special:
            r = reqs[i]
            p = r.params
            if p.uses_penalties:
                pen_rows.append(i)
                pen_prows.append(self.penalties.row(r.slot))
            if p.min_tokens:
                # Outputs before this draw: those appended plus the earlier ones still on their way.
                if r.num_output_tokens + r.num_pending - 1 < p.min_tokens:
                    for tok in (*r.eos_token_ids, *p.stop_token_ids):
                        if tok < self.vocab_size:
                            banned_rows.append(i)
                            banned_ids.append(tok)
        dev = self.device
        fp = self.float_params[slots]
        penalties = None
        if pen_rows:
            t = to_device([pen_rows, pen_prows], torch.int64, dev)
            penalties = StepPenalties(self.penalties, t[0], t[1])
        banned = None
        if banned_rows:
            t = to_device([banned_rows, banned_ids], torch.int64, dev)
            banned = (t[0], t[1])
        bias = logit_bias_rows(params, [i for i in special if params[i].logit_bias], self.vocab_size, dev)
        constrained = [i for i in special if reqs[i].grammar is not None]
        grammar = (to_device(constrained, torch.int64, dev), None) if constrained else None
        return SamplingBatch(
            params=params,
            generators=generators,
            temperature=fp[:, 0],
            top_k=self.top_k[slots],
            top_p=fp[:, 1],
            min_p=fp[:, 2],
            all_greedy=greedy,
            needs_truncation=trunc,
            max_logprobs=max(asked) if asked else None,
            penalties=penalties,
            banned=banned,
            bias=bias,
            grammar=grammar,
            constrained=tuple(constrained),
        )

    def fill_grammar_mask(self, batch: SamplingBatch, reqs: list[Request]) -> None:
        """The constrained rows' token bitmask from their matchers as they are now: filled just before
        sampling, so the tokens of the step before (processed meanwhile) are in. A request that has
        finished since leaves its row unmasked (the row is wasted either way)."""
        if batch.grammar is None:
            return
        rows, _ = batch.grammar
        matchers = [None if reqs[i].is_finished else reqs[i].grammar for i in batch.constrained]
        batch.grammar = (rows, token_bitmask(matchers, self.vocab_size).to(self.device))

    def write_tokens(self, slots: torch.Tensor, ids: torch.Tensor) -> None:
        """The sampler's ids go to their slots: the next step's decode inputs."""
        self.token_pool.index_copy_(0, slots, ids)
