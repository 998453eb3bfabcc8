"""Load a model from a HF safetensors folder, a GGUF file, or random (dummy) weights."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Iterator, Set

import numpy as np
import torch
from tqdm.auto import tqdm

from membound.attention.base import AttentionBackend
from membound.errors import ConfigError, ModelLoadError
from membound.layers import RMSNorm, choose_layer_kernels
from membound.model.config import GEMMA3_LOCAL_ROPE_THETA, ModelConfig, gemma3_layer_types, rope_inv_freq
from membound.model.llama import LlamaForCausalLM, RotaryEmbedding
from membound.model.registry import PRESETS, default_model_path, get_preset
from membound.quant.linear import linear_weight_bytes, quantize_model

log = logging.getLogger(__name__)

_GGUF_ARCH = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}

# llama.cpp tensor names -> HF names (per layer, after "blk.N.").
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 names its four norms per layer after where they sit; llama.cpp's ffn_norm is the one before the MLP.
_GGUF_GEMMA3_NAMES = {
    **_GGUF_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What `--model` resolved to."""

    kind: str  # "gguf", "hf" or "dummy"
    path: str | None  # file or folder; None for a named dummy preset
    name: str  # shown in logs and as the served model name


def resolve_model(model: str | None, load_format: str = "auto") -> ModelSource:
    """Turn `--model` (None = the embedded default) into a ModelSource."""
    if load_format not in ("auto", "dummy"):
        raise ModelLoadError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    if model is None:
        model = default_model_path()
    if load_format == "dummy" and model.lower() in PRESETS:
        return ModelSource("dummy", None, model.lower())
    p = pathlib.Path(model).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{p} is a file but not a .gguf; pass a GGUF file or a HF model folder")
        return ModelSource("dummy" if load_format == "dummy" else "gguf", str(p), p.stem)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} has no config.json; a HF model folder needs config.json and *.safetensors")
        return ModelSource("dummy" if load_format == "dummy" else "hf", str(p), p.name)
    hint = f" or a preset with load_format='dummy' ({', '.join(PRESETS)})"
    raise ModelLoadError(f"model {model!r} not found: pass a GGUF file, a HF model folder{hint}")


# ---------------------------------------------------------------- HF folders


