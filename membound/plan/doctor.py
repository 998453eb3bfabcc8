"""`membound doctor`: why is it slow? The diagnostic tree, run for real.

Readings are collected first (torch, NVML, microbenchmarks, a short decode), then judged
by pure functions, so the verdicts can be tested with recorded readings of sick machines.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import time

import torch

from membound import costs
from membound.cpu import CpuLoad, measure_contention, threads_for_load, usable_cores
from membound.plan.ceilings import Ceilings, measure
from membound.plan.gpus import GPUSpec, match_device_name
from membound.plan.planner import ModelShape, load_shape

OK, WARN, FAIL, INFO = "OK", "WARN", "FAIL", "INFO"
_RANK = {INFO: 0, OK: 0, WARN: 1, FAIL: 2}

# NVML clock-event ("throttle") reason bits, from nvml.h.
THROTTLE_GPU_IDLE = 0x1
THROTTLE_SW_POWER_CAP = 0x4
THROTTLE_HW_SLOWDOWN = 0x8
THROTTLE_SW_THERMAL = 0x20
THROTTLE_HW_THERMAL = 0x40
THROTTLE_HW_POWER_BRAKE = 0x80

HOT_C = 83  # the fourth seed's threshold; most NVIDIA parts start to slow down in the mid-80s


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""
    data: dict | None = None  # the numbers behind the detail, for --json


@dataclasses.dataclass
class GPUReadings:
    """What NVML and torch say about one GPU (fields None where the driver does not tell)."""

    name: str
    compute_capability: tuple[int, int]
    memory_total: int
    memory_used: int
    memory_used_by_others: int  # by processes other than this one
    driver_version: str | None = None
    cuda_version: str | None = None
    triton_version: str | None = None
    temperature_c: float | None = None
    sm_clock_mhz: float | None = None
    sm_clock_max_mhz: float | None = None
    throttle_reasons: int | None = None
    utilization_pct: float | None = None
    pcie_gen: int | None = None
    pcie_gen_max: int | None = None
    pcie_width: int | None = None
    pcie_width_max: int | None = None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# ---------------------------------------------------------------------- verdicts (pure)


def judge_gpu(r: GPUReadings, busy: bool = False) -> list[Check]:
    """Checks from NVML/torch readings. `busy`: the readings were taken under load (clocks matter then)."""
    out = [
        Check(
            "versions",
            INFO,
            f"driver {r.driver_version or '?'}, CUDA (torch build) {r.cuda_version or '?'}, "
            f"Triton {r.triton_version or 'not installed'}",
        )
    ]
    if r.triton_version is None:
        out.append(Check("triton", WARN, "Triton is not installed", "pip install triton (it ships with CUDA torch)"))
    cc = r.compute_capability
    bf16, fp8 = cc >= (8, 0), cc >= (8, 9)
    out.append(
        Check(
            "compute capability",
            OK if bf16 else WARN,
            f"sm_{cc[0]}{cc[1]}: bf16 {'yes' if bf16 else 'no'}, fp8 {'yes' if fp8 else 'no'}",
            "" if bf16 else "no bf16: membound runs fp16 here (--dtype float16)",
        )
    )
    share = r.memory_used_by_others / r.memory_total if r.memory_total else 0
    out.append(
        Check(
            "memory used by other processes",
            WARN if share > 0.05 else OK,
            f"{_gib(r.memory_used_by_others)} of {_gib(r.memory_total)} ({share:.0%})",
            "stop the other GPU processes (nvidia-smi lists them) or lower --gpu-memory-utilization"
            if share > 0.05
            else "",
        )
    )
    if r.temperature_c is not None:
        hot = r.temperature_c > HOT_C
        out.append(
            Check(
                "temperature",
                WARN if hot else OK,
                f"{r.temperature_c:.0f} C",
                "improve cooling / airflow; above ~83 C the GPU lowers its clocks" if hot else "",
            )
        )
    if r.throttle_reasons is not None:
        reasons = []
        if r.throttle_reasons & (THROTTLE_SW_THERMAL | THROTTLE_HW_THERMAL):
            reasons.append(("thermal slowdown", FAIL, "cool the GPU: airflow, fan curve, clean heatsink"))
        if r.throttle_reasons & (THROTTLE_HW_SLOWDOWN | THROTTLE_HW_POWER_BRAKE):
            reasons.append(("hardware slowdown", FAIL, "check power cables / PSU and temperature; see nvidia-smi -q"))
        if r.throttle_reasons & THROTTLE_SW_POWER_CAP:
            reasons.append(("power cap", WARN, "raise the power limit (nvidia-smi -pl) or accept lower clocks"))
        if not reasons:
            idle = " (idle)" if r.throttle_reasons & THROTTLE_GPU_IDLE else ""
            out.append(Check("throttling", OK, f"no throttle reasons active{idle}"))
        for what, status, fix in reasons:
            out.append(Check("throttling", status, f"{what} is active (reasons 0x{r.throttle_reasons:x})", fix))
    if r.sm_clock_mhz is not None and r.sm_clock_max_mhz:
        ratio = r.sm_clock_mhz / r.sm_clock_max_mhz
        low = busy and ratio < 0.8
        out.append(
            Check(
                "SM clock",
                WARN if low else OK,
                f"{r.sm_clock_mhz:.0f} of {r.sm_clock_max_mhz:.0f} MHz ({ratio:.0%}){' under load' if busy else ''}",
                "clocks are low under load: see the throttling check, or reset application clocks (nvidia-smi -rac)"
                if low
                else "",
            )
        )
    if r.pcie_width is not None and r.pcie_width_max:
        narrow = r.pcie_width < r.pcie_width_max
        gen = f"gen {r.pcie_gen} (max {r.pcie_gen_max})" if r.pcie_gen is not None else "gen ?"
        out.append(
            Check(
                "PCIe link",
                WARN if narrow else OK,
                f"{gen}, x{r.pcie_width} (max x{r.pcie_width_max}); a lower gen at idle is normal power saving",
                "the card runs on fewer lanes than it supports: reseat it or use a full x16 slot" if narrow else "",
            )
        )
    return out


def judge_fit(shape: ModelShape, memory_free: int, context: int, kv_dtype: str, overhead: int) -> Check:
    """Does the model plus one `context`-long sequence of KV fit in the free memory, with no offload?"""
    c = shape.config
    kv = costs.KVCost(c.num_layers, c.num_kv_heads, c.head_dim, kv_dtype)
    need = shape.weights.stored + context * kv.bytes_per_token + overhead
    if need <= memory_free:
        return Check(
            "model fits",
            OK,
            f"{shape.name}: weights {_gib(shape.weights.stored)} + KV for {context:,} tokens + overhead = "
            f"{_gib(need)} of {_gib(memory_free)} free",
        )
    return Check(
        "model fits",
        FAIL,
        f"{shape.name} needs {_gib(need)} (weights {_gib(shape.weights.stored)}) but {_gib(memory_free)} is free",
        "use a smaller model or lower precision (membound plan MODEL --weights int4), or a shorter --max-model-len",
    )


def judge_measured(
    what: str, measured: float, reference: float, unit: str, low: float, fix: str, higher_is_better: bool = True
) -> Check:
    share = measured / reference if reference else 0.0
    bad = share < low if higher_is_better else share > low
    return Check(
        what,
        WARN if bad else OK,
        f"{measured:,.1f} {unit} vs {reference:,.1f} {unit} expected ({share:.0%})",
        fix if bad else "",
    )


def judge_cpu_load(cores: int, load: CpuLoad | None, top: list[tuple[str, int, float]]) -> Check:
    """Do other processes take the cores the CPU path would use? `cores`: the threads the engine would
    run (usable cores, at most torch's thread count); `load`: a reading while this process idled;
    `top`: the busiest other processes over the same window, (name, pid, cores used).

    Others on a core make every parallel op wait for that core's thread, so the engine's thread
    governor gives it up (`threads_for_load`); others on all of them leave decode a fraction of its
    speed whatever the thread count."""
    if load is None:
        return Check("CPU load", INFO, "cannot read the CPU load (no /proc/stat): contention not checked")
    cores = max(1, cores)
    # Of the allowed CPUs, those beyond the engine's own threads absorb others' load first (a cgroup
    # quota without a cpuset allows every host CPU but fewer cores' worth of time).
    taken = min(float(cores), max(0.0, load.others - max(0, load.cores - cores)))
    threads = threads_for_load(load, cores)
    data = {
        "cores": cores,
        "allowed_cpus": load.cores,
        "others_cores": round(load.others, 3),
        "taken_cores": round(taken, 3),
        "engine_threads": threads,
        "interval_s": round(load.interval_s, 3),
        "top": [{"name": n, "pid": pid, "cores": round(c, 3)} for n, pid, c in top],
    }
    if taken < 0.25:
        return Check(
            "CPU load",
            OK,
            f"other processes use {load.others:.2f} of {load.cores} allowed CPUs; "
            f"the engine runs {threads} thread{'s' if threads != 1 else ''}",
            data=data,
        )
    busiest = ", ".join(f"{n} (pid {pid}) {c:.0%} of a core" for n, pid, c in top) or "none seen (short-lived?)"
    detail = f"other processes keep {taken:.1f} of the {cores} usable cores busy; busiest: {busiest}; "
    full = taken >= cores - 0.25
    if full:
        detail += (
            f"they take all of them, so decode will run at a fraction of its speed "
            f"(the thread governor runs {threads} thread{'s' if threads != 1 else ''} on a shared core)"
        )
    else:
        detail += f"the engine's thread governor will run {threads} thread{'s' if threads != 1 else ''} of {cores}"
    pids = " ".join(str(pid) for _, pid, _ in top[:3]) or "PID"
    fix = (
        f"stop them, or renice them (renice -n 19 -p {pids}); or give membound cores of its own: "
        f"taskset -c CPUS membound ... --num-threads N (N = the CPUs listed), with the others pinned elsewhere"
    )
    return Check("CPU load", FAIL if full else WARN, detail, fix, data)


def worst(checks: list[Check]) -> str:
    """FAIL if any check failed, else WARN if any warned, else OK (INFO lines count as OK)."""
    rank = max((_RANK[c.status] for c in checks), default=0)
    return {0: OK, 1: WARN, 2: FAIL}[rank]


# ---------------------------------------------------------------------- readings (real machine)


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_gpu(index: int = 0) -> GPUReadings:
    """torch for the basics; NVML (nvidia-ml-py) for the rest when it loads."""
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    r = GPUReadings(
        name=props.name,
        compute_capability=(props.major, props.minor),
        memory_total=total,
        memory_used=total - free,
        memory_used_by_others=max(0, total - free - torch.cuda.memory_reserved(index)),
        cuda_version=torch.version.cuda,
        triton_version=_version("triton"),
    )
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML: torch's readings stand alone
        return r
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        r.driver_version = pynvml.nvmlSystemGetDriverVersion()
        r.temperature_c = pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
        r.sm_clock_mhz = pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
        r.sm_clock_max_mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
        reasons = (
            getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        r.throttle_reasons = reasons(h)
        r.utilization_pct = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
        r.pcie_gen = pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h)
        r.pcie_gen_max = pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)
        r.pcie_width = pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)
        r.pcie_width_max = pynvml.nvmlDeviceGetMaxPcieLinkWidth(h)
        mine = os.getpid()
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        others = sum((p.usedGpuMemory or 0) for p in procs if p.pid != mine)
        if others:
            r.memory_used_by_others = others
    except pynvml.NVMLError:
        pass  # partial readings are still useful
    finally:
        pynvml.nvmlShutdown()
    return r


def decode_bound(name: str, bytes_per_token: int, bandwidth_gbs: float, what: str) -> tuple[Check, float]:
    """The batch-1 decode bound: the weight bytes one step streams over the measured bandwidth."""
    bound = costs.decode_bound_tok_s(bytes_per_token, bandwidth_gbs * costs.GB)
    check = Check(
        "decode bound",
        INFO,
        f"{name} {what} streams {bytes_per_token / 1e6:,.1f} MB of weights per token: at most {bound:,.1f} tok/s "
        f"at batch 1 ({bandwidth_gbs:,.1f} GB/s)",
        data={"weight_bytes_per_token": bytes_per_token, "bandwidth_gbs": bandwidth_gbs, "bound_tok_s": bound},
    )
    return check, bound


def engine_weight_bytes_per_step(engine) -> int:
    """Weight bytes one decode step of a loaded engine streams, quantized layers as stored (costs.py)."""
    return costs.loaded_weight_bytes(engine.model, engine.model_config.tie_word_embeddings).per_step


def measure_decode(model: str | None, device: str, new_tokens: int = 48) -> tuple[float, int]:
    """Batch-1 greedy decode tok/s on the real engine (as it runs by default: a GGUF's blocks
    packed), and the weight bytes it streams per step."""
    from membound import LLM, SamplingParams

    llm = LLM(model, device=device, max_model_len=512, kv_cache_memory_bytes=64 << 20)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompt = [1] * 16
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    out = llm.generate(prompt, params)[0]
    total = time.perf_counter() - t0
    ttft = out.metrics.time_to_first_token or 0.0
    rate = (new_tokens - 1) / max(1e-9, total - ttft)
    return rate, engine_weight_bytes_per_step(llm.engine)


# ---------------------------------------------------------------------- the tree


def run(model: str | None = None, context: int = 4096, decode: bool = True) -> list[Check]:
    checks = [
        Check(
            "torch",
            INFO,
            f"{torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only build'})",
        )
    ]
    if not torch.version.cuda:
        checks.append(
            Check(
                "CUDA build",
                WARN,
                "this torch is a CPU-only build, so no GPU can be used",
                "install a CUDA build: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128",
            )
        )
    if not torch.cuda.is_available():
        return checks + _cpu_checks(model, decode)
    return checks + _gpu_checks(model, context, decode)


def _cpu_checks(model: str | None, decode: bool) -> list[Check]:
    out = [
        Check(
            "GPU",
            WARN,
            "no CUDA GPU is visible: membound runs on the CPU, where decode is bound by system RAM bandwidth",
            "on a GPU machine check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES",
        )
    ]
    # First, while nothing of ours runs: a busy neighbour slows the measurements below as well.
    load, top = measure_contention(0.5)
    out.append(judge_cpu_load(min(usable_cores(), torch.get_num_threads()), load, top))
    ceil = measure("cpu")
    out.append(Check("CPU memory bandwidth", INFO, f"{ceil.copy_bandwidth_gbs:.1f} GB/s measured (copy)"))
    out.append(Check("CPU matmul rate", INFO, f"{ceil.matmul_tflops * 1000:.0f} GFLOPS fp32 measured"))
    shape = load_shape(model)
    if decode:
        rate, per_step = measure_decode(model, "cpu")
        check, bound = decode_bound(shape.name, per_step, ceil.copy_bandwidth_gbs, "as loaded")
    else:  # no engine: the weights as the file stores them
        check, bound = decode_bound(shape.name, shape.weights.per_step, ceil.copy_bandwidth_gbs, "as stored")
    out.append(dataclasses.replace(check, name="CPU decode bound"))
    if decode:
        out.append(
            judge_measured(
                "decode (batch 1)", rate, bound, "tok/s", 0.25,
                "far below the bandwidth bound: per-op host overhead or other busy processes (see the CPU load check)",
            )
        )  # fmt: skip
    return out


def _gpu_checks(model: str | None, context: int, decode: bool) -> list[Check]:
    r = read_gpu()
    spec: GPUSpec | None = match_device_name(r.name)
    out = [Check("GPU", OK, f"{r.name}, {_gib(r.memory_total)}" + ("" if spec else " (not in membound's table)"))]
    out += judge_gpu(r)
    shape = load_shape(model)
    out.append(judge_fit(shape, r.memory_total - r.memory_used, context, "bf16", 1 << 30))
    ceil: Ceilings = measure("cuda")
    if spec is not None:
        out.append(
            judge_measured(
                "copy bandwidth", ceil.copy_bandwidth_gbs, spec.bandwidth_gbs, "GB/s", 0.7,
                "memory clocks are low or the GPU is shared: see the clock and throttling checks",
            )
        )  # fmt: skip
    else:
        out.append(Check("copy bandwidth", INFO, f"{ceil.copy_bandwidth_gbs:,.0f} GB/s measured"))
    if ceil.launch_latency_us is not None:
        out.append(
            judge_measured(
                "kernel launch", ceil.launch_latency_us, 5.0, "us", 2.0,
                "slow launches: CPU frequency scaling or a busy CPU; membound's CUDA graphs hide them in decode",
                higher_is_better=False,
            )
        )  # fmt: skip
    if decode:
        rate, nbytes = measure_decode(model, "cuda")
        check, bound = decode_bound(shape.name, nbytes, ceil.copy_bandwidth_gbs, "as loaded")
        out.append(check)
        out.append(
            judge_measured(
                "decode (batch 1)", rate, bound, "tok/s", 0.5,
                "far below the bandwidth bound: small models are bound by launches and host round trips "
                "(see `membound bench walls`)",
            )
        )  # fmt: skip
    else:
        out.append(decode_bound(shape.name, shape.weights.per_step, ceil.copy_bandwidth_gbs, "as stored")[0])
    return out


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{c.status:^4}] {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"       fix: {c.fix}")
    lines.append(f"verdict: {worst(checks)}")
    return "\n".join(lines)
