"""The engine core: add, abort, step. Schedule -> launch -> process the previous step's tokens.

With async scheduling a step is launched before the previous step's tokens reach the host,
always: the scheduler plans for one more token per sampling request, decode inputs come from
the device token pool, penalties are counted on the device. The host then waits for the
previous step, appends its tokens (a request they finished leaves a wasted row in the step
just launched) and hands out the outputs. Without it, each step is processed right away.
"""

from __future__ import annotations

import dataclasses
import time

from membound.cpu import ThreadGovernor
from membound.engine.input_batch import InputBatch
from membound.engine.model_runner import ForwardStep, LaunchedStep, ModelRunner
from membound.engine.output import append_token, fail, make_output
from membound.engine.request import Request
from membound.engine.scheduler import Scheduler
from membound.engine.speculator import NgramSpeculator
from membound.outputs import RequestOutput, position_logprobs


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """Where one `step()` spent its time (seconds). Host time is everything but `wait`
    (and, on CPU, `launch`, which is the model itself there)."""

    schedule: float = 0.0
    prepare: float = 0.0  # input batch update and upload
    launch: float = 0.0  # forward + sampling calls
    wait: float = 0.0  # for the processed step's result
    output: float = 0.0  # append, detokenize, stop checks, RequestOutputs

    @property
    def host(self) -> float:
        return self.schedule + self.prepare + self.output


