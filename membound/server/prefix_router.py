"""Routing for `serve --replicas`: the prefix index (a Ray actor) and Ray Serve request routers.

Each replica reports the chained block hashes its prefix cache holds as events (`+` cached, `-`
evicted, `reset`), taken from its `BlockPool` (server/replicas.py). The ingress computes a request's
own chain with `block_hash_chain` (the engine's `hash_block`, the same salt and block size), and the
router asks the index which replica holds the longest run of it. That replica gets the request unless
its queue exceeds the least-loaded one's by more than `imbalance_threshold`; otherwise (and with no
match) power of two choices on queue length. Imports ray: only `serve --replicas` loads this module.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from membound.engine.kv_cache import extend_block_hashes

log = logging.getLogger("membound")

RECENT_S = 1.0  # how long a routed request counts toward its replica's queue beside the cached length
INDEX_TIMEOUT_S = 1.0  # a match or queue probe slower than this routes by load instead (a dead index)


def block_hash_chain(token_ids: list[int], block_size: int, salt: bytes) -> list[bytes]:
    """The chained hashes of every full block of `token_ids`, as the engine's prefix cache names them
    (`Request.full_block_hashes`: `hash_block(parent, block, salt)` block after block)."""
    return extend_block_hashes([], token_ids, block_size, salt)


class PrefixIndex:
    """Which replica holds which block hash, fed by the replicas' events; routing counters; the
    replicas' latest metrics text. One per application, a named Ray actor (calls run one at a time)."""

    def __init__(self) -> None:
        self._holders: dict[bytes, set[str]] = {}  # block hash -> replicas holding it
        self._held: dict[str, set[bytes]] = {}  # replica -> its hashes (to forget a replica at once)
        self._metrics: dict[str, str] = {}
        self._routed: dict[tuple[str, str], int] = {}  # (replica, "prefix" | "load") -> requests
        self._matched: dict[str, int] = {}  # replica -> blocks matched by the requests routed to it
        self.num_events = 0

    def apply(self, replica: str, events: list[tuple[str, bytes | None]]) -> None:
        held = self._held.setdefault(replica, set())
        for kind, h in events:
            self.num_events += 1
            if kind == "+":
                held.add(h)
                self._holders.setdefault(h, set()).add(replica)
            elif kind == "-":
                held.discard(h)
                who = self._holders.get(h)
                if who is not None:
                    who.discard(replica)
                    if not who:
                        del self._holders[h]
            else:  # reset: the replica forgot its cache (sleep, a restart)
                self._forget_blocks(replica)

    def _forget_blocks(self, replica: str) -> None:
        for h in self._held.pop(replica, set()):
            who = self._holders.get(h)
            if who is not None:
                who.discard(replica)
                if not who:
                    del self._holders[h]

    def match(self, hashes: list[bytes], replicas: list[str]) -> dict[str, int]:
        """For each replica, how many leading blocks of `hashes` it holds."""
        result = dict.fromkeys(replicas, 0)
        alive = set(replicas)
        for k, h in enumerate(hashes):
            alive &= self._holders.get(h, set())
            if not alive:
                break
            for r in alive:
                result[r] = k + 1
        return result

    def prune(self, live: list[str]) -> None:
        """Forget replicas that are gone (died and replaced by Ray: a new replica has a new id)."""
        for r in set(self._held) - set(live):
            self._forget_blocks(r)
        for r in set(self._metrics) - set(live):
            del self._metrics[r]

    def routed(self, replica: str, kind: str, matched_blocks: int) -> None:
        self._routed[(replica, kind)] = self._routed.get((replica, kind), 0) + 1
        self._matched[replica] = self._matched.get(replica, 0) + matched_blocks

    def put_metrics(self, replica: str, text: str) -> None:
        self._metrics[replica] = text

    def snapshot(self) -> dict[str, Any]:
        return {
            "metrics": dict(self._metrics),
            "routed": dict(self._routed),
            "matched": dict(self._matched),
            "num_events": self.num_events,
            "num_hashes": len(self._holders),
        }


