"""Continuous batching with chunked prefill and preemption by recompute.

Every step the scheduler spends a token budget (`max_num_batched_tokens`):
running decodes first (one token each, so a long prompt never stalls them), then
the running prompts that are part-way through prefill, then new requests from the
waiting queue, each prompt cut into chunks that fit what is left of the budget.
When the KV pool runs out, the most recently arrived running request is preempted:
its blocks are freed and it goes back to the front of the queue to be recomputed
later. Requests join and leave the batch at every step.

A step may be scheduled before the previous one's tokens reach the host (async scheduling):
a request's length is then `num_tokens + num_pending`, the sampled-but-unseen tokens, and
`num_computed_tokens` counts KV that launched steps write (it advances when a step is
scheduled, not when it finishes). The scheduler never needs a token's value, only how many
there are; a request the unseen token finishes costs one wasted row.
"""

from __future__ import annotations

import collections
import dataclasses

from membound.engine.block_pool import BlockPool
from membound.engine.kv_cache import blocks_needed
from membound.engine.request import Request, Status


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    # While sequences decode, a prompt takes at most this many tokens per step, so their
    # inter-token latency stays steady (0: no cap beyond the step budget).
    long_prefill_token_threshold: int = 0
    cache_salt: bytes = b""  # mixed into block hashes: whatever else changes the KV (model, LoRA)


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int  # the first position this step computes
    samples: bool  # the step computes the request's last token, so it samples the next one
    epoch: int  # the request's preemption count when scheduled: a preempted step commits nothing

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # single-token entries first
    num_decodes: int
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockPool) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens whose KV was found

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out and free its KV blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._free_blocks(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}
        preempted: list[Request] = []

        # Decodes first, then prompts already part-way through prefill.
        decodes, partial = [], []
        for req in self.running:
            left = req.num_tokens + req.num_pending - req.num_computed_tokens
            if left == 1:
                decodes.append(req)
            elif left > 1:
                partial.append(req)
            # left == 0: its last token is on its way (a step in flight finishes it)
        # A prompt beside decodes is fed in bounded chunks: it must not stretch their step.
        cap = self.config.long_prefill_token_threshold if decodes and self.config.enable_chunked_prefill else 0
        cap = cap if cap > 0 else budget
        for req in decodes + partial if partial else decodes:
            if budget == 0:
                break
            if req.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            left = req.num_tokens + req.num_pending - req.num_computed_tokens
            n = min(left, budget, cap)
            if n > 1:
                # A prompt mid-prefill takes the chunk that fits rather than evicting anyone.
                fits = (len(req.block_ids) + self.allocator.num_free) * self.config.block_size
                n = max(1, min(n, fits - req.num_computed_tokens))
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self._pick_victim(exclude=scheduled)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is Status.RUNNING:
                scheduled[req.request_id] = self._scheduled(req, n)
                budget -= n

        # New requests, unless memory was just short (they would only be preempted again).
        bs = self.config.block_size
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:
                break  # preempted with a token still on its way: recompute once it has arrived
            hits = self._cached_prefix(req)
            computed = len(hits) * bs
            remaining = req.num_tokens - computed
            n = min(remaining, budget, cap)
            # Without chunked prefill a prompt goes in whole; a preempted request's recompute
            # (prompt + output so far) may exceed the budget, so it is chunked regardless.
            if n < remaining and not self.config.enable_chunked_prefill and not req.num_preemptions:
                break
            need = blocks_needed(computed + n, bs) - len(hits)
            if need > self.allocator.num_free_after_taking(hits):
                break
            self.allocator.take(hits)
            req.block_ids = hits + self.allocator.allocate(need)
            req.num_cached_blocks = len(hits)  # already in the cache: nothing to register
            req.num_computed_tokens = computed
            if self.config.enable_prefix_caching:
                self.prefix_cache_queries += req.num_tokens
                self.prefix_cache_hits += computed
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            scheduled[req.request_id] = self._scheduled(req, n)
            budget -= n

        items = list(scheduled.values())
        if any(s.num_new_tokens > 1 for s in items):
            items.sort(key=lambda s: s.num_new_tokens > 1)
        num_decodes = sum(1 for s in items if s.num_new_tokens == 1)
        return SchedulerOutput(items, num_decodes, preempted)

    def _scheduled(self, req: Request, n: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        req.num_computed_tokens = start + n
        samples = req.num_computed_tokens == req.num_tokens + req.num_pending
        if samples:
            req.num_pending += 1
        return ScheduledRequest(req, n, start, samples, req.num_preemptions)

    def commit(self, sched: SchedulerOutput) -> None:
        """A step has run and its tokens are appended: offer the blocks it filled to the prefix cache."""
        if not self.config.enable_prefix_caching:
            return
        bs = self.config.block_size
        for s in sched.scheduled:
            req = s.request
            if req.status is not Status.RUNNING or s.epoch != req.num_preemptions:
                continue  # finished, aborted or preempted since: its blocks are gone
            # Only blocks whose tokens are all known and whose KV this step (or an earlier one) wrote.
            full = min(s.end, req.num_tokens) // bs
            if full > req.num_cached_blocks:
                hashes = req.full_block_hashes(bs, self.config.cache_salt)
                for i in range(req.num_cached_blocks, full):
                    self.allocator.register(req.block_ids[i], hashes[i])
                req.num_cached_blocks = full

    def _cached_prefix(self, req: Request) -> list[int]:
        """Cached blocks for the longest cached prefix, leaving at least one token to compute."""
        if not self.config.enable_prefix_caching or req.num_computed_tokens:
            return []
        hits = self.allocator.lookup(req.full_block_hashes(self.config.block_size, self.config.cache_salt))
        # The last token must run through the model so the request gets logits.
        return hits[: (req.num_tokens - 1) // self.config.block_size]

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make sure `req` owns blocks for `num_tokens` tokens; False if the pool is short."""
        need = blocks_needed(num_tokens, self.config.block_size) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        req.block_ids.extend(self.allocator.allocate(need))
        return True

    def _pick_victim(self, exclude: dict[str, ScheduledRequest]) -> Request:
        # The newest running request not yet scheduled this step loses its blocks.
        for req in reversed(self.running):
            if req.request_id not in exclude:
                return req
        raise RuntimeError("no request left to preempt")  # the pool holds max_model_len, so unreachable

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free_blocks(req)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _free_blocks(self, req: Request) -> None:
        if req.block_ids:
            self.allocator.free(req.block_ids)
            req.block_ids = []
        req.num_cached_blocks = 0
