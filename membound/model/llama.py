"""One Llama-family decoder: Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

The forward pass takes a flat batch of tokens from many sequences (no padding) and
the paged KV cache; the attention backend decides how the cache is read.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from membound.attention.base import AttentionBackend, AttentionMetadata
from membound.errors import ModelLoadError
from membound.model.config import ModelConfig, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 whatever the run dtype, as the reference models do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Neox-style rotation (halves of each head), cos/sin tables precomputed."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int) -> None:
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each position, [T, 1, head_dim / 2]; looked up once per step, not per layer."""
        return self.cos[positions][:, None, :].to(dtype), self.sin[positions][:, None, :].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by position: neox style, on the two halves of each head."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v projections fused into one matmul: one weight read, one launch.
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.backend = backend
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_window

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, ...],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        scales = kv_cache[2:] or None  # an int8 cache carries per-token scales
        if getattr(self.backend, "fused", False):
            # One kernel rotates q and k and writes k, v into their cache slots; attention then only reads.
            from membound.kernels.fused import rope_write_kv

            cos, sin, rows = rope
            q = rope_write_kv(q, k, v, cos, sin, rows, kv_cache[0], kv_cache[1], meta.slot_mapping, scales)
            out = self.backend.attend(q, kv_cache[0], kv_cache[1], meta, self.scale, self.sliding_window, scales)
        else:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.sliding_window, scales)
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, fused: bool = False) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from membound.kernels.fused import silu_and_mul

            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.fused = getattr(backend, "fused", False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, self.fused)

    def forward(self, rope, x, kv_cache, meta, residual: torch.Tensor | None = None):
        """Returns (x, None) unfused; fused, (this layer's MLP output, the residual stream before it),
        so the next layer's add + norm is one kernel."""
        if not self.fused:
            x = x + self.self_attn(rope, self.input_layernorm(x), kv_cache, meta)
            return x + self.mlp(self.post_attention_layernorm(x)), None
        from membound.kernels.fused import add_rmsnorm

        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        h, residual = add_rmsnorm(x, residual, ln1.weight, ln1.eps)
        h, residual = add_rmsnorm(self.self_attn(rope, h, kv_cache, meta), residual, ln2.weight, ln2.eps)
        return self.mlp(h), residual


# Which slice of a fused parameter each HF checkpoint name fills.
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        backend: AttentionBackend,
        max_positions: int,
        rope_freq_factors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.rope = RotaryEmbedding(rope_inv_freq(cfg, rope_freq_factors), max_positions)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden]."""
        x = self.embed_tokens(input_ids)
        rope = self.rope(positions, x.dtype)
        if not self.layers or not self.layers[0].fused:
            for layer, kv in zip(self.layers, kv_caches, strict=True):
                x, _ = layer(rope, x, kv, meta)
            return self.norm(x)
        from membound.kernels.fused import add_rmsnorm

        cos, sin = rope
        rows = torch.arange(x.shape[0], device=x.device)  # the fused kernel looks cos/sin up by row
        rope = (cos[:, 0], sin[:, 0], rows)
        residual = None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(rope, x, kv, meta, residual)
        return add_rmsnorm(x, residual, self.norm.weight, self.norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden).float()  # nn.Linear, or a packed layer (membound.quant)
        if isinstance(self.embed_tokens, nn.Embedding):
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.embed_tokens.logits(hidden).float()  # a packed embedding (quant.linear.Int8Embedding)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in, filling fused q/k/v and gate/up slices."""
        params = dict(self.named_parameters())
        filled: set[str] = set()
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        fused_splits = {"qkv_proj": [q, kv, kv], "gate_up_proj": [cfg.intermediate_size] * 2}
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the output projection
            target, shard = name, None
            for part, (fused, idx) in _STACKED.items():
                if f".{part}." in name:
                    target, shard = name.replace(part, fused), idx
                    break
            if target not in params:
                raise ModelLoadError(f"checkpoint has a tensor the model does not use: {name}")
            param = params[target]
            dest = param.data
            if shard is not None:
                sizes = fused_splits[target.split(".")[-2]]
                start = sum(sizes[:shard])
                dest = dest.narrow(0, start, sizes[shard])
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            filled.add(f"{target}#{shard}")
        expected = set()
        for pname, _ in params.items():
            fused = pname.split(".")[-2] if pname.endswith(".weight") or pname.endswith(".bias") else ""
            if fused in fused_splits:
                expected.update(f"{pname}#{i}" for i in range(len(fused_splits[fused])))
            else:
                expected.add(f"{pname}#None")
        missing = sorted(expected - filled)
        if missing:
            raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[0].split('#')[0]}")