class MemboundRouter(RequestRouter):
    """Ray Serve's custom request router for the engine replicas: `policy` prefix (the default),
    pow2 (Serve's own choice, for comparison) or round-robin. Every request is matched to the replica
    it was chosen for (no FIFO mixin): a prefix choice must not be handed to another request."""

    def initialize_state(
        self, index_name: str = "", namespace: str = "", policy: str = "prefix", imbalance_threshold: int = 4, **_
    ) -> None:
        import ray

        self._index = ray.get_actor(index_name, namespace=namespace) if index_name else None
        self._policy = policy
        self._threshold = imbalance_threshold
        self._next = 0
        self._decisions: dict[str, tuple[str, dict[str, int]]] = {}  # request id -> (kind, matched blocks)
        # When each replica was sent its recent requests: Serve's queue-length cache does not see a
        # burst's requests yet, so without these a burst sharing one prefix piles onto one replica.
        self._recent: dict[str, collections.deque] = {}

    def update_replicas(self, replicas: list[RunningReplica]):
        out = super().update_replicas(replicas)
        if self._index is not None:
            self._index.prune.remote([r.replica_id.unique_id for r in replicas])
        return out

    async def _queue_lens(self, candidates: list[RunningReplica]) -> dict[ReplicaID, int]:
        lens: dict[ReplicaID, int] = {}
        unknown = []
        for r in candidates:
            q = self.replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if q is None:
                unknown.append(r)
            else:
                lens[r.replica_id] = q
        if unknown:
            for r, q in await self._probe_queue_lens(unknown, 0):
                if q is not None:
                    lens[r.replica_id] = q
        return lens

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        rid = pending_request.metadata.internal_request_id if pending_request is not None else None
        candidates = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if self._policy == "round-robin":
            self._next += 1
            return [[candidates[self._next % len(candidates)]]]
        hashes = pending_request.kwargs.get("block_hashes") if pending_request is not None else None
        # Serve retries a choice whose replicas are full: wait between tries, not a hot loop.
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        two = random.sample(candidates, min(2, len(candidates)))
        matched: dict[str, int] = {}
        lens: dict[ReplicaID, int] = {}
        if self._policy == "prefix" and hashes and self._index is not None and len(candidates) > 1:
            # An exception here would leave the request unrouted for good (Serve drops the routing
            # task): an index that is slow or gone only costs the prefix match.
            try:
                ids = [r.replica_id.unique_id for r in candidates]
                matched = await asyncio.wait_for(self._index.match.remote(hashes, ids), INDEX_TIMEOUT_S)
                if matched and max(matched.values()) > 0:
                    lens = await asyncio.wait_for(self._queue_lens(candidates), INDEX_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - RayActorError, timeouts: fall back to load
                log.warning("prefix index unavailable (%s: %s); routing by load", type(e).__name__, e)
                matched, lens = {}, {}
        if matched and max(matched.values()) > 0:
            if lens:
                now = time.monotonic()
                lens = {r.replica_id: lens[r.replica_id] + self._sent(r.replica_id.unique_id, now)
                        for r in candidates if r.replica_id in lens}  # fmt: skip
                lowest = min(lens.values())
                best_n = max(matched.values())
                best = [r for r in candidates if matched[r.replica_id.unique_id] == best_n and r.replica_id in lens]
                if best:
                    pick = min(best, key=lambda r: lens[r.replica_id])
                    if lens[pick.replica_id] - lowest > self._threshold:
                        # Past the threshold: the shortest queue as this router counts it.
                        kind, pick = "load", min(candidates, key=lambda r: lens.get(r.replica_id, lowest))
                    else:
                        kind = "prefix"
                    if rid is not None:
                        self._decisions[rid] = (kind, matched)
                    # Counted now, not when Serve sends it: the rest of a burst is being routed meanwhile.
                    self._recent.setdefault(pick.replica_id.unique_id, collections.deque()).append(now)
                    return [[pick], two]  # the pick first; if it is full, power of two
        if rid is not None:
            self._decisions[rid] = ("load", matched)
        return [two]  # Serve probes both and takes the shorter queue

    def _sent(self, replica: str, now: float) -> int:
        """Requests sent to `replica` in the last RECENT_S (maybe not yet in its cached queue length)."""
        q = self._recent.get(replica)
        while q and now - q[0] > RECENT_S:
            q.popleft()
        return len(q) if q else 0

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        kind, matched = self._decisions.pop(pending_request.metadata.internal_request_id, ("load", {}))
        if self._index is not None:
            self._index.routed.remote(replica_id.unique_id, kind, matched.get(replica_id.unique_id, 0))
