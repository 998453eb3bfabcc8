"""Prometheus metrics (names mirror vLLM's, prefixed `membound:`) and the periodic stats log line.

Everything here is fed from the engine thread, once per step; prometheus-client's
metric objects are thread-safe, and each server owns its registry (no global state). Every
metric carries a `model_name` label, as vLLM's do; several models in one server share the
registry (`MetricFamilies`), one `ServerMetrics` each.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from membound.engine.llm_engine import EngineStats
from membound.outputs import RequestMetrics, RequestOutput

log = logging.getLogger("membound.server")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_LATENCY_BUCKETS += (20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
_ITL_BUCKETS += (0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


_WAKE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class MetricFamilies:
    """The metric families of one registry, labelled by model_name: one server's, shared by its models."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        labels = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*labels, *extra], registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        self.ttft = hist("membound:time_to_first_token_seconds", "Time to first token (s).", _LATENCY_BUCKETS)
        self.itl = hist("membound:inter_token_latency_seconds", "Time between output tokens (s).", _ITL_BUCKETS)
        self.e2e = hist("membound:e2e_request_latency_seconds", "Arrival to finish (s).", _LATENCY_BUCKETS)
        self.queue = hist("membound:request_queue_time_seconds", "Arrival to first scheduled (s).", _LATENCY_BUCKETS)
        self.running = gauge("membound:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("membound:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("membound:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        self.prompt_tokens = counter("membound:prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("membound:generation_tokens", "Generated tokens.")
        self.prefix_queries = counter("membound:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("membound:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("membound:num_preemptions", "Requests preempted for lack of KV blocks.")
        self.steps = counter("membound:engine_steps", "Model steps launched.")
        self.steps_ahead = counter(
            "membound:engine_steps_launched_ahead", "Steps launched before the previous step's tokens reached the host."
        )
        # Speculative decoding, as vLLM names it.
        self.spec_drafts = counter("membound:spec_decode_num_drafts", "Drafting steps (a sequence's drafts verified).")
        self.spec_draft_tokens = counter("membound:spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.spec_accepted = counter("membound:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_per_pos = counter(
            "membound:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in the draft.",
            ("position",),
        )
        self.success = counter("membound:request_success", "Finished requests by reason.", ("finished_reason",))
        self.rejected = counter(
            "membound:request_rejected", "Requests refused before queueing, by reason.", ("reason",)
        )
        # Several models in one server (--max-loaded-models): a model beyond the limit sleeps.
        self.awake = gauge("membound:model_awake", "1 while the model's weights and KV cache are loaded, 0 asleep.")
        self.wake = hist("membound:model_wake_seconds", "Time to wake a sleeping model (s).", _WAKE_BUCKETS)
        self.sleep = hist("membound:model_sleep_seconds", "Time to put a model to sleep (s).", _WAKE_BUCKETS)


class ServerMetrics:
    """One model's metrics (its `model_name` label); several share a registry through `families`."""

    def __init__(
        self, model_name: str, registry: CollectorRegistry | None = None, families: MetricFamilies | None = None
    ) -> None:
        f = families or MetricFamilies(registry)
        self.families = f
        self.registry = f.registry
        m = model_name
        self.ttft, self.itl, self.e2e, self.queue = (h.labels(m) for h in (f.ttft, f.itl, f.e2e, f.queue))
        self.running, self.waiting, self.kv_usage = (g.labels(m) for g in (f.running, f.waiting, f.kv_usage))
        self.prompt_tokens = f.prompt_tokens.labels(m)
        self.generation_tokens = f.generation_tokens.labels(m)
        self.prefix_queries = f.prefix_queries.labels(m)
        self.prefix_hits = f.prefix_hits.labels(m)
        self.preemptions = f.preemptions.labels(m)
        self.steps = f.steps.labels(m)
        self.steps_ahead = f.steps_ahead.labels(m)
        self.spec_drafts = f.spec_drafts.labels(m)
        self.spec_draft_tokens = f.spec_draft_tokens.labels(m)
        self.spec_accepted = f.spec_accepted.labels(m)
        self._spec_per_pos = f.spec_per_pos
        self.finished = {reason: f.success.labels(m, reason) for reason in FINISH_REASONS}
        self.rejected = f.rejected
        self.awake, self.wake, self.sleep = f.awake.labels(m), f.wake.labels(m), f.sleep.labels(m)
        self.awake.set(1)
        self.model_name = model_name
        self._last_token_time: dict[str, float] = {}
        self._last_stats: EngineStats | None = None

    # ---------------------------------------------------------------- engine thread

    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            rid, m = out.request_id, out.metrics
            last = self._last_token_time.get(rid)
            if last is None:
                self.ttft.observe(now - m.arrival_time)
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                if m.first_scheduled_time is not None:
                    self.queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
            else:
                self.itl.observe(now - last)
            self.generation_tokens.inc(len(out.delta_token_ids))
            self._last_token_time[rid] = now
            if out.finished:
                self._finish(rid, out.outputs[0].finish_reason or "abort", m, now)

    def on_abort(self, request_id: str, metrics: RequestMetrics, now: float) -> None:
        self._finish(request_id, "abort", metrics, now)

    def _finish(self, request_id: str, reason: str, m: RequestMetrics, now: float) -> None:
        self._last_token_time.pop(request_id, None)
        self.e2e.observe(now - m.arrival_time)
        self.finished[reason if reason in self.finished else "abort"].inc()

    def on_stats(self, stats: EngineStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        prev = self._last_stats

        def delta(name: str) -> int:  # the engine's counters are cumulative
            return getattr(stats, name) - (getattr(prev, name) if prev is not None else 0)

        self.prefix_queries.inc(delta("prefix_cache_queries"))
        self.prefix_hits.inc(delta("prefix_cache_hits"))
        self.preemptions.inc(delta("num_preemptions"))
        self.steps.inc(delta("num_steps"))
        self.steps_ahead.inc(delta("num_steps_launched_ahead"))
        self.spec_drafts.inc(delta("spec_num_drafts"))
        self.spec_draft_tokens.inc(delta("spec_num_draft_tokens"))
        self.spec_accepted.inc(delta("spec_num_accepted_tokens"))
        before = prev.spec_accepted_per_pos if prev is not None else ()
        for j, n in enumerate(stats.spec_accepted_per_pos):
            d = n - (before[j] if j < len(before) else 0)
            if d:
                self._spec_per_pos.labels(self.model_name, str(j)).inc(d)
        self._last_stats = stats

    # ---------------------------------------------------------------- HTTP side

    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    # ---------------------------------------------------------------- sleep / wake

    def on_sleep(self, seconds: float) -> None:
        self.sleep.observe(seconds)
        self.awake.set(0)

    def on_wake(self, seconds: float) -> None:
        self.wake.observe(seconds)
        self.awake.set(1)


@dataclasses.dataclass
class StatsLogger:
    """One log line every `interval` seconds while the engine has work."""

    interval: float = 5.0
    prefix: str = ""  # several models in one server: whose line it is ("smol: ")
    _last_time: float = dataclasses.field(default_factory=time.monotonic)
    _last: EngineStats | None = None

    def maybe_log(self, stats: EngineStats, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        if self._last is None:
            self._last, self._last_time = stats, now
            return None
        dt = now - self._last_time
        if dt < self.interval:
            return None
        prev, self._last, self._last_time = self._last, stats, now
        prompt = stats.prompt_tokens_computed - prev.prompt_tokens_computed
        gen = stats.generation_tokens - prev.generation_tokens
        if prompt == 0 and gen == 0 and stats.num_running == 0 and stats.num_waiting == 0:
            return None  # idle: stay quiet
        queries = stats.prefix_cache_queries - prev.prefix_cache_queries
        hits = stats.prefix_cache_hits - prev.prefix_cache_hits
        line = (
            f"{self.prefix}prompt {prompt / dt:.1f} tok/s, generation {gen / dt:.1f} tok/s, "
            f"running {stats.num_running}, waiting {stats.num_waiting}, KV cache {stats.kv_usage:.1%}, "
            f"prefix cache hit rate {hits / queries if queries else 0.0:.1%}"
        )
        log.info(line)
        return line
