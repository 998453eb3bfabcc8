"""One decoder for the Llama family (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2) and Gemma 3.

Gemma 3 differs only in a few places, each switched by its ModelConfig: embeddings scaled by
sqrt(hidden), four norms per layer (each weight 1 + w, folded in at load), GeGLU, interleaved
sliding / global layers with a RoPE table each, and its own attention scale.

The forward pass takes a flat batch of tokens from many sequences (no padding) and
the paged KV cache; the attention backend decides how the cache is read, the layer kernel
set (membound.layers, chosen once when the model is built) how norms, SiLU and RoPE run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from membound.attention.base import AttentionBackend, AttentionMetadata
from membound.errors import ConfigError, ModelLoadError
from membound.layers import LayerKernels, RMSNorm, RotaryEmbedding, apply_rope, choose_layer_kernels
from membound.layers.activation import gelu_tanh_and_mul
from membound.layers.invariant import RowTiled, rows_independent, serial_rows
from membound.layers.rotary import half_tables
from membound.model.config import ModelConfig, rope_inv_freq
from membound.quant.linear import DENSE_MIN_ROWS


class Linear(nn.Linear):
    """nn.Linear without its random init: the loader fills every weight (and kaiming_uniform_ on the
    meta device, where the loader builds the model, imports PyTorch's decompositions: 0.4 s of start-up)."""

    def reset_parameters(self) -> None:
        pass


def project(layer: nn.Module, x: torch.Tensor, dense_from: int | None) -> torch.Tensor:
    """layer(x), or for a packed layer with a dense path (quant.linear.Int4Linear.forward_rows on CPU)
    rows [dense_from:] through it: a prefill of many rows multiplies faster from a dequantized copy."""
    rows = None if dense_from is None else getattr(layer, "forward_rows", None)
    return layer(x) if rows is None else rows(x, dense_from)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, kernels: LayerKernels, layer: int = 0) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v projections fused into one matmul: one weight read, one launch.
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.backend = backend
        self.kernels = kernels
        self.scale = cfg.attention_scale
        self.sliding_window = cfg.layer_window(layer)

    def forward(
        self,
        rope: tuple[torch.Tensor, ...],
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, ...],
        meta: AttentionMetadata,
        dense_from: int | None = None,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = project(self.qkv_proj, x, dense_from)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        scales = kv_cache[2:] or None  # an int8 cache carries per-token scales
        if self.kernels.rope_write_kv is not None:
            # One kernel rotates q and k and writes k, v into their slots of the paged cache (one layout
            # for every backend), saving the rotated K's round trip; the backend then only reads.
            q = self.kernels.rope_write_kv(q, k, v, *rope, kv_cache[0], kv_cache[1], meta.slot_mapping, scales)
            out = self.backend.attend(q, kv_cache[0], kv_cache[1], meta, self.scale, self.sliding_window, scales)
        else:
            if self.q_norm is None:  # q and k side by side in qkv: rotate them in one go
                qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), *rope)
                q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            else:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.sliding_window, scales)
        return project(self.o_proj, out.reshape(t, self.q_size), dense_from)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: LayerKernels) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.kernels = kernels
        self.geglu = cfg.hidden_act == "gelu_pytorch_tanh"  # Gemma 3; PyTorch's op on every kernel set

    def forward(self, x: torch.Tensor, dense_from: int | None = None) -> torch.Tensor:
        gate_up = project(self.gate_up_proj, x, dense_from)
        h = gelu_tanh_and_mul(gate_up) if self.geglu else self.kernels.silu_and_mul(gate_up)
        return project(self.down_proj, h, dense_from)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, kernels: LayerKernels, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend, kernels, layer)
        # Llama: the norm before the MLP. Gemma 3: the norm of the attention output, before its add.
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.gemma:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.sandwich = cfg.gemma
        self.rope_local = cfg.layer_rope_local(layer)  # which of the model's RoPE tables this layer uses
        self.mlp = MLP(cfg, kernels)
        self.kernels = kernels

    def forward(self, rope, x, kv_cache, meta, residual: torch.Tensor | None = None, dense_from: int | None = None):
        """(this layer's MLP output, the residual stream before it): the residual add goes with the
        next norm (the next layer's, or the final one), one kernel in the Triton set."""
        add_rms_norm, ln1, ln2 = self.kernels.add_rms_norm, self.input_layernorm, self.post_attention_layernorm
        h, residual = add_rms_norm(x, residual, ln1.weight, ln1.eps)
        h = self.self_attn(rope, h, kv_cache, meta, dense_from)
        if not self.sandwich:
            h, residual = add_rms_norm(h, residual, ln2.weight, ln2.eps)
            return self.mlp(h, dense_from), residual
        pre, post = self.pre_feedforward_layernorm, self.post_feedforward_layernorm
        h = add_rms_norm(h, None, ln2.weight, ln2.eps)[0]
        h, residual = add_rms_norm(h, residual, pre.weight, pre.eps)
        return add_rms_norm(self.mlp(h, dense_from), None, post.weight, post.eps)[0], residual


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
        layer_kernels: LayerKernels | None = None,
        rope: RotaryEmbedding | None = None,
        rope_local: RotaryEmbedding | None = None,
    ) -> None:
        """layer_kernels: the norm / activation / RoPE implementations; by default the Triton set
        exactly when `backend` is the Triton attention backend (membound.layers.choose_layer_kernels).
        rope: tables already computed (the loader builds the model on meta, where computing them
        would pull in PyTorch's meta kernels: ~0.8 s of start-up); rope_local: the same for Gemma 3's
        sliding layers' table."""
        super().__init__()
        self.config = cfg
        self.attention_backend = backend  # its metadata and graph hooks are the runner's to use
        self.layer_kernels = layer_kernels or choose_layer_kernels("auto", backend.name)
        kernels = self.layer_kernels
        self.rope = rope or RotaryEmbedding(rope_inv_freq(cfg, rope_freq_factors), max_positions)
        # Gemma 3's sliding layers rotate with a second table (another base, never scaled).
        self.rope_local = None
        if any(cfg.layer_rope_local(i) for i in range(cfg.num_layers)):
            self.rope_local = rope_local or RotaryEmbedding(rope_inv_freq(cfg, local=True), max_positions)
        # sqrt(hidden) in the run dtype, as HF rounds it (Gemma 3; 1 elsewhere).
        self.embed_scale = cfg.hidden_size**0.5 if cfg.gemma else None
        # No init: the loader fills it (and nn.Embedding's normal_ on meta would import torch._dynamo, 1.2 s).
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend, kernels, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.batch_invariant = False  # make_batch_invariant() turns it on
        self._logits = self._head_logits

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden]."""
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        ropes = [self.rope(positions, x.dtype)]
        if self.rope_local is not None:
            ropes.append(self.rope_local(positions, x.dtype))
        if self.layer_kernels.rope_write_kv is not None:
            rows = torch.arange(x.shape[0], device=x.device)  # the fused kernel looks cos/sin up by row
            ropes = [(*half_tables(*r), rows) for r in ropes]
        residual = None
        # Prefill rows past the decodes go through dense matmuls when there are enough of them (see
        # project); decode rows stay on the packed kernels, so they never depend on their batch.
        # Batch-invariant: one kernel for every row, whatever the step holds.
        prefill_rows = x.shape[0] - meta.num_decodes
        dense = prefill_rows >= DENSE_MIN_ROWS and not self.batch_invariant
        dense_from = meta.num_decodes if dense else None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(ropes[layer.rope_local], x, kv, meta, residual, dense_from)
        return self.layer_kernels.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    @property
    def run_dtype(self) -> torch.dtype:
        """The activations' dtype (not every parameter's: Gemma's norm weights stay fp32)."""
        e = self.embed_tokens
        return e.weight.dtype if isinstance(e, nn.Embedding) else e.out_dtype

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._logits(hidden)

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden).float()  # nn.Linear, or a packed layer (membound.quant)
        if isinstance(self.embed_tokens, nn.Embedding):
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.embed_tokens.logits(hidden).float()  # a packed embedding (quant.linear.Int8Embedding)

    def make_batch_invariant(self, max_rows: int, max_logit_rows: int) -> list[str]:
        """Give every row the same result whatever else the step holds (the attention backend's part is
        its own): no dense prefill path, and each matmul whose BLAS picks its kernel by row count
        (rows_independent, checked once per shape on random rows up to max_rows) called on fixed tiles.
        Returns the names of the tiled layers. Call once the weights are loaded."""
        self.batch_invariant = True
        dtype = self.run_dtype
        verdicts: dict[tuple, bool] = {}

        def independent(fn, key, in_features: int, rows: int) -> bool:
            if key not in verdicts:
                verdicts[key] = rows_independent(fn, in_features, dtype, rows)
            return verdicts[key]

        tiled = []
        silu_and_mul = self.layer_kernels.silu_and_mul
        kernels = dataclasses.replace(self.layer_kernels, silu_and_mul=lambda x: serial_rows(silu_and_mul, x))
        self.layer_kernels = kernels
        for module in self.modules():
            if isinstance(module, MLP):
                module.kernels = kernels
        for name, module in list(self.named_modules()):
            for attr in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                layer = getattr(module, attr, None)
                if not isinstance(layer, nn.Module) or isinstance(layer, RowTiled):
                    continue
                key = (type(layer), layer.in_features, layer.out_features, getattr(layer, "group_size", None))
                if not independent(layer, key, layer.in_features, max_rows):
                    setattr(module, attr, self._tiled(layer, f"{name}.{attr}", layer.in_features, max_rows))
                    tiled.append(f"{name}.{attr}")
        if not independent(self._head_logits, ("head",), self.config.hidden_size, max_logit_rows):
            self._logits = self._tiled(self._head_logits, "the output head", self.config.hidden_size, max_logit_rows)
            tiled.append("head")
        return tiled

    def _tiled(self, fn, what: str, in_features: int, max_rows: int) -> RowTiled:
        tiled = RowTiled(fn)
        if not rows_independent(tiled, in_features, self.run_dtype, max_rows):
            raise ConfigError(
                f"batch_invariant: {what} gives a row different results with the rows beside it even on "
                "fixed tiles on this machine's BLAS; run without batch_invariant"
            )
        return tiled

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
            if cfg.gemma and target.endswith("norm.weight"):
                tensor = tensor.float() + 1.0  # Gemma scales by 1 + w: folded in once, here
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
