"""Several models in one server: naming them, splitting the device between them, and which are awake.

`membound serve A B ...` runs one engine per model in one process, on one device: each on its own
thread (and CUDA stream), built one after another so each memory plan sees what the others hold.

- `parse_models` reads the command line's models (`PATH` or `NAME=PATH`) and `--model-option NAME
  KEY=VALUE ...`; `plan_models` turns them into one `EngineConfig` each, the device's memory split by
  share: on CUDA each engine plans within its share of `gpu_memory_utilization`; on CPU (or with
  `--kv-cache-memory`) each KV cache gets its share of the KV budget. `describe_split` is the start-up
  log of the split.
- `Residency` keeps at most `--max-loaded-models` engines awake: one with work that is asleep waits
  for a slot; the least recently used awake engine with nothing to run (no request running, queued or
  arriving) puts itself to sleep to make one (`LLMEngine.sleep`: KV freed, weights to pinned host
  memory on CUDA). An engine with requests is never put to sleep.
- `DeviceGate` orders the engines' device work: on CPU one step at a time (they share the cores);
  on CUDA steps overlap, and a sleep or wake (which captures CUDA graphs) has the device alone.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from membound.config import EngineConfig
from membound.errors import ConfigError, InvalidRequestError

if TYPE_CHECKING:
    from membound.engine.llm_engine import LLMEngine
    from membound.server.async_engine import AsyncEngine

log = logging.getLogger("membound.server")

GiB = 1 << 30
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")


class ModelNotFoundError(InvalidRequestError):
    """The request's `model` names none of the served models (404, as OpenAI answers)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


def _share(v: str) -> float:
    x = float(v)
    if not (math.isfinite(x) and 0 < x <= 1):
        raise ValueError("a fraction in (0, 1]")
    return x


def _positive_int(v: str) -> int:
    x = int(v)
    if x < 1:
        raise ValueError("a positive integer")
    return x


def _int_or_auto(v: str) -> int | str:
    return v if v == "auto" else _positive_int(v)


def _mib(v: str) -> int:
    x = float(v)
    if not (math.isfinite(x) and x > 0):
        raise ValueError("a positive number of MiB")
    return round(x * 2**20)


# --model-option keys: how each value is read, and what it must be.
MODEL_OPTIONS: dict[str, tuple[object, str]] = {
    "share": (_share, "a fraction of the memory budget, in (0, 1]"),
    "max_model_len": (_int_or_auto, "a positive integer or auto"),
    "max_num_seqs": (_positive_int, "a positive integer"),
    "max_num_batched_tokens": (_positive_int, "a positive integer"),
    "target_concurrency": (_positive_int, "a positive integer"),
    "kv_cache_memory": (_mib, "a positive number of MiB"),
}
_ENGINE_KEYS = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "target_concurrency")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One served model as the command line gave it."""

    names: tuple[str, ...]  # the first is reported; the rest are aliases (one model: --served-model-name)
    model: str | None  # GGUF file, HF folder or preset; None: the embedded SmolLM2
    options: dict = dataclasses.field(default_factory=dict)  # --model-option values, parsed

    @property
    def name(self) -> str:
        return self.names[0] if self.names else str(self.model)  # (one model alone may have no name yet)


def parse_models(
    args: list[str],
    served_model_names: list[str] | None = None,
    options: list[list[str]] | None = None,
    load_format: str = "auto",
) -> list[ModelSpec]:
    """`PATH` or `NAME=PATH` per model (a bare path is named after its file or folder), then the
    `--model-option NAME KEY=VALUE ...` groups. ConfigError says what is wrong, before anything loads."""
    from membound.model.loader import resolve_model

    args = list(args) or [None]
    if served_model_names and len(args) > 1:
        raise ConfigError("--served-model-name names the one model served; with several, name each one as NAME=PATH")
    specs: list[ModelSpec] = []
    for arg in args:
        name, path = _split_name(arg)
        if len(args) == 1 and served_model_names:
            if name is not None and served_model_names[0] != name:
                raise ConfigError(
                    f"the model is named twice ({name!r} and --served-model-name {served_model_names[0]!r}); give one"
                )
            names = tuple(served_model_names)
        else:
            if name is None and (len(args) > 1 or options):  # (one model alone: named as `run` names it)
                name = resolve_model(path, load_format).name
            names = (name,) if name is not None else ()
        specs.append(ModelSpec(names, path))
    taken: dict[str, int] = {}
    for i, s in enumerate(specs):
        for n in s.names:
            if n in taken and taken[n] != i:
                raise ConfigError(
                    f"two models are named {n!r}; give each its own name: NAME=PATH (e.g. {n}-2={specs[i].model})"
                )
            taken[n] = i
    for group in options or []:
        specs = _apply_option(specs, group)
    return specs


def _split_name(arg: str | None) -> tuple[str | None, str | None]:
    if arg is None or "=" not in arg:
        return None, arg
    import pathlib

    if pathlib.Path(arg).expanduser().exists():  # a path with '=' in it
        return None, arg
    name, path = arg.split("=", 1)
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{arg!r}: a model is PATH or NAME=PATH, NAME letters, digits and ._:/@+- (starting with a letter or digit)"
        )
    if not path:
        raise ConfigError(f"{arg!r}: NAME=PATH needs a path (a GGUF file, a HF folder or a preset)")
    return name, path


def _apply_option(specs: list[ModelSpec], group: list[str]) -> list[ModelSpec]:
    usage = "--model-option NAME KEY=VALUE [KEY=VALUE ...]"
    if len(group) < 2:
        raise ConfigError(f"{usage}: got {' '.join(group) or 'nothing'}")
    name, *pairs = group
    by_name = {n: i for i, s in enumerate(specs) for n in s.names}
    if name not in by_name:
        served = ", ".join(n for s in specs for n in s.names[:1]) or "(a model without a name)"
        raise ConfigError(f"--model-option {name}: no model is named {name!r}; the models are {served}")
    i = by_name[name]
    opts = dict(specs[i].options)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in MODEL_OPTIONS:
            keys = ", ".join(MODEL_OPTIONS)
            raise ConfigError(f"--model-option {name} {pair!r}: give KEY=VALUE with KEY one of {keys}")
        read, what = MODEL_OPTIONS[key]
        try:
            opts[key] = read(value)
        except ValueError:
            raise ConfigError(f"--model-option {name} {key}={value!r}: must be {what}") from None
    specs = list(specs)
    specs[i] = dataclasses.replace(specs[i], options=opts)
    return specs


@dataclasses.dataclass(frozen=True)
class PlannedModel:
    names: tuple[str, ...]
    config: EngineConfig
    share: float  # of the budget: gpu_memory_utilization on CUDA, the KV budget on CPU

    @property
    def name(self) -> str:
        return self.names[0] if self.names else str(self.config.model)


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the models' shares divide."""

    device: str  # "cpu" or "cuda"
    kv_bytes: int | None  # the KV budget split by share (CPU, or --kv-cache-memory); None: shares of the GPU
    gpu_bytes: int | None = None  # CUDA without --kv-cache-memory: gpu_memory_utilization x the device's memory
    max_loaded: int = 0  # models awake at once