def hf_config(path: str) -> ModelConfig:
    try:
        raw = json.loads((pathlib.Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}/config.json: {e}") from e
    return ModelConfig.from_hf(raw)


def hf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    files = sorted(pathlib.Path(path).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors files")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{f} is not a readable safetensors file: {e}") from e


# ---------------------------------------------------------------- GGUF files


def _metadata_reader(path: str):
    """gguf.GGUFReader that does not unpack the big metadata arrays (the 49k-entry vocab, merges,
    scores: 2.7 s of start-up as one numpy view per element): string arrays past `_EAGER_ITEMS`
    entries are skipped over, keeping only their length (`GGUFFile.array_length`), and numeric
    arrays become one view. The tokenizer is built from the file by transformers, once, and cached.

    It also says what is wrong with a damaged file (ModelLoadError) where gguf would fail on a numpy
    slice or reshape: where a truncated file ends against what its header or a tensor needs, and
    a tensor type id this gguf version does not know."""
    from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType

    known_types = {int(t): t for t in GGML_QUANT_SIZES}

    class MetadataReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > self.data.size:  # numpy would hand back a short view, to fail later as a shape error
                raise ModelLoadError(
                    f"{path} is truncated (or corrupt): its header needs bytes up to {end} "
                    f"but the file has {self.data.size} bytes"
                )
            return super()._get(offset, dtype, count, override_order)

        def _build_tensors(self, start_offs, fields):
            for field in fields:  # check every tensor before gguf builds views of them
                _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                ggml_type = known_types.get(int(raw_dtype[0]))
                if ggml_type is None:
                    raise ModelLoadError(
                        f"{path}: unsupported tensor type id {int(raw_dtype[0])} (tensor {name}): not a ggml type "
                        f"this gguf package ({len(known_types)} types) knows; a file from a newer llama.cpp?"
                    )
                block, type_size = GGML_QUANT_SIZES[ggml_type]
                end = int(start_offs + offset_tensor[0]) + int(np.prod(dims, dtype=np.uint64)) * type_size // block
                if end > self.data.size:
                    raise ModelLoadError(
                        f"{path} is truncated: tensor {name} needs bytes up to {end} "
                        f"but the file has {self.data.size} bytes"
                    )
            super()._build_tensors(start_offs, fields)

        def _get_field_parts(self, orig_offs, raw_type):
            if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            sub, n, offs = GGUFValueType(itype[0]), int(alen[0]), orig_offs + 12
            nptype = self.gguf_scalar_to_np.get(sub)
            if nptype is not None:  # one view of the whole array, which contents() reads as a list
                values = self._get(offs, nptype, n)
                return 12 + int(values.nbytes), [itype, alen, values], [2] if n else [], [GGUFValueType.ARRAY, sub]
            if sub != GGUFValueType.STRING or n <= _EAGER_ITEMS:
                return super()._get_field_parts(orig_offs, raw_type)
            raw = memoryview(self.data)
            for _ in range(n):  # walk the length prefixes only
                offs += 8 + int.from_bytes(raw[offs : offs + 8], "little")
            return offs - orig_offs, [itype, alen], [], [GGUFValueType.ARRAY, sub]

    return MetadataReader(path)


_EAGER_ITEMS = 4096


class GGUFFile:
    """Metadata and tensors of a GGUF file, read with the `gguf` package."""

    def __init__(self, path: str) -> None:
        try:
            self.reader = _metadata_reader(path)
        except ModelLoadError:
            raise
        except Exception as e:  # gguf raises bare ValueError/struct errors on corrupt files
            raise ModelLoadError(f"{path} is not a valid GGUF file: {e}") from e
        self.path = path
        self.arch = str(self.field("general.architecture"))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def release_pages(self, *names: str) -> None:
        """Drop these tensors' pages of the file mapping from this process (the OS keeps them cached):
        once a tensor is packed, its file pages only add to the peak RSS (98 MB for the default model).
        Reading the tensor again faults them back in."""
        import mmap

        mm = getattr(self.reader.data, "_mmap", None)  # numpy.memmap's mapping
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        for name in names:
            t = self.tensors[name]
            start = t.data_offset - t.data_offset % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, start, t.data_offset + int(t.n_bytes) - start)

    def array_length(self, key: str) -> int | None:
        """Entries of an array field (also of one whose entries were skipped)."""
        f = self.reader.fields.get(key)
        return None if f is None or len(f.parts) < 5 else int(f.parts[4][0])

    def config(self) -> ModelConfig:
        a = self.arch
        if a not in _GGUF_ARCH:
            raise ModelLoadError(f"unknown GGUF architecture {a!r}; supported: {', '.join(_GGUF_ARCH)}")
        heads = int(self.field(f"{a}.attention.head_count"))
        hidden = int(self.field(f"{a}.embedding_length"))
        vocab = self.field(f"{a}.vocab_size") or self.array_length("tokenizer.ggml.tokens")
        scaling = None
        if self.field(f"{a}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(self.field(f"{a}.rope.scaling.factor"))}
        eos = self.field("tokenizer.ggml.eos_token_id")
        gemma = {}
        if a == "gemma3":
            layers = int(self.field(f"{a}.block_count"))
            # llama.cpp scales Gemma 3 27B's scores by its hidden size per head, every other size by head_dim.
            per_head = hidden // heads if layers == 62 else self.field(f"{a}.attention.key_length", hidden // heads)
            gemma = {
                "hidden_act": "gelu_pytorch_tanh",
                "layer_types": gemma3_layer_types(layers),
                "rope_local_theta": GEMMA3_LOCAL_ROPE_THETA,
                "query_pre_attn_scalar": float(per_head),
            }
        try:
            return ModelConfig(
                architecture=_GGUF_ARCH[a],
                vocab_size=int(vocab),
                hidden_size=hidden,
                intermediate_size=int(self.field(f"{a}.feed_forward_length")),
                num_layers=int(self.field(f"{a}.block_count")),
                num_heads=heads,
                num_kv_heads=int(self.field(f"{a}.attention.head_count_kv", heads)),
                head_dim=int(self.field(f"{a}.attention.key_length", hidden // heads)),
                rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
                rope_scaling=scaling,
                max_position_embeddings=int(self.field(f"{a}.context_length", 4096)),
                tie_word_embeddings="output.weight" not in self.tensors,
                attention_bias="blk.0.attn_q.bias" in self.tensors,
                qk_norm="blk.0.attn_q_norm.weight" in self.tensors,
                sliding_window=self.field(f"{a}.attention.sliding_window"),
                bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
                eos_token_ids=() if eos is None else (int(eos),),
                **gemma,
            )
        except TypeError as e:
            raise ModelLoadError(f"{self.path}: GGUF metadata is incomplete: {e}") from e

    def layer_quant_types(self) -> set[str]:
        """GGML types of the decoder layers' matrices (e.g. {"Q4_1"})."""
        return {t.tensor_type.name for name, t in self.tensors.items() if name.startswith("blk.") and len(t.shape) == 2}

    def rope_freq_factors(self) -> torch.Tensor | None:
        t = self.tensors.get("rope_freqs.weight")
        return None if t is None else torch.from_numpy(np.array(t.data, dtype=np.float32))

    def weights(self, config: ModelConfig, skip: Set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named fp32 tensors, dequantized, with q/k un-permuted for llama; the GGUF tensors named
        in `skip` (those already held packed) are neither read nor dequantized."""
        from gguf.quants import dequantize

        for t in tqdm(self.reader.tensors, desc="loading GGUF", unit="tensor", leave=False):
            name = self._hf_name(t.name)
            if name is None or t.name in skip:
                continue
            arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            # F32 tensors come back as the file's read-only map: copy those only (a quantized
            # type's result is already a fresh array, and a second copy of a big table costs RSS).
            w = torch.from_numpy(arr if arr.flags.writeable else np.array(arr))
            if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_heads if "q_proj" in name else config.num_kv_heads
                w = _unpermute_rope(w, heads)
            if self.arch == "gemma3" and name.endswith("norm.weight"):
                w = w - 1.0  # llama.cpp's converter stores Gemma's 1 + w; hand on HF's w
            yield name, w

    def _hf_name(self, name: str) -> str | None:
        stem, _, suffix = name.rpartition(".")
        if stem == "rope_freqs":
            return None  # applied through rope_freq_factors()
        if stem.startswith("blk."):
            _, idx, part = stem.split(".", 2)
            names = _GGUF_GEMMA3_NAMES if self.arch == "gemma3" else _GGUF_LAYER_NAMES
            if part not in names:
                raise ModelLoadError(f"{self.path}: unexpected tensor {name}")
            return f"layers.{idx}.{names[part]}.{suffix}"
        if stem not in _GGUF_GLOBAL_NAMES:
            raise ModelLoadError(f"{self.path}: unexpected tensor {name}")
        hf = _GGUF_GLOBAL_NAMES[stem]
        return f"{hf}.{suffix}" if hf == "lm_head" else f"model.{hf}.{suffix}"


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time reordering of q/k rows (interleaved rope -> halves).

    llama.cpp stores each head's rows as pairs (x0, x_{d/2}), (x1, x_{d/2+1}), ...;
    HF keeps the first half of the head's rows, then the second half.
    """
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- building


@dataclasses.dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    source: ModelSource
    weight_bytes: int  # bytes of weights one decode step reads (quantized layers as stored)
    quantization: str = "none"  # what "auto" resolved to


def open_gguf(source: ModelSource) -> GGUFFile | None:
    return GGUFFile(source.path) if source.path and source.path.lower().endswith(".gguf") else None


def load_config(source: ModelSource, gguf: GGUFFile | None = None) -> ModelConfig:
    if source.kind == "dummy" and source.path is None:
        return get_preset(source.name)
    if gguf is not None:
        return gguf.config()
    return hf_config(source.path)


def resolve_quantization(quantization: str | None, source: ModelSource, gguf: GGUFFile | None) -> str:
    """What "auto" means: a GGUF file runs on its own blocks ("gguf"), anything else at the run dtype."""
    is_gguf = gguf is not None and source.kind == "gguf"
    quantization = quantization or "none"
    if quantization == "auto":
        return "gguf" if is_gguf else "none"
    if quantization == "gguf" and not is_gguf:
        raise ConfigError("quantization='gguf' keeps a GGUF file's blocks packed; the model is no GGUF file")
    return quantization


def runs_packed(quantization: str, gguf: GGUFFile | None) -> bool:
    """Whether the decoder's matrices will run on the packed bf16 CPU kernels: int4/int8, or a GGUF whose
    layers hold a 4-bit type membound keeps packed as int4 (an all-F32 GGUF runs dequantized)."""
    if quantization in ("int4", "int8"):
        return True
    if quantization != "gguf" or gguf is None:
        return False
    from membound.quant.gguf_blocks import LAYER_FORMAT

    # Only the int4 kernel computes in bf16: group-wise int8 (Q8_0, Q5_x, Q6_K) layers multiply in fp32.
    return any(LAYER_FORMAT.get(t) == "int4" for t in gguf.layer_quant_types())


def load_model(
    source: ModelSource,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    seed: int = 0,
    gguf: GGUFFile | None = None,
    quantization: str | None = "none",
) -> LoadedModel:
    """Build the model on `device` in `dtype`, quantized as `quantization` (EngineConfig's values)
    asks; pass `gguf` if the file is already open.

    Packed first: the model is built on the meta device, the layers that keep a GGUF's own blocks
    ("gguf"; "int4" on CPU for Q4_0/Q4_1 matrices) are made straight from the memory-mapped blocks,
    and only then does the rest get memory and its (dequantized) tensors. So a packed matrix never
    exists at full precision, not even while loading (tests/test_packed_loading.py).
    """
    gguf = gguf or open_gguf(source)
    config = load_config(source, gguf)
    quantization = resolve_quantization(quantization, source, gguf)
    freq_factors = gguf.rope_freq_factors() if gguf and source.kind != "dummy" else None
    local = any(config.layer_rope_local(i) for i in range(config.num_layers))
    with torch.device(device):
        rope = RotaryEmbedding(rope_inv_freq(config, freq_factors), max_positions)
        rope_local = RotaryEmbedding(rope_inv_freq(config, local=True), max_positions) if local else None
    tables = [(r, r.cos, r.sin) for r in (rope, rope_local) if r is not None]
    with torch.device("meta"):
        kernels = choose_layer_kernels("auto", backend.name, dtype, device.type)
        model = LlamaForCausalLM(
            config, backend, max_positions, layer_kernels=kernels, rope=rope, rope_local=rope_local
        ).to(dtype)
    # .to(dtype) cast the tables too: keep them fp32 (positions up to max_positions need the bits).
    for r, cos, sin in tables:
        r.cos, r.sin = cos, sin
    if config.gemma:  # 1 + w kept in fp32, as HF computes it: in bf16 it would be off by up to 0.4%
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.float()
    if source.kind == "dummy":
        # Random weights everywhere first, then any blocks from the file: the seeded draws stay as they were.
        _materialise(model, device)
        _random_init(model, seed)
        counts, from_blocks = _pack_from_file(model, gguf, quantization, device)
    else:
        counts, from_blocks = _pack_from_file(model, gguf, quantization, device)
        _materialise(model, device)  # only what has no packed form
        if gguf is not None:
            from membound.quant.gguf_blocks import packed_tensors

            model.load_weights(gguf.weights(config, skip=packed_tensors(model)))
        else:
            model.load_weights(_progress(hf_weights(source.path), source.path))
    rtn = 0
    if quantization not in ("none", "gguf"):
        # What the file's own blocks use, for any matrix stored otherwise.
        group = 32 if gguf is not None and gguf.layer_quant_types() & {"Q4_0", "Q4_1"} else 128
        rtn = quantize_model(model, quantization, group)
    model.eval()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # a module the loader does not know how to fill: fail here, not at the first step
        raise ModelLoadError(f"{len(left)} tensors were never loaded, e.g. {left[0]}")
    weight_bytes = linear_weight_bytes(model)[0]
    if quantization == "gguf":
        dequantized = counts.pop("dequantized", 0)
        log.info(
            "gguf: kept packed %s; %d quantized tensors dequantized instead; %.1f MB of weights",
            ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) or "nothing",
            dequantized,
            weight_bytes / 1e6,
        )
    elif quantization != "none":
        log.info(
            "%s: %d linear layers from the GGUF's own 4-bit blocks, %d quantized by round-to-nearest",
            quantization,
            from_blocks,
            rtn,
        )
    return LoadedModel(model, config, source, weight_bytes, quantization)


def _pack_from_file(
    model: LlamaForCausalLM, gguf: GGUFFile | None, quantization: str, device: torch.device
) -> tuple[dict[str, int], int]:
    """Swap in the layers that hold the file's blocks while `model` is still on meta; returns
    load_gguf_packed's counts and how many matrices load_int4_from_gguf made."""
    if quantization == "gguf":
        from membound.quant.gguf_blocks import load_gguf_packed

        return load_gguf_packed(model, gguf, device), 0
    # The CPU int4 kernel takes Q4_0/Q4_1 blocks as they are (elsewhere int4 is round-to-nearest).
    if quantization == "int4" and device.type == "cpu" and gguf is not None:
        if gguf.layer_quant_types() & {"Q4_0", "Q4_1"}:
            from membound.quant.gguf_blocks import load_int4_from_gguf

            return {}, load_int4_from_gguf(model, gguf)
    return {}, 0


def _materialise(model: torch.nn.Module, device: torch.device) -> None:
    """Uninitialised storage on `device` for every parameter and buffer still on meta, leaving the
    packed layers alone (`to_empty` would replace their contents too). torch.empty by shape, not
    empty_like: empty_like of a meta tensor imports PyTorch's meta kernels (0.35 s of start-up)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                fresh = torch.empty(p.shape, dtype=p.dtype, device=device)
                setattr(module, name, torch.nn.Parameter(fresh, p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_meta:
                setattr(module, name, torch.empty(b.shape, dtype=b.dtype, device=device))


def _random_init(model: LlamaForCausalLM, seed: int) -> None:
    """Small random weights (norms at 1) so dummy runs produce finite, varied logits."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def _progress(weights: Iterator[tuple[str, torch.Tensor]], path: str):
    yield from tqdm(weights, desc=f"loading {pathlib.Path(path).name}", unit="tensor", leave=False)
