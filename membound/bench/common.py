"""What every `membound bench` command shares: the run record, cached device ceilings,
terminal tables and JSON output."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys

import torch

from membound import costs
from membound.engine.llm_engine import LLMEngine
from membound.model.tokenizer import tokenizer_cache_dir
from membound.plan.ceilings import Ceilings, measure


def commit() -> str | None:
    here = pathlib.Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


def run_record(engine: LLMEngine | None = None, **extra) -> dict:
    """Device, software versions, model, dtype and commit: recorded with every result."""
    import membound

    rec = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "membound": membound.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    if engine is not None:
        rec.update(
            device=torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
            model=engine.source.name,
            dtype=str(engine.dtype).removeprefix("torch."),
            max_model_len=engine.max_model_len,
            attention_backend=engine.backend.name,
        )
    rec.update(extra)
    return rec


def device_ceilings(device: torch.device, dtype: torch.dtype, remeasure: bool = False) -> Ceilings:
    """Copy bandwidth and matmul rate of this device, measured once and cached per device."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.processor() or 'x'}"
    key = f"{name}|{os.cpu_count()}|{torch.__version__}|{dtype}"
    path = tokenizer_cache_dir() / "ceilings.json"
    cache = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
    if not remeasure and key in cache:
        return Ceilings(**cache[key])
    c = measure(device, dtype)
    cache[key] = dataclasses.asdict(c)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    except OSError:
        pass
    return c


def engine_weight_bytes(engine: LLMEngine) -> costs.WeightBytes:
    """The loaded engine's weights as the cost model counts them: stored (quantized layers as
    stored), streamed per decode step, and multiplied per token."""
    return costs.loaded_weight_bytes(engine.model, engine.model_config.tie_word_embeddings)


def weight_bytes_per_step(engine: LLMEngine) -> int:
    """Bytes of weights one decode step streams: all (quantized layers as stored) but the
    embedding table, unless it is tied to the LM head."""
    return engine_weight_bytes(engine).per_step


def matmul_flops_per_token(engine: LLMEngine) -> int:
    """2 FLOPs per weight of every matrix a token goes through (layers and LM head)."""
    return 2 * engine_weight_bytes(engine).matmul_params


def engine_decode_cost(engine: LLMEngine) -> costs.DecodeCost:
    return costs.DecodeCost.of(engine.model_config, engine_weight_bytes(engine), engine.kv_spec.bytes_per_token)


def decode_step_cost(engine: LLMEngine, batch: int, context: float) -> tuple[int, int, float]:
    """(weight bytes, KV bytes, FLOPs) of one decode step of `batch` sequences at `context` tokens each."""
    step = engine_decode_cost(engine).step(batch, context)
    return step.weight_bytes, step.kv_bytes, step.flops


def peak_memory(device: torch.device) -> tuple[int, int]:
    """(peak bytes used by this process, total bytes of the device)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p90": float("nan"), "p99": float("nan")}
    v = sorted(values)

    def q(p: float) -> float:
        return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))]

    return {"mean": sum(v) / len(v), "median": q(50), "p90": q(90), "p99": q(99)}


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec). Right-aligned plain text."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    left = [f == "s" for _, _, f in columns]  # text columns read better left-aligned
    return "\n".join(
        "  ".join(c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(row, widths, left, strict=True)).rstrip()
        for row in cells
    )


def write_json(path: str | None, data: dict) -> None:
    if path:
        p = pathlib.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(data, indent=2, default=str))


class NvmlSampler:
    """Samples clocks, temperature and throttle reasons in the background while a CUDA run goes.

    `summary()` is None where NVML is unavailable (no GPU, no driver, or nvidia-ml-py missing).
    """

    def __init__(self, device: torch.device, interval: float = 0.25) -> None:
        self.device, self.interval = device, interval
        self.samples: list[dict] = []
        self._stop = None
        self._thread = None

    def __enter__(self) -> NvmlSampler:
        import threading

        if self.device.type != "cuda":
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
        except Exception:  # noqa: BLE001 - sampling is optional
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        import pynvml

        reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        reasons = reasons or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        while not self._stop.wait(self.interval):
            try:
                h = self._handle
                self.samples.append(
                    {
                        "sm_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                        "sm_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                        "temp_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
                        "reasons": reasons(h),
                    }
                )
            except pynvml.NVMLError:
                return

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(2)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        from membound.plan import doctor

        bad = doctor.THROTTLE_SW_THERMAL | doctor.THROTTLE_HW_THERMAL | doctor.THROTTLE_HW_SLOWDOWN
        bad |= doctor.THROTTLE_HW_POWER_BRAKE | doctor.THROTTLE_SW_POWER_CAP
        seen = 0
        for s in self.samples:
            seen |= s["reasons"]
        return {
            "samples": len(self.samples),
            "max_temp_c": max(s["temp_c"] for s in self.samples),
            "min_sm_clock_ratio": min(s["sm_mhz"] / s["sm_max_mhz"] for s in self.samples if s["sm_max_mhz"]),
            "throttle_reasons_seen": seen,
            "throttled": bool(seen & bad),
        }
