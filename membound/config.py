"""Engine configuration: one typed dataclass, validated where the user hands it in."""

from __future__ import annotations

import dataclasses
import logging

import torch

from membound.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30
QUANTIZATIONS = ("auto", "gguf", "none", "int8", "int4", "fp8")

log = logging.getLogger("membound")


# Prefill tokens per step beside running decodes, by device. CPU: measured with
# benchmarks/cpu_prefill_interference.py (SmolLM2, 8 decodes, a 4,096-token prompt: p99 step
# 1.44x with 8 tokens, 2.3x with 16, 16x with 256, 117x uncapped). CUDA: a decode step is
# memory-bound, so a few hundred extra tokens cost little; not measured yet.
DEFAULT_LONG_PREFILL_THRESHOLD = {"cpu": 8, "cuda": 512}


SPEC_METHODS = ("ngram",)


@dataclasses.dataclass
class SpeculativeConfig:
    """Speculative decoding, in vLLM's shape. ngram: drafts from the longest recent n-gram match
    (prompt_lookup_min..prompt_lookup_max tokens) in the sequence's own prompt and output."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    # A sequence drafts while 1 + its accepted drafts per drafting step (over its last
    # `adaptive_window` such steps) beat the measured cost of a drafting step in plain steps, and
    # at least 1 + this (engine/speculator.py).
    min_accepted_per_step: float = 0.5
    adaptive_window: int = 8

    @classmethod
    def from_value(cls, value: SpeculativeConfig | dict | None) -> SpeculativeConfig | None:
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"speculative_config must be a dict such as {{'method': 'ngram', ...}}, got {value!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if value.get("method") == "draft_model" or "model" in unknown:
            raise ConfigError(
                "speculative_config method 'draft_model' (a second model) is not supported yet; method 'ngram' is"
            )
        if unknown:
            raise ConfigError(f"speculative_config has unknown fields {unknown}; allowed: {', '.join(sorted(names))}")
        return cls(**value)

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ConfigError(
                f"speculative_config.method must be one of {', '.join(SPEC_METHODS)}, got {self.method!r}"
            )
        for name, lo, hi in (
            ("num_speculative_tokens", 1, 16),
            ("prompt_lookup_min", 1, 64),
            ("prompt_lookup_max", 1, 64),
            ("adaptive_window", 1, 1024),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"speculative_config.{name} must be an integer in [{lo}, {hi}], got {v!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(
                f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )
        m = self.min_accepted_per_step
        if isinstance(m, bool) or not isinstance(m, int | float) or not 0 <= m <= 16:
            raise ConfigError(f"speculative_config.min_accepted_per_step must be a number in [0, 16], got {m!r}")


@dataclasses.dataclass
class EngineConfig:
    """Knobs named as vLLM names them, so users can carry their settings over.

    model: GGUF file, HF folder, or (with load_format="dummy") a preset name; None is
    the embedded SmolLM2-135M-Instruct.
    """

    model: str | None = None
    # auto: bf16 on CUDA (fp16 if bf16 is unsupported); on CPU bf16 where the CPU has bf16 in hardware
    # and the weights run on the packed kernels (which take bf16), else fp32 (see resolve_dtype).
    dtype: str = "auto"
    device: str = "auto"
    # None: the model's own context length. "auto": the longest (whole blocks, at most the model's) at
    # which target_concurrency sequences fit in the KV budget, chosen at start-up (costs.fit_context).
    max_model_len: int | str | None = None
    # max_model_len="auto" only: sequences that must fit at once at the chosen length (None: 1). With
    # kv_cache_dtype "auto" the KV precision is chosen too: the run dtype if the model's full context
    # fits, else the narrowest the attention backend reads (fp8 on PyTorch, int8 on Triton) if it
    # allows a longer one. max_num_seqs is raised to it if lower.
    target_concurrency: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # explicit KV budget; CPU default 2 GiB
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    # While sequences decode, prompts get at most this many tokens per step together (chunked
    # prefill only), so a long prompt does not stretch their inter-token latency. None: the
    # device's default (DEFAULT_LONG_PREFILL_THRESHOLD, chosen by
    # benchmarks/cpu_prefill_interference.py); 0: off (what `LLM`, the offline API, uses).
    long_prefill_token_threshold: int | None = None
    seed: int = 0
    load_format: str = "auto"  # "auto" or "dummy" (random weights)
    attention_backend: str = "auto"
    skip_tokenizer_init: bool = False
    enforce_eager: bool = False
    async_scheduling: bool | None = None  # schedule step N+1 while step N runs; None: on for CUDA
    # auto: "gguf" for a GGUF file, else "none". gguf: keep the file's quantized blocks packed
    # (quant/gguf_blocks.py). none (or None): dequantize everything to `dtype`. int8 / int4 / fp8:
    # decoder-layer weights quantized at load by round-to-nearest (int4 on a Q4 GGUF: its blocks).
    quantization: str | None = "auto"
    # auto: the run dtype (max_model_len="auto" may choose a narrower one: target_concurrency);
    # fp8: float8 e4m3 (scale 1); int8: codes + an fp32 scale per token and head
    kv_cache_dtype: str = "auto"
    # CPU intra-op threads. None: the cores this process may use (affinity mask, cgroup quota), one
    # fewer while other processes keep one busy (membound/cpu.py ThreadGovernor); N: exactly N.
    num_threads: int | None = None
    # Every token's logits the same whatever else is in its step and however its prompt was chunked,
    # so a seeded request gives the same tokens alone or under any load (CPU; costs prefill speed:
    # docs/benchmarks.md). Off: the kernels are chosen per step's shape and results may differ in the
    # last bits, which sampling at temperature > 0 can turn into different tokens.
    batch_invariant: bool = False
    # Speculative decoding ({"method": "ngram", "num_speculative_tokens": k, ...}; None: off). Steps
    # then run one at a time (drafts need the previous step's tokens): async_scheduling is off.
    speculative_config: SpeculativeConfig | dict | None = None

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")

        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            positive(name)
        if isinstance(self.max_model_len, str):
            if self.max_model_len != "auto":
                raise ConfigError(
                    f"max_model_len must be a positive integer, 'auto' or None, got {self.max_model_len!r}"
                )
            if self.target_concurrency is None:
                self.target_concurrency = 1
        elif self.max_model_len is not None:
            positive("max_model_len")
        if self.target_concurrency is not None:
            if self.max_model_len != "auto":
                raise ConfigError(
                    f"target_concurrency ({self.target_concurrency!r}) sizes max_model_len='auto'; "
                    f"give max_model_len='auto' with it (max_model_len is {self.max_model_len!r})"
                )
            positive("target_concurrency")
            if self.max_num_seqs < self.target_concurrency:
                if self.max_num_batched_tokens < self.target_concurrency:
                    raise ConfigError(
                        f"target_concurrency ({self.target_concurrency}) needs max_num_batched_tokens "
                        f"({self.max_num_batched_tokens}) at least as large, so every sequence can decode each step"
                    )
                log.info(
                    "max_num_seqs raised from %d to target_concurrency=%d, so that many run at once",
                    self.max_num_seqs,
                    self.target_concurrency,
                )
                self.max_num_seqs = self.target_concurrency
        if self.kv_cache_memory_bytes is not None:
            positive("kv_cache_memory_bytes")
        if self.num_threads is not None:
            positive("num_threads")
        t = self.long_prefill_token_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 0):
            raise ConfigError(f"long_prefill_token_threshold must be a non-negative integer (0: off), got {t!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Otherwise decodes past the budget would wait behind the same others every step.
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}) so every running sequence can decode each step"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if dtype != "auto" and dtype not in DTYPES:
            raise ConfigError(f"dtype must be auto, {', '.join(DTYPES)} (or fp32/fp16/bf16), got {self.dtype!r}")
        self.dtype = dtype
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.quantization is None:
            self.quantization = "none"
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be {', '.join(QUANTIZATIONS)} (or None), got {self.quantization!r}")
        if self.kv_cache_dtype not in ("auto", "fp8", "int8"):
            raise ConfigError(f"kv_cache_dtype must be auto, fp8 or int8, got {self.kv_cache_dtype!r}")
        if self.async_scheduling not in (None, True, False):
            raise ConfigError(f"async_scheduling must be True, False or None (auto), got {self.async_scheduling!r}")
        if not isinstance(self.batch_invariant, bool):
            raise ConfigError(f"batch_invariant must be True or False, got {self.batch_invariant!r}")
        self.speculative_config = SpeculativeConfig.from_value(self.speculative_config)
        if self.speculative_config is not None:
            if self.async_scheduling:
                raise ConfigError(
                    "speculative_config needs each step's tokens before the next is drafted: "
                    "leave async_scheduling off (None or False)"
                )
            if self.batch_invariant:
                raise ConfigError("speculative_config and batch_invariant cannot be combined yet")
            self.async_scheduling = False
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format must be auto or dummy, got {self.load_format!r}")

    def prefill_chunk_cap(self, device: torch.device) -> int:
        """Tokens a prompt may take per step beside decodes (0: no cap)."""
        t = self.long_prefill_token_threshold
        return DEFAULT_LONG_PREFILL_THRESHOLD.get(device.type, 512) if t is None else t

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda was asked for but this torch build sees no CUDA GPU")
        return dev

    def torch_dtype(self, device: torch.device, packed_weights: bool = False) -> torch.dtype:
        """The run dtype. packed_weights: the decoder's matrices run on the packed int4/int8 CPU
        kernels (a GGUF's blocks, or int4/int8), which compute in bf16 whatever they are given."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        from membound.cpu import has_native_bf16

        # bf16 end to end saves a cast on each side of every packed matmul and halves the bytes of
        # every other op; without hardware bf16, PyTorch emulates it and fp32 is faster.
        return torch.bfloat16 if packed_weights and has_native_bf16() else torch.float32