class EngineCore:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        input_batch: InputBatch,
        async_scheduling: bool,
        threads: ThreadGovernor | None = None,
        speculator: NgramSpeculator | None = None,
    ):
        self.scheduler = scheduler
        self.threads = threads  # CPU: the intra-op thread count, revisited between steps
        self.runner = runner
        self.input_batch = input_batch
        self.async_scheduling = async_scheduling
        self.speculator = speculator  # drafts for the next step (speculative decoding), or None
        self.requests: dict[str, Request] = {}
        self._inflight: LaunchedStep | None = None
        self.last_timing = StepTiming()
        self._wait = 0.0  # this step's time waiting for results (`_finish`)
        self.num_steps = 0
        self.num_steps_launched_ahead = 0  # launched while the previous step's result was not in
        self.prompt_tokens_computed = 0
        self.generation_tokens = 0

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self._release(req)
        req.finish("abort")
        return req

    def has_unfinished(self) -> bool:
        # A step still in flight once every request finished holds only wasted rows: the next
        # step() processes it, whenever that comes.
        return self.scheduler.has_unfinished()

    @property
    def step_in_flight(self) -> bool:
        return self._inflight is not None

    def drain(self) -> list[RequestOutput]:
        """Process the step still in flight, if any (with every request finished it holds only
        wasted rows): nothing is left on the device for this engine afterwards."""
        if self._inflight is None:
            return []
        done, self._inflight = self._inflight, None
        return self._finish(done)

    def step(self) -> list[RequestOutput]:
        early: list[RequestOutput] = []
        early_s = 0.0  # processing the step in flight before this one samples (grammars under launch-ahead)
        self._wait = 0.0
        sync = not self.async_scheduling
        if sync and self._inflight is not None:
            done, self._inflight = self._inflight, None
            early = self._finish(done)
        t0 = time.perf_counter()
        if self.speculator is not None:
            self.speculator.propose(self.requests.values())  # (contained per request inside)
        sched = self.scheduler.schedule()
        for victim in sched.preempted:
            self.input_batch.release(victim)
        t1 = time.perf_counter()
        launched = None
        if sched.scheduled:
            if self.threads is not None:
                self.threads.tick()
            now = time.time()
            for s in sched.scheduled:
                if s.request.metrics.first_scheduled_time is None:
                    s.request.metrics.first_scheduled_time = now
            ahead = self._inflight is not None
            fwd = self.runner.launch_forward(sched)
            if ahead and fwd.batch is not None and fwd.batch.constrained:
                # A grammar's mask needs the token the step in flight is sampling: that step is
                # processed now, while the device runs this forward, and the masks fill after it.
                done, self._inflight = self._inflight, None
                e0 = time.perf_counter()
                try:
                    early += self._finish(done)
                    early_s += time.perf_counter() - e0  # its wait is in self._wait, the rest is output
                except BaseException:
                    self._abandon(fwd, RuntimeError("the step before it failed"))
                    raise
            launched = self.runner.launch_sampling(fwd)
            self.num_steps += 1
            self.num_steps_launched_ahead += ahead
        prev, self._inflight = self._inflight, (launched if not sync else None)
        t2 = time.perf_counter()
        outputs: list[RequestOutput] = []
        for done in (prev, launched if sync else None):
            if done is not None:
                outputs += self._finish(done)
        wait = self._wait
        t3 = time.perf_counter()
        if self.speculator is not None and launched is not None and sched.num_tokens == sched.num_decode_tokens:
            # A pure decode step: what it cost, with drafts or without (steps run one at a time).
            self.speculator.observe(sched.num_spec_tokens > 0, t3 - t0)
        self.last_timing = StepTiming(
            schedule=t1 - t0,
            prepare=launched.prepare_s if launched else 0.0,
            launch=launched.launch_s if launched else 0.0,
            wait=wait,
            output=t3 - t2 + early_s - wait,
        )
        return early + outputs

    def _finish(self, done: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's result and process it."""
        w = time.perf_counter()
        try:
            result = self.runner.fetch(done)
            self._wait += time.perf_counter() - w
            return self._process(done, result)
        except BaseException as e:
            self._abandon(done, e)  # its tokens are lost: nobody may wait for them forever
            raise

    def _process(self, step: LaunchedStep, result) -> list[RequestOutput]:
        """Append a finished step's tokens, decide stops, build outputs; then let the scheduler
        cache the blocks the step filled."""
        outputs = []
        now = time.time()
        n_tokens = 0
        # First: the blocks the step filled go to the prefix cache, before a request it finishes
        # gives them back (a one-token request still caches its prompt).
        self.scheduler.commit(step.sched)
        if result is not None:
            want_lp = result.logprobs is not None
            drafts = dict(step.batch.spec) if step.batch.spec else {}  # first row -> drafts verified
            rows, row = step.sampling, 0
            while row < len(rows):
                req, k = rows[row], drafts.get(row, 0)
                first, row = row, row + 1 + k  # a sequence verifying k drafts has k + 1 rows
                step.rows_done = row
                req.num_pending -= 1
                if req.is_finished:
                    continue  # aborted, or finished by an earlier token: a wasted row
                tokens = result.token_ids[first : first + result.emitted[first]] if k else [result.token_ids[first]]
                if req.metrics.first_token_time is None:
                    req.metrics.first_token_time = now
                for r, token in enumerate(tokens, first):  # a verified run: row r emitted this token
                    lp = None
                    if want_lp and req.logprobs is not None:
                        n = req.params.logprobs
                        lp = position_logprobs(
                            token, result.logprobs[r], result.ranks[r],
                            result.top_ids[r][:n], result.top_logprobs[r][:n], req.token_text,
                        )  # fmt: skip
                    try:
                        append_token(req, token, lp)
                    except Exception as e:  # noqa: BLE001 - a tokenizer or stop-check bug ends this request alone
                        fail(req, e)
                    n_tokens += 1
                    if req.is_finished:
                        break  # a stop inside an accepted run: the rest is dropped
                if k:
                    assert self.speculator is not None
                    self.speculator.record(req, k, len(tokens) - 1)
                    if not req.is_finished:  # the rejected drafts' KV is overwritten later
                        self.scheduler.rollback(req, k + 1 - len(tokens))
                        self.input_batch.blocks_trimmed(req)
                if req.is_finished:
                    req.metrics.finished_time = now
                    self.requests.pop(req.request_id, None)
                    self._release(req)
                out = make_output(req)
                if out is not None:
                    outputs.append(out)
        self.generation_tokens += n_tokens
        self.prompt_tokens_computed += step.sched.num_tokens - step.sched.num_decode_tokens
        return outputs

    def _abandon(self, step: LaunchedStep | ForwardStep, error: BaseException) -> None:
        """A step whose result could not be processed (say, interrupted while waiting): the
        requests whose tokens it held end with an error instead of waiting for them forever."""
        for req in dict.fromkeys(step.sampling[step.rows_done :]):  # (a speculating one has several rows)
            req.num_pending -= 1
            if not req.is_finished:
                fail(req, error)
                self.requests.pop(req.request_id, None)
                self._release(req)

    def _release(self, req: Request) -> None:
        self.scheduler.remove(req)
        self.input_batch.release(req)
