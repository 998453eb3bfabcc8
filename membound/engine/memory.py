"""How many KV blocks fit: the start-up memory arithmetic, logged for the user.

The byte counts (KV per token and block, the budget arithmetic) are the cost model's
(membound/costs.py), the same `membound plan` uses; this module adds what only the running
engine knows: free device memory, the measured activation peak, other processes' share.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from membound import costs
from membound.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from membound.engine.kv_cache import KVCacheSpec
from membound.errors import ConfigError

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    weight_bytes: int
    activation_peak_bytes: int
    kv_bytes: int
    num_blocks: int
    kv_tokens: int
    max_concurrency: float  # sequences of max_model_len that fit at once

    def describe(self, max_model_len: int) -> str:
        return (
            f"weights {self.weight_bytes / GiB:.3f} GiB, activation peak {self.activation_peak_bytes / GiB:.3f} GiB, "
            f"KV cache {self.kv_bytes / GiB:.3f} GiB = {self.num_blocks} blocks = {self.kv_tokens} tokens; "
            f"max concurrency at max_model_len={max_model_len}: {self.max_concurrency:.2f}x"
        )


def kv_budget_bytes(config: EngineConfig, device: torch.device, weight_bytes: int, activation_peak: int) -> int:
    if config.kv_cache_memory_bytes is not None:
        return config.kv_cache_memory_bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # What others hold counts against the budget too: target = utilization x total.
        used_by_others = total - free - torch.cuda.memory_reserved(device)
        budget = costs.kv_budget_bytes(
            total, config.gpu_memory_utilization, weight_bytes, used_by_others + activation_peak
        )
        # Never plan past what is actually free now (another engine in this process, say).
        budget = min(
            budget, free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) - activation_peak
        )
        if budget <= 0:
            raise ConfigError(
                f"no memory left for the KV cache: {config.gpu_memory_utilization:.0%} of {total / GiB:.1f} GiB "
                f"minus weights {weight_bytes / GiB:.2f} GiB, activations {activation_peak / GiB:.2f} GiB "
                f"and {used_by_others / GiB:.2f} GiB used by other processes; raise gpu_memory_utilization "
                "or lower max_num_batched_tokens"
            )
        return budget
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        physical = 4 * DEFAULT_CPU_KV_CACHE_BYTES
    return costs.cpu_kv_budget_bytes(physical, DEFAULT_CPU_KV_CACHE_BYTES)


def plan_memory(
    config: EngineConfig,
    spec: KVCacheSpec,
    device: torch.device,
    weight_bytes: int,
    activation_peak: int,
    max_model_len: int,
    budget: int | None = None,
) -> MemoryPlan:
    """`budget`: the KV budget if already measured (max_model_len="auto" chose the length from it)."""
    if budget is None:
        budget = kv_budget_bytes(config, device, weight_bytes, activation_peak)
    num_blocks = costs.kv_blocks(budget, spec.bytes_per_block)
    kv_tokens = num_blocks * spec.block_size
    if kv_tokens < max_model_len:
        raise ConfigError(
            f"the KV cache holds {kv_tokens} tokens ({budget / GiB:.3f} GiB at "
            f"{spec.bytes_per_token} bytes/token) but one sequence of max_model_len={max_model_len} "
            "needs more; lower max_model_len or give the cache more memory"
        )
    return MemoryPlan(
        weight_bytes=weight_bytes,
        activation_peak_bytes=activation_peak,
        kv_bytes=num_blocks * spec.bytes_per_block,
        num_blocks=num_blocks,
        kv_tokens=kv_tokens,
        max_concurrency=kv_tokens / max_model_len,
    )
