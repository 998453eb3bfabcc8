"""The layer kernel set (membound.layers): chosen once when the model is built, and membound.kernels
standing alone (it imports torch, triton and itself only; references live in membound.layers)."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest
import torch

import membound.kernels
from membound.attention import TorchPagedAttention
from membound.errors import ConfigError
from membound.layers import choose_layer_kernels

KERNELS_DIR = pathlib.Path(membound.kernels.__file__).parent


def _membound_imports(source: str) -> list[str]:
    """What a module of membound/kernels imports from the rest of membound, anywhere in it (inside
    functions too): absolute imports, relative ones leaving the package, import_module("membound...")."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                found.append("." * node.level + (node.module or ""))
                continue
            names = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module",
            "__import__",
        ):
            names = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "membound" and not (name + ".").startswith("membound.kernels."):
                found.append(name)
    return found


def test_kernels_import_nothing_from_the_rest_of_membound():
    files = sorted(KERNELS_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "fused.py", "decode_attention.py", "quant_matmul.py"}
    bad = {f.name: imports for f in files if (imports := _membound_imports(f.read_text()))}
    assert not bad, f"membound/kernels must import only torch, triton, the stdlib and itself: {bad}"


def test_the_import_check_sees_imports_inside_functions():
    src = (
        "import torch\nfrom membound.kernels.decode_attention import x\nfrom . import fused\n"
        "def f():\n    from membound.attention.torch_paged import write_kv\n    import membound.model.llama\n"
        "    from .. import errors\n    importlib.import_module('membound.layers')\n"
    )
    assert _membound_imports(src) == ["membound.attention.torch_paged", "membound.model.llama", "..", "membound.layers"]


def test_choose_layer_kernels_follows_the_attention_backend_by_default():
    assert choose_layer_kernels().name == "torch"
    assert choose_layer_kernels("auto", "torch").name == "torch"
    assert choose_layer_kernels("torch", "triton").name == "torch"
    assert choose_layer_kernels("torch").rope_write_kv is None  # the backend's forward writes the cache
    with pytest.raises(ConfigError, match="unknown layer kernels 'cuda'"):
        choose_layer_kernels("cuda")
    pytest.importorskip("triton")
    from membound.attention.triton_paged import TritonPagedAttention
    from membound.kernels import fused

    triton_set = choose_layer_kernels("auto", "triton")
    assert triton_set.name == "triton" and triton_set.rope_write_kv is fused.rope_write_kv
    assert not hasattr(TritonPagedAttention(), "fused")  # the model no longer asks the backend


def _tiny_model(layer_kernels=None, backend=None):
    from membound.model.llama import LlamaForCausalLM
    from membound.model.registry import get_preset

    cfg = dataclasses.replace(
        get_preset("smollm2-135m"), vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, backend or TorchPagedAttention(), 64, layer_kernels=layer_kernels)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    return model.eval()


def test_model_takes_its_kernel_set_at_construction():
    from membound.model.llama import LlamaForCausalLM

    model = _tiny_model()
    assert model.layer_kernels.name == "torch"
    assert all(layer.mlp.kernels is model.layer_kernels for layer in model.layers)
    pytest.importorskip("triton")
    from membound.attention.triton_paged import TritonPagedAttention

    with torch.device("meta"):
        m = LlamaForCausalLM(model.config, TritonPagedAttention(), 64)
    assert m.layer_kernels.name == "triton"


@pytest.mark.cpu
@pytest.mark.gpu
def test_triton_layer_kernels_on_the_torch_backend_match_the_torch_set():
    """The Triton set writes K/V itself and calls the backend's `attend`: any backend runs with it."""
    pytest.importorskip("triton")
    from membound.attention.base import AttentionMetadata
    from membound.engine.kv_cache import KVCacheSpec, allocate_kv_cache

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = _tiny_model(choose_layer_kernels("torch")).to(device)
    fast = _tiny_model(choose_layer_kernels("triton")).to(device)
    fast.load_state_dict(ref.state_dict())
    cfg, n, bs = ref.config, 21, 16
    outs = []
    for model in (ref, fast):
        spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, bs, torch.float32)
        caches = allocate_kv_cache(spec, 4, device)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([(3 - p // bs) * bs + p % bs for p in range(n)], device=device),
            block_tables=torch.tensor([[3, 2]], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
            num_decodes=0, seq_lens_host=(n,), query_start_loc_host=(0, n),
        )  # fmt: skip
        with torch.inference_mode():
            ids = torch.arange(n, device=device) % cfg.vocab_size
            outs.append((model(ids, torch.arange(n, device=device), caches, meta), caches))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=1e-4)
    for c0, c1 in zip(outs[0][1], outs[1][1], strict=True):  # the same slots written, with the same K and V
        torch.testing.assert_close(c1, c0, atol=1e-5, rtol=1e-5)
