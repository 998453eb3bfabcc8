"""The model's shape, read from a HF config.json or GGUF metadata and validated."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from membound.errors import ConfigError, ModelLoadError

# HF `architectures` names this decoder implements, and what each turns on.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Special tokens that end an assistant turn where the model's EOS does not (Gemma's chat turns end with
# <end_of_turn>, its EOS is <eos>): generation stops at them too, as at HF's generation_config EOS list.
TURN_END_TOKENS = {"gemma3": ("<end_of_turn>",)}


GEMMA3_LOCAL_ROPE_THETA = 10_000.0  # Gemma 3's sliding layers' RoPE base (GGUFs do not store it)


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's interleave: every `pattern`-th layer attends globally, the others in the window."""
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers))


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about a Llama-family model (or Gemma 3)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    sliding_window: int | None = None  # Mistral v0.1; Gemma 3's local layers
    hidden_act: str = "silu"  # Gemma 3: gelu_pytorch_tanh (GeGLU)
    # Gemma 3: each layer's kind ("sliding_attention" layers use sliding_window and rope_local_theta);
    # empty: every layer alike.
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' RoPE base, never scaled
    query_pre_attn_scalar: float | None = None  # Gemma 3: scores scale by its -1/2 power, not head_dim's
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unknown architecture {self.architecture!r}; supported: " + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ModelLoadError(
                f"model config: activation {self.hidden_act!r} is not supported; supported: "
                + ", ".join(SUPPORTED_ACTIVATIONS)
            )
        if self.layer_types:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ModelLoadError(
                    f"model config: layer_types must list one of {LAYER_TYPES} per layer "
                    f"({self.num_layers}), got {list(self.layer_types)!r}"
                )
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ModelLoadError("model config: sliding_attention layers need a positive sliding_window")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ModelLoadError(
                f"model config: sliding_window must be a positive integer, got {self.sliding_window!r}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"rope scaling type {rope_type!r} is not supported; supported: " + ", ".join(SUPPORTED_ROPE_TYPES)
            )

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def gemma(self) -> bool:
        """Gemma 3's decoder: embeddings scaled by sqrt(hidden), four norms per layer (norm, attend,
        norm, add; norm, MLP, norm, add), every norm's weight taken as 1 + w."""
        return self.family == "gemma3"

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of this layer's attention (None: the whole context)."""
        if self.layer_types:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        return self.sliding_window

    def layer_rope_local(self, layer: int) -> bool:
        """Whether this layer rotates with the local RoPE table (Gemma 3's sliding layers)."""
        return self.rope_local_theta is not None and self.layer_window(layer) is not None

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def kv_bytes_per_token(self) -> int:
        """Per-token KV bytes per unit of element size (multiply by dtype bytes)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + (4 if self.gemma else 2) * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a HF `config.json` dict, naming the supported set on failure."""
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unknown architecture {archs or cfg.get('model_type')!r}; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            head_dim = cfg.get("head_dim") or hidden // num_heads
            family = SUPPORTED_ARCHITECTURES[arch]
            if family == "qwen2" and cfg.get("use_sliding_window"):
                raise ModelLoadError("Qwen2 with use_sliding_window=true is not supported")
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            rope_scaling = cfg.get("rope_scaling")
            rope_theta = cfg.get("rope_theta")
            # transformers 5 folds rope settings into `rope_parameters`.
            params = cfg.get("rope_parameters")
            gemma = _gemma3_fields(cfg, num_layers=int(cfg["num_hidden_layers"])) if family == "gemma3" else {}
            if gemma:
                rope_theta, rope_scaling = gemma.pop("rope_theta"), gemma.pop("rope_scaling")
            elif isinstance(params, dict):
                rope_theta = rope_theta or params.get("rope_theta")
                if params.get("rope_type", "default") != "default":
                    rope_scaling = rope_scaling or params
            if rope_scaling is not None:
                rope_scaling = dict(rope_scaling)
                rope_scaling.setdefault("rope_type", rope_scaling.get("type", "default"))
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta or 10000.0),
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family == "gemma3")),
                # Qwen2 always has q/k/v bias; its config leaves the field unset.
                attention_bias=bool(
                    cfg.get("attention_bias") if cfg.get("attention_bias") is not None else family == "qwen2"
                ),
                qk_norm=family in ("qwen3", "gemma3"),
                sliding_window=cfg.get("sliding_window") if family in ("mistral", "gemma3") else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                **gemma,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json is missing the required field {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError | ModelLoadError):
                raise
            raise ModelLoadError(f"config.json has a malformed value: {e}") from e


def _gemma3_fields(cfg: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Gemma 3's own config.json fields (transformers 4.5x and 5.x spell the RoPE bases differently)."""
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(cap) is not None:
            raise ModelLoadError(f"Gemma 3 with {cap}={cfg[cap]!r} is not supported (its released configs have none)")
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # transformers 5: one entry per layer kind
        full, local = params["full_attention"], params.get("sliding_attention", {})
        theta, local_theta = full.get("rope_theta"), local.get("rope_theta")
        scaling = dict(full) if full.get("rope_type", "default") != "default" else None
    else:
        theta, local_theta = cfg.get("rope_theta"), cfg.get("rope_local_base_freq")
        scaling = cfg.get("rope_scaling")
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
    layer_types = cfg.get("layer_types") or gemma3_layer_types(num_layers, int(cfg.get("sliding_window_pattern", 6)))
    return {
        "rope_theta": float(theta or 1_000_000.0),
        "rope_scaling": scaling,
        "rope_local_theta": float(local_theta or GEMMA3_LOCAL_ROPE_THETA),
        "layer_types": tuple(layer_types),
        "hidden_act": cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
        "query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or 256),
    }


def rope_inv_freq(config: ModelConfig, freq_factors: torch.Tensor | None = None, local: bool = False) -> torch.Tensor:
    """Inverse frequencies (fp32) of the rotary embedding, with Llama 3 / linear scaling
    (local: Gemma 3's sliding layers' table, at rope_local_theta, unscaled).

    Computed in fp32 torch the way HF does, so positions rotate identically.
    `freq_factors` are llama.cpp's per-dimension divisors (GGUF `rope_freqs`), which
    encode the same Llama 3 scaling numerically.
    """
    d = config.head_dim
    base = config.rope_local_theta if local else config.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if local:  # Gemma 3's sliding layers: the plain table, whatever scales the global one
        return inv
    if freq_factors is not None:
        return inv / freq_factors.to(device=inv.device, dtype=torch.float32)
    rs = config.rope_scaling or {}
    kind = rs.get("rope_type", "default")
    if kind == "linear":
        return inv / float(rs["factor"])
    if kind == "llama3":
        factor = float(rs["factor"])
        low = float(rs.get("low_freq_factor", 1.0))
        high = float(rs.get("high_freq_factor", 4.0))
        old_len = float(rs.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv
