"""What the CPU offers this process: native bf16, the cores it may use, and how busy others keep them.

The engine's CPU path reads these once at start-up (dtype, thread count) and, through
`ThreadGovernor`, between steps: a core that another process keeps busy is a core whose OpenMP
thread every parallel region waits for (a 2-thread step went from 20 ms to 382 ms with one busy
neighbour), so the engine gives such a core up rather than share it. `membound doctor` uses the
same load reading to say why a CPU run is slow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib
import time

_CPUINFO = pathlib.Path("/proc/cpuinfo")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The kernel's feature flags of the first CPU ("avx512_bf16", "amx_bf16", ...); empty off Linux."""
    try:
        for line in _CPUINFO.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model_name() -> str:
    try:
        for line in _CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def has_native_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX-512 BF16 or AMX): there bf16 activations halve the bytes at
    no extra instructions; elsewhere PyTorch emulates bf16 and fp32 is faster."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def allowed_cpus() -> list[int]:
    """CPU ids this process may run on (its affinity mask)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit(root: pathlib.Path = pathlib.Path("/sys/fs/cgroup")) -> float | None:
    """Cores the cgroup's CPU quota allows (cgroup v2 cpu.max, or v1 cfs quota / period); None: no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Threads worth running: the affinity mask, capped by the cgroup quota (rounded down, at least 1)."""
    n = len(allowed_cpus())
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, int(limit)))
    return max(1, n)


def omp_thread_limit() -> int | None:
    """OMP_NUM_THREADS as a positive integer, or None (unset or not a number)."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n > 0 else None


@dataclasses.dataclass(frozen=True)
class CpuLoad:
    """Over one interval: how many of the allowed cores were busy, and how much of that was this process."""

    cores: int
    busy: float  # cores' worth of busy time on the allowed CPUs, all processes
    own: float  # this process's CPU time per second (all its threads)
    interval_s: float

    @property
    def others(self) -> float:
        """Cores' worth of the allowed CPUs other processes used."""
        return max(0.0, self.busy - self.own)