def plan_models(
    specs: list[ModelSpec], base: EngineConfig, max_loaded: int | None = None
) -> tuple[list[PlannedModel], Budget]:
    """One engine config per model, the budget split by share (`ModelSpec.options["share"]`; a model
    without one gets an equal part of what the others leave, or 1/K with `max_loaded` K below the
    number of models). Any `max_loaded` models awake at once must fit: their shares sum to at most 1."""
    n = len(specs)
    if max_loaded is not None and (isinstance(max_loaded, bool) or not isinstance(max_loaded, int) or max_loaded < 1):
        raise ConfigError(f"--max-loaded-models must be a positive integer, got {max_loaded!r}")
    k = n if max_loaded is None else min(max_loaded, n)
    given = {s.name: s.options["share"] for s in specs if "share" in s.options}
    others = [s.name for s in specs if "share" not in s.options]
    if k < n:
        default = 1.0 / k
    else:
        rest = 1.0 - sum(given.values())
        if others and rest <= 1e-9:
            raise ConfigError(
                f"the shares given sum to {sum(given.values()):g}, leaving nothing for {', '.join(others)}; "
                "lower them or give every model a share"
            )
        default = rest / len(others) if others else 0.0
    shares = [given.get(s.name, default) for s in specs]
    loaded = sorted(shares, reverse=True)[:k]
    if sum(loaded) > 1 + 1e-9:
        which = "the models' shares" if k == n else f"the {k} largest shares (--max-loaded-models {k})"
        raise ConfigError(
            f"{which} sum to {sum(loaded):g}: the models awake at once must fit in the budget (at most 1)"
        )
    device = base.torch_device()
    split_kv = base.kv_cache_memory_bytes is not None or device.type != "cuda"
    kv_total = None
    if split_kv:
        from membound.engine.memory import kv_budget_bytes

        kv_total = kv_budget_bytes(base, torch.device("cpu"), 0, 0)  # --kv-cache-memory, else the CPU default
    budget = Budget(device.type, kv_total, None if split_kv else _gpu_budget(base, device), k)
    out = []
    for spec, share in zip(specs, shares, strict=True):
        kw: dict = {"model": spec.model}
        kw.update({key: spec.options[key] for key in _ENGINE_KEYS if key in spec.options})
        if "kv_cache_memory" in spec.options:
            kw["kv_cache_memory_bytes"] = spec.options["kv_cache_memory"]
        elif n > 1 or "share" in spec.options:
            if kv_total is not None:
                kw["kv_cache_memory_bytes"] = max(1, int(kv_total * share))
            else:
                kw["gpu_memory_utilization"] = base.gpu_memory_utilization * share
        if isinstance(kw.get("max_model_len"), int) and "target_concurrency" not in kw:
            # The base's own target_concurrency (max_model_len=auto's, filled in) is not this model's.
            kw["target_concurrency"] = None
        try:
            config = dataclasses.replace(base, **kw)
        except ConfigError as e:
            raise ConfigError(f"model {spec.name!r}: {e}" if spec.names else str(e)) from None
        out.append(PlannedModel(spec.names, config, share))
    return out, budget


