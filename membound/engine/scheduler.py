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


@dataclasses.dataclass(slots=True)  # not frozen: frozen __init__ costs ~1 us a row, 256 rows a step
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int  # the first position this step computes
    samples: bool  # the step computes the request's last token, so it samples the next one
    epoch: int  # the request's preemption count when scheduled: a preempted step commits nothing
    num_spec: int = 0  # draft tokens after its last token (`Request.spec_token_ids`), verified this step

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # single-token entries first
    num_decodes: int
    preempted: list[Request]
    fills_blocks: list[ScheduledRequest] = dataclasses.field(default_factory=list)  # entries that fill a block
    num_tokens: int = 0  # tokens computed this step
    num_decode_tokens: int = 0  # of those, decodes of running requests, drafts included (the rest: prompts, recomputes)
    num_spec_tokens: int = 0  # draft tokens verified this step


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockPool) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order
        self._left_running = 0  # finished or aborted requests still in `running`, dropped at the next schedule
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens whose KV was found

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def num_running(self) -> int:
        return len(self.running) - self._left_running

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or len(self.running) > self._left_running

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out and free its KV blocks (its status must already
        be FINISHED or about to be: a running request is dropped from `running` lazily, so that
        many finishing in one step cost one pass, not one scan each)."""
        if request.in_running:
            request.in_running = False
            self._left_running += 1
        elif request in self.waiting:
            self.waiting.remove(request)
        self._free_blocks(request)

    def _compact(self) -> None:
        if self._left_running:
            self.running = [r for r in self.running if r.in_running]
            self._left_running = 0

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        bs = self.config.block_size
        scheduled: dict[str, ScheduledRequest] = {}
        preempted: list[Request] = []

        # Decodes first, then prompts already part-way through prefill.
        self._compact()
        decodes, partial = [], []
        for req in self.running:
            left = len(req.token_ids) + req.num_pending - req.num_computed_tokens
            if left == 1 and req.prefilled:
                if req.num_output_tokens + req.num_pending < req.max_output:
                    decodes.append(req)
                # else: the token on its way is its last; a row for it would be wasted
            elif left >= 1:
                partial.append(req)  # prompt (or recompute) tokens, the last one included
            # left == 0: its last token is on its way (a step in flight finishes it)
        running = Status.RUNNING
        any_spec = False
        later = len(decodes)  # decodes after this one: each keeps its one token of the budget
        for req in decodes:  # the common case, kept lean: 256 of these a step
            later -= 1
            if budget == 0:
                break
            if req.status is not running:
                continue  # preempted earlier in this loop
            c = req.num_computed_tokens
            k = len(req.spec_token_ids)
            if k:  # drafts ride with the last token in what is left of the budget and of free blocks:
                # they never take another sequence's token, nor preempt anyone
                room = (len(req.block_ids) + self.allocator.num_free) * bs - (c + 1)
                k = max(0, min(k, budget - 1 - later, room))
                del req.spec_token_ids[k:]
                any_spec = any_spec or k > 0
            if c + 1 + k > len(req.block_ids) * bs and not self._grow_or_preempt(req, c + 1 + k, scheduled, preempted):
                continue  # preempted itself
            req.num_computed_tokens = c + 1 + k  # the drafts' KV too; verification rolls back what it rejects
            req.num_pending += 1  # a decode always samples
            scheduled[req.request_id] = ScheduledRequest(req, 1 + k, c, True, req.num_preemptions, k)
            budget -= 1 + k
        num_decode_tokens = self.config.max_num_batched_tokens - budget
        # Prompts beside decodes are fed in bounded chunks: together they get at most `cap` tokens
        # a step, so they do not stretch the decodes' step.
        cap = self.config.long_prefill_token_threshold if decodes and self.config.enable_chunked_prefill else 0
        cap = cap if cap > 0 else budget
        for req in partial:
            if budget == 0 or cap == 0:
                break
            if req.status is not running:
                continue  # preempted earlier in this loop
            left = len(req.token_ids) + req.num_pending - req.num_computed_tokens
            # A prompt mid-prefill takes the chunk that fits rather than evicting anyone.
            fits = (len(req.block_ids) + self.allocator.num_free) * bs
            n = max(1, min(left, budget, cap, fits - req.num_computed_tokens))
            if self._grow_or_preempt(req, req.num_computed_tokens + n, scheduled, preempted):
                scheduled[req.request_id] = self._scheduled(req, n)
                budget -= n
                cap -= n

        # New requests, unless memory was just short (they would only be preempted again).
        while self.waiting and min(budget, cap) > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
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
            req.in_running = True
            scheduled[req.request_id] = self._scheduled(req, n)
            budget -= n
            cap -= n

        items = list(scheduled.values())
        num_decodes = len(items)
        if any(s.num_new_tokens > 1 for s in items):
            items.sort(key=lambda s: s.num_new_tokens > 1)
            num_decodes = sum(1 for s in items if s.num_new_tokens == 1)
        fills = []
        if self.config.enable_prefix_caching:
            fills = [s for s in items if s.end // bs > s.request.num_cached_blocks]
        total = self.config.max_num_batched_tokens - budget
        num_spec = sum(s.num_spec for s in items) if any_spec else 0
        return SchedulerOutput(items, num_decodes, preempted, fills, total, num_decode_tokens, num_spec)

    def _scheduled(self, req: Request, n: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        req.num_computed_tokens = start + n
        samples = req.num_computed_tokens == req.num_tokens + req.num_pending
        if samples:
            req.num_pending += 1
            req.prefilled = True  # from now on it decodes
        return ScheduledRequest(req, n, start, samples, req.num_preemptions)

    def rollback(self, req: Request, rejected: int) -> None:
        """Verification kept all but `rejected` of a step's drafts: their KV slots are free to be
        overwritten, and blocks past what the known tokens need go back to the pool."""
        req.num_computed_tokens -= rejected
        keep = blocks_needed(req.num_tokens, self.config.block_size)
        if len(req.block_ids) > keep:
            self.allocator.free(req.block_ids[keep:])
            del req.block_ids[keep:]

    def commit(self, sched: SchedulerOutput) -> None:
        """A step has run and its tokens are appended: offer the blocks it filled to the prefix cache."""
        if not self.config.enable_prefix_caching:
            return
        bs = self.config.block_size
        for s in sched.fills_blocks:
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
        if not self.config.enable_prefix_caching or req.num_computed_tokens or req.needs_prompt_logprobs:
            return []  # (prompt logprobs need every prompt row run through the model)
        hits = self.allocator.lookup(req.full_block_hashes(self.config.block_size, self.config.cache_salt))
        # The last token must run through the model so the request gets logits.
        return hits[: (req.num_tokens - 1) // self.config.block_size]

    def _grow_or_preempt(
        self, req: Request, num_tokens: int, scheduled: dict[str, ScheduledRequest], preempted: list[Request]
    ) -> bool:
        """Blocks for `num_tokens` tokens of `req`, preempting the newest unscheduled requests while
        the pool is short; False if `req` itself had to go."""
        while not self._grow(req, num_tokens):
            victim = self._pick_victim(exclude=scheduled)
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        return True

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
            if req.in_running and req.request_id not in exclude:
                return req
        raise RuntimeError("no request left to preempt")  # the pool holds max_model_len, so unreachable

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        req.in_running = False
        req.prefilled = False
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
