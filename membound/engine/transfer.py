"""Host-to-device copies that never stall the host.

`torch.tensor(values, device="cuda")` copies from pageable memory and then synchronizes the
stream, so the host waits for every kernel already queued: with async scheduling that would
wait for the step in flight. Going through (cached) pinned memory with a non-blocking copy
keeps the upload in stream order without blocking the host.
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(dtype)
    return host.to(dtype).pin_memory().to(device, non_blocking=True)
