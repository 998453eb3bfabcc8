"""Measured device ceilings: memory copy bandwidth, matmul rate, kernel-launch latency.

Short microbenchmarks (well under a second each on a GPU, a few seconds on a CPU); the
roofline and the doctor compare achieved numbers with these, not only with datasheets.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from membound import costs


@dataclasses.dataclass(frozen=True)
class Ceilings:
    device: str
    copy_bandwidth_gbs: float  # (bytes read + bytes written) / time of a large device copy
    matmul_tflops: float  # dense matmul in the given dtype
    dtype: str
    launch_latency_us: float | None = None  # CUDA only: per tiny kernel, launched back to back


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _best_time(fn, dev: torch.device, repeats: int) -> float:
    fn()
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def measure(device: str | torch.device = "cpu", dtype: torch.dtype | None = None, quick: bool = False) -> Ceilings:
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    # Copy buffers far larger than any cache (L2 is 50-126 MB on big GPUs).
    n_bytes = (1 << 30 if gpu else 256 << 20) // (4 if quick else 1)
    bufs = [torch.empty(n_bytes // 4, dtype=torch.float32, device=dev).uniform_()]
    bufs.append(torch.empty_like(bufs[0]))
    t = _best_time(lambda: bufs[1].copy_(bufs[0]), dev, 5 if gpu else 3)
    bandwidth = 2 * n_bytes / t / costs.GB  # a copy reads and writes every byte
    bufs.clear()
    n = (8192 if gpu else 1024) // (2 if quick else 1)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    t = _best_time(lambda: a @ b, dev, 5 if gpu else 3)
    tflops = costs.matmul_flops(n, n, n) / t / 1e12
    latency = None
    if gpu:
        x = torch.zeros(1, device=dev)
        k = 200

        def launches():
            for _ in range(k):
                x.add_(1)

        latency = _best_time(launches, dev, 3) / k * 1e6
    name = torch.cuda.get_device_name(dev) if gpu else "cpu"
    return Ceilings(name, bandwidth, tflops, str(dtype).removeprefix("torch."), latency)
