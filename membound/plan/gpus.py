"""Published GPU ceilings: memory, memory bandwidth, dense tensor-core rates, L2.

Rates are dense (no 2:4 sparsity) with FP32 accumulation, as the vendor datasheets
and architecture whitepapers list them; `fp8_tflops` is None where the chip has no FP8
tensor cores. GeForce cards list FP16/BF16 with FP32 accumulation at half the FP16
accumulation rate; the FP32-accumulate figure is the one inference kernels get.
"""

from __future__ import annotations

import dataclasses
import re

from membound.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: float  # what the driver reports as total, roughly (marketing GB converted)
    bandwidth_gbs: float  # GB/s (1e9 bytes/s)
    bf16_tflops: float  # dense
    fp8_tflops: float | None  # dense; None = no FP8 tensor cores
    l2_mib: float
    cpu: bool = False  # the host itself (memory is RAM): the engine's CPU KV budget rule applies

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    @property
    def bandwidth(self) -> float:  # bytes/s
        return self.bandwidth_gbs * 1e9


def _gb(marketing_gb: float) -> float:
    """Vendor GB (1e9) -> GiB."""
    return marketing_gb * 1e9 / 2**30


GPUS: dict[str, GPUSpec] = {
    # NVIDIA Ampere GA102 whitepaper (RTX 3090 column): 936 GB/s GDDR6X, BF16 tensor 71 TFLOPS
    # dense with FP32 accumulate, 6 MB L2.
    "rtx-3090": GPUSpec("RTX 3090", _gb(24), 936, 71.0, None, 6),
    # NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): 1008 GB/s, BF16/FP32-acc 165.2,
    # FP8/FP32-acc 330.3 dense, 72 MB L2.
    "rtx-4090": GPUSpec("RTX 4090", _gb(24), 1008, 165.2, 330.3, 72),
    # NVIDIA RTX Blackwell GPU architecture whitepaper (RTX 5090): 1792 GB/s GDDR7, BF16/FP32-acc
    # 209.5, FP8/FP32-acc 419 dense, 96 MB L2.
    "rtx-5090": GPUSpec("RTX 5090", _gb(32), 1792, 209.5, 419.0, 96),
    # NVIDIA A10 datasheet: 24 GB GDDR6, 600 GB/s, BF16 125 TFLOPS dense (250 sparse); GA102: 6 MB L2.
    "a10": GPUSpec("A10", _gb(24), 600, 125.0, None, 6),
    # NVIDIA L4 datasheet: 24 GB, 300 GB/s, BF16 121 / FP8 242.5 dense (half the sparse figures); 48 MB L2.
    "l4": GPUSpec("L4", _gb(24), 300, 121.0, 242.5, 48),
    # NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, BF16 362 / FP8 733 dense; 96 MB L2.
    "l40s": GPUSpec("L40S", _gb(48), 864, 362.0, 733.0, 96),
    # NVIDIA A100 datasheet: 40 GB HBM2 1555 GB/s; 80 GB HBM2e 2039 GB/s (SXM); BF16 312 dense; 40 MB L2.
    "a100-40gb": GPUSpec("A100 40GB", _gb(40), 1555, 312.0, None, 40),
    "a100-80gb": GPUSpec("A100 80GB", _gb(80), 2039, 312.0, None, 40),
    # NVIDIA H100 datasheet: PCIe 80 GB 2.0 TB/s, BF16 756 / FP8 1513 dense;
    # SXM 80 GB 3.35 TB/s, BF16 989 / FP8 1979 dense (half the sparse figures); Hopper whitepaper: 50 MB L2.
    "h100-pcie": GPUSpec("H100 PCIe", _gb(80), 2000, 756.0, 1513.0, 50),
    "h100-sxm": GPUSpec("H100 SXM", _gb(80), 3350, 989.0, 1979.0, 50),
    # NVIDIA H200 datasheet: 141 GB HBM3e, 4.8 TB/s, same tensor rates as H100 SXM; 50 MB L2.
    "h200": GPUSpec("H200", _gb(141), 4800, 989.0, 1979.0, 50),
    # NVIDIA HGX B200 datasheet (per GPU): 180 GB HBM3e, 8 TB/s, BF16 2.25 / FP8 4.5 PFLOPS dense;
    # L2 126 MB (Blackwell architecture technical brief).
    "b200": GPUSpec("B200", _gb(180), 8000, 2250.0, 4500.0, 126),
}

_ALIASES = {"h100": "h100-sxm", "a100": "a100-80gb", "3090": "rtx-3090", "4090": "rtx-4090", "5090": "rtx-5090"}


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower()).replace("nvidia-", "").replace("geforce-", "")


def get_gpu(name: str) -> GPUSpec:
    key = _norm(name)
    key = _ALIASES.get(key, key)
    if key not in GPUS:
        raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (or 'auto', or 'cpu')")
    return GPUS[key]


def match_device_name(device_name: str) -> GPUSpec | None:
    """The table entry for a name as CUDA reports it (e.g. 'NVIDIA H100 80GB HBM3'), if any."""
    n = device_name.lower()
    if "h100" in n:
        return GPUS["h100-pcie" if "pcie" in n else "h100-sxm"]
    if "a100" in n:
        return GPUS["a100-40gb" if "40gb" in n else "a100-80gb"]
    # Longest names first, so "L40S" is not taken for "L4".
    for spec in sorted(GPUS.values(), key=lambda s: -len(s.name)):
        if spec.name.lower().replace("rtx ", "") in n:
            return spec
    return None