def _gpu_budget(base: EngineConfig, device: torch.device) -> int | None:
    try:
        return int(base.gpu_memory_utilization * torch.cuda.get_device_properties(device).total_memory)
    except (RuntimeError, AssertionError):
        return None


def describe_split(entries: list[tuple[PlannedModel, LLMEngine]], budget: Budget) -> list[str]:
    """The start-up log of the memory split: each model's share, weights and KV, then the total
    against the budget."""
    lines = []
    if budget.kv_bytes is not None:
        where = "weights are outside it" if budget.device == "cpu" else "plus weights and activations"
        head = f"KV budget {budget.kv_bytes / GiB:.3f} GiB split by share ({where})"
    else:
        gpu = f"{budget.gpu_bytes / GiB:.2f} GiB" if budget.gpu_bytes else "the device's memory"
        head = f"budget gpu_memory_utilization x device = {gpu} split by share (weights + activations + KV)"
    lines.append(f"{len(entries)} models on {budget.device}, at most {budget.max_loaded} loaded at once; {head}:")
    for planned, engine in entries:
        m = engine.memory
        lines.append(
            f"  {planned.name}: share {planned.share:.3f}, weights {m.weight_bytes / GiB:.3f} GiB + "
            f"KV {m.kv_bytes / GiB:.3f} GiB ({m.kv_tokens} tokens"
            + (f", activations {m.activation_peak_bytes / GiB:.3f} GiB" if m.activation_peak_bytes else "")
            + f"), max_model_len {engine.max_model_len}, max_num_seqs {engine.config.max_num_seqs}"
        )
    k = budget.max_loaded or len(entries)
    loaded = "" if k >= len(entries) else f" of the {k} largest (loaded at once)"
    mems = [engine.memory for _, engine in entries]
    weights = sum(m.weight_bytes for m in mems)
    if budget.kv_bytes is not None:
        kv = sum(sorted((m.kv_bytes for m in mems), reverse=True)[:k])
        verdict = "within" if kv <= budget.kv_bytes else "OVER"
        lines.append(
            f"  total: weights {weights / GiB:.3f} GiB; KV{loaded} {kv} of {budget.kv_bytes} budget bytes "
            f"({verdict} the budget)"
        )
    else:
        used = sum(sorted((m.weight_bytes + m.activation_peak_bytes + m.kv_bytes for m in mems), reverse=True)[:k])
        of = f" of {budget.gpu_bytes / GiB:.2f} GiB" if budget.gpu_bytes else ""
        lines.append(f"  total: weights + activations + KV{loaded} {used / GiB:.3f} GiB{of}")
    return lines


# ---------------------------------------------------------------------- at run time