def _busy_ticks(cpus: list[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks summed over `cpus`, from /proc/stat."""
    try:
        lines = pathlib.Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    want = {f"cpu{i}" for i in cpus}
    busy = total = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name in want:
            v = [int(x) for x in rest.split()]
            idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
            t = sum(v[:8])  # user nice system idle iowait irq softirq steal (guest is in user already)
            busy, total = busy + t - idle, total + t
    return (busy, total) if total else None


class CpuLoadMeter:
    """Reads busy time on the allowed CPUs and this process's CPU time; `sample()` gives the load since
    the previous sample (None on the first call or where /proc is missing)."""

    def __init__(self, cpus: list[int] | None = None) -> None:
        self.cpus = cpus if cpus is not None else allowed_cpus()
        self._last: tuple[float, int, int, float] | None = None

    def sample(self) -> CpuLoad | None:
        ticks = _busy_ticks(self.cpus)
        if ticks is None:
            return None
        now, own = time.monotonic(), time.process_time()
        last, self._last = self._last, (now, ticks[0], ticks[1], own)
        if last is None or ticks[1] <= last[2]:
            return None
        dt = now - last[0]
        frac = (ticks[0] - last[1]) / (ticks[1] - last[2])  # busy share of the allowed CPUs' time
        return CpuLoad(len(self.cpus), frac * len(self.cpus), (own - last[3]) / dt, dt)


def measure_load(seconds: float = 0.5) -> CpuLoad | None:
    """The load over the next `seconds` (for doctor: this process idles meanwhile)."""
    meter = CpuLoadMeter()
    meter.sample()
    time.sleep(seconds)
    return meter.sample()


def threads_for_load(load: CpuLoad, max_threads: int) -> int:
    """Threads worth running under `load`: the allowed CPUs others leave free, where a neighbour using
    a quarter of a core or more takes that core (sharing a core, a busy neighbour gets only about half
    of it, so that is what a reading at full threads shows), at most `max_threads` (a cgroup quota
    without a cpuset allows every host CPU but fewer cores' worth of time). `ThreadGovernor` runs
    this; `membound doctor` says what it will pick."""
    return max(1, min(max(1, max_threads), int(load.cores - load.others + 0.25)))


def process_cpu_times() -> dict[int, tuple[str, int, int]] | None:
    """pid -> (name, start time, user + system CPU time), both in clock ticks, for every process but
    this one, from /proc/[pid]/stat; None where /proc is missing. One pass over /proc: a process
    that ends meanwhile, or whose stat cannot be read, is left out."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    me = os.getpid()
    out: dict[int, tuple[str, int, int]] = {}
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        # "pid (comm) state ppid ... utime stime ... starttime ...": comm may hold spaces and ')'.
        head, _, rest = raw.rpartition(")")
        fields = rest.split()
        try:
            name = head.split("(", 1)[1]
            out[int(entry)] = (name, int(fields[19]), int(fields[11]) + int(fields[12]))
        except (IndexError, ValueError):
            continue
    return out


def busiest_processes(
    before: dict[int, tuple[str, int, int]],
    after: dict[int, tuple[str, int, int]],
    interval_s: float,
    top: int = 5,
    min_cores: float = 0.05,
) -> list[tuple[str, int, float]]:
    """(name, pid, cores used) of the processes that used the most CPU between two `process_cpu_times`
    readings `interval_s` apart, busiest first, at most `top`, none under `min_cores`. A pid that is
    new in `after` (or reused: another start time) started within the interval, so all its CPU time
    counts. Time on any CPU counts, not only the ones this process may use."""
    if interval_s <= 0:
        return []
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    used = []
    for pid, (name, start, t) in after.items():
        prev = before.get(pid)
        t0 = prev[2] if prev is not None and prev[1] == start else 0
        cores = (t - t0) / tick / interval_s
        if cores >= min_cores:
            used.append((name, pid, cores))
    used.sort(key=lambda x: (-x[2], x[1]))
    return used[:top]


def measure_contention(seconds: float = 0.5, top: int = 5) -> tuple[CpuLoad | None, list[tuple[str, int, float]]]:
    """Over the next `seconds`, while this process idles: the load on the allowed CPUs (`measure_load`)
    and the busiest other processes over the same window (`busiest_processes`; empty without /proc)."""
    meter = CpuLoadMeter()
    meter.sample()
    before = process_cpu_times()
    t0 = time.monotonic()
    time.sleep(seconds)
    after = process_cpu_times()
    t1 = time.monotonic()
    load = meter.sample()
    procs = busiest_processes(before, after, t1 - t0, top) if before is not None and after is not None else []
    return load, procs


class ThreadGovernor:
    """Picks the intra-op thread count between engine steps: the usable cores minus the cores other
    processes keep busy, re-read every `interval_s`. A change needs two readings in a row, so a
    short burst elsewhere does not flip it back and forth. With `fixed` (--num-threads) it only
    applies that number once."""

    def __init__(
        self, max_threads: int, fixed: bool = False, interval_s: float = 0.5, set_threads=None, get_threads=None
    ) -> None:
        import torch

        self.max_threads = max(1, max_threads)
        self.fixed = fixed
        self.interval_s = interval_s
        self._set = set_threads or torch.set_num_threads
        # The count is the process's, not this engine's: another engine in the process (a multi-model
        # server) may have set its own since this one's last step.
        self._get = get_threads or (torch.get_num_threads if set_threads is None else lambda: self.threads)
        self._meter = CpuLoadMeter()
        self._next = 0.0
        self._proposal: int | None = None
        self.threads = self.max_threads
        self.changes = 0
        self._set(self.threads)

    def target(self, load: CpuLoad) -> int:
        """Threads for this load, at most max_threads (`threads_for_load`)."""
        return threads_for_load(load, self.max_threads)

    def tick(self) -> int:
        """Call between steps; cheap unless a reading is due. Returns the thread count in force."""
        if self._get() != self.threads:
            self._set(self.threads)
        if self.fixed or self.max_threads == 1:
            return self.threads
        now = time.monotonic()
        if now < self._next:
            return self.threads
        self._next = now + self.interval_s
        load = self._meter.sample()
        if load is None:
            return self.threads
        want = self.target(load)
        if want == self.threads:
            self._proposal = None
        elif self._proposal == want:
            self.threads, self._proposal = want, None
            self.changes += 1
            self._set(want)
        else:
            self._proposal = want
        return self.threads


def _libc():
    """glibc's malloc controls, or None (another libc, or none found)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


@contextlib.contextmanager
def loading_heap():
    """While loading, allocations of 2 MiB and more get their own pages, returned to the OS when freed:
    with glibc's default (a threshold that grows to each freed size) loading's temporaries stay in
    the heap, and the peak RSS climbs ~10 MB a layer. Afterwards the threshold is left at 32 MiB (glibc's
    own ceiling) and the trim threshold at 64 MiB, so a step's activations reuse heap memory (fresh pages
    for a 512-token prefill's buffers made it 1.3x slower). The heap's free pages go back once, at the
    end (malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 2 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.malloc_trim(0)
            # A fixed mmap threshold also fixes the trim threshold at 128 KiB: every free at the heap's
            # top would hand pages back, to be faulted in again by the next step.
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