class DeviceGate:
    """Orders device work across the engines of one process.

    On CPU every engine's device work (load, steps, sleep, wake) runs on one thread, one call at a time
    (`run`): two steps at once would each get part of the cores, and OpenMP keeps a worker pool per
    thread that starts parallel regions: with one per engine thread, a lone model decoded at half
    speed beside an idle one (benchmarks/multi_model.py). On CUDA steps share the device (each engine
    has its own stream) and `exclusive()` is a sleep or wake alone on it (capturing CUDA graphs while
    another thread launches work is not allowed). Waiters for exclusive access go first-come
    first-served, and new shared holders wait behind them."""

    def __init__(self, exclusive_steps: bool) -> None:
        self._exclusive_steps = exclusive_steps
        self._cpu = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="membound-cpu") if exclusive_steps else None
        )
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._queue: collections.deque = collections.deque()

    def run(self, fn, *args):
        """fn(*args) as one engine's device work (a step, a load): on the CPU thread, else shared."""
        if self._cpu is not None:
            return self._cpu.submit(fn, *args).result()
        with self.shared():
            return fn(*args)

    def run_alone(self, fn, *args):
        """fn(*args) with the device to itself (a sleep or wake)."""
        if self._cpu is not None:
            return self._cpu.submit(fn, *args).result()
        with self.exclusive():
            return fn(*args)

    def close(self) -> None:
        if self._cpu is not None:
            self._cpu.shutdown(wait=False)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._queue:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._writer or self._readers or self._queue[0] is not me:
                self._cond.wait()
            self._queue.popleft()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Residency:
    """Which engines are awake: at most `max_loaded`. Every call comes from an engine's own thread
    (each engine sleeps and wakes only itself), so an engine is never put to sleep under a step.

    - `ensure_awake` before a step: True if awake (waking it into a free slot first); else the
      engine waits for one (False after a short wait, so its thread keeps applying aborts).
    - `idle` whenever an engine has nothing to run: if an engine is waiting for a slot and this is
      the least recently used idle engine awake, it sleeps now.
    """

    def __init__(self, max_loaded: int, gate: DeviceGate | None = None, poll: float = 0.05) -> None:
        self.max_loaded = max_loaded
        self.gate = gate
        self._poll = poll
        self._cond = threading.Condition()
        self._awake: dict[AsyncEngine, float] = {}  # -> when last used (monotonic)
        self._busy: set[AsyncEngine] = set()
        self._leaving: set[AsyncEngine] = set()  # going to sleep: their memory is not free yet
        self._waiting: dict[AsyncEngine, float] = {}  # asleep with work -> since when

    def loaded(self, a: AsyncEngine) -> None:
        """`a` finished loading: it is awake."""
        with self._cond:
            self._awake[a] = time.monotonic()

    def remove(self, a: AsyncEngine) -> None:
        """`a` died or stopped: its slot is free (whatever it still holds is beyond help)."""
        with self._cond:
            self._awake.pop(a, None)
            self._busy.discard(a)
            self._waiting.pop(a, None)
            self._cond.notify_all()

    def is_awake(self, a: AsyncEngine) -> bool:
        with self._cond:
            return a in self._awake

    def least_recently_used(self) -> AsyncEngine | None:
        with self._cond:
            return min(self._awake, key=self._awake.__getitem__, default=None)

    def num_awake(self) -> int:
        with self._cond:
            return len(self._awake) + len(self._leaving)

    def ensure_awake(self, a: AsyncEngine, engine: LLMEngine) -> bool:
        now = time.monotonic()
        with self._cond:
            if a in self._awake:
                self._awake[a] = now
                self._busy.add(a)
                return True
            if len(self._awake) + len(self._leaving) >= self.max_loaded:
                if a not in self._waiting:
                    self._waiting[a] = now
                    for other in self._awake:  # an idle one decides at once, not at its next poll
                        other.nudge()
                self._cond.wait(self._poll)
                return False
            since = self._waiting.pop(a, now)
            self._awake[a] = now
            self._busy.add(a)
        self._wake(a, engine, now - since)
        return True

    def idle(self, a: AsyncEngine, engine: LLMEngine) -> None:
        with self._cond:
            self._waiting.pop(a, None)  # asleep with nothing left to run (its requests were aborted)
            if a not in self._awake:
                return
            self._busy.discard(a)
            free = self.max_loaded - len(self._awake) - len(self._leaving)
            if len(self._waiting) <= free:
                return
            idle = [x for x in self._awake if x not in self._busy]
            if min(idle, key=self._awake.__getitem__) is not a:
                return
            del self._awake[a]
            self._leaving.add(a)
        self._sleep_leaving(a, engine)

    def sleep_now(self, a: AsyncEngine, engine: LLMEngine) -> None:
        """Put an idle `a` to sleep (start-up: room for the next model to load)."""
        if engine.has_unfinished_requests():
            raise RuntimeError(f"model {a.name} has requests; it cannot sleep")
        with self._cond:
            if a not in self._awake:
                return
            del self._awake[a]
            self._busy.discard(a)
            self._leaving.add(a)
        self._sleep_leaving(a, engine)

    def _sleep_leaving(self, a: AsyncEngine, engine: LLMEngine) -> None:
        """Sleep `a`, already moved from awake to leaving; its slot is free once this returns."""
        try:
            self._sleep(a, engine)
        finally:
            with self._cond:
                self._leaving.discard(a)
                self._cond.notify_all()

    def _alone(self, fn):
        return self.gate.run_alone(fn) if self.gate is not None else fn()

    def _sleep(self, a: AsyncEngine, engine: LLMEngine) -> None:
        seconds = self._alone(engine.sleep)
        where = "weights to host memory, KV cache freed" if engine.device.type == "cuda" else "KV cache freed"
        log.info("model %s asleep in %.1f ms (%s)", a.name, seconds * 1e3, where)
        if a.metrics is not None:
            a.metrics.on_sleep(seconds)

    def _wake(self, a: AsyncEngine, engine: LLMEngine, waited: float) -> None:
        seconds = self._alone(engine.wake)
        log.info("model %s woke in %.1f ms (after %.3fs waiting for a loaded slot)", a.name, seconds * 1e3, waited)
        if a.metrics is not None:
            a.metrics.on_wake(seconds)
