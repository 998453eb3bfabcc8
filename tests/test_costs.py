"""The cost model (membound/costs.py) by hand, and the engine, planner and bench agreeing with it."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from membound import costs
from membound.bench.common import decode_step_cost, engine_weight_bytes, matmul_flops_per_token
from membound.config import EngineConfig
from membound.engine.kv_cache import KVCacheSpec
from membound.engine.memory import plan_memory
from membound.errors import ConfigError
from membound.model.loader import GGUFFile
from membound.model.registry import PRESETS, default_model_path
from membound.quant.linear import linear_weight_bytes
from tests.conftest import TINY_BLOCK, TINY_KV_BYTES_PER_TOKEN, tiny_llm

# ---------------------------------------------------------------------- KV


@pytest.mark.parametrize(
    ("dtype", "per_head"),
    [("fp32", 64 * 4), ("bf16", 64 * 2), ("fp16", 64 * 2), ("fp8", 64), ("int8", 64 + 4)],
)
def test_kv_bytes_per_token_by_hand(dtype, per_head):
    # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64; K and V; int8 adds an fp32 scale per head vector.
    kv = costs.KVCost(30, 3, 64, dtype)
    assert kv.bytes_per_token == 2 * 30 * 3 * per_head == costs.kv_bytes_per_token(30, 3, 64, dtype)
    assert kv.bytes_per_block(16) == 16 * kv.bytes_per_token
    assert kv.bytes_for(17, 16) == 2 * kv.bytes_per_block(16)  # whole blocks


@pytest.mark.parametrize(
    ("torch_dtype", "name"),
    [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float8_e4m3fn, "fp8"),
     (torch.int8, "int8")],
)  # fmt: skip
def test_kv_cache_spec_delegates_to_the_cost_model(torch_dtype, name):
    spec = KVCacheSpec(30, 3, 64, 16, torch_dtype)
    assert costs.kv_dtype_name(torch_dtype) == name
    assert spec.bytes_per_token == costs.kv_bytes_per_token(30, 3, 64, name)
    assert spec.bytes_per_block == 16 * spec.bytes_per_token
    # The element size is torch's own, and the scales are what allocate_kv_cache adds.
    elem = torch.empty((), dtype=torch_dtype).element_size()
    assert spec.bytes_per_token == 2 * 30 * 3 * (64 * elem + (4 if torch_dtype == torch.int8 else 0))
    assert spec.has_scales == (torch_dtype == torch.int8)


def test_unknown_kv_dtype_is_a_clear_error():
    with pytest.raises(ConfigError, match="KV cache dtype must be one of fp32, bf16"):
        costs.kv_dtype_name(torch.float64)


def test_engine_memory_plan_counts_blocks_with_the_cost_model():
    spec = KVCacheSpec(2, 2, 8, TINY_BLOCK, torch.float32)
    assert spec.bytes_per_token == TINY_KV_BYTES_PER_TOKEN
    budget = 10 * spec.bytes_per_block + 7
    plan = plan_memory(EngineConfig(kv_cache_memory_bytes=budget), spec, torch.device("cpu"), 123, 0, 64)
    assert plan.num_blocks == costs.kv_blocks(budget, spec.bytes_per_block) == 10
    assert plan.kv_bytes == 10 * spec.bytes_per_block and plan.kv_tokens == 10 * TINY_BLOCK
    assert costs.kv_budget_bytes(1000, 0.9, 100, 50) == 750
    assert costs.cpu_kv_budget_bytes(16 << 30, 2 << 30) == 2 << 30
    assert costs.cpu_kv_budget_bytes(4 << 30, 2 << 30) == 1 << 30


# ---------------------------------------------------------------------- weights


def test_gguf_bytes_from_block_sizes():
    assert costs.gguf_tensor_bytes("Q4_1", 64) == 2 * 20
    assert costs.gguf_tensor_bytes("Q8_0", 32) == 34
    assert costs.gguf_tensor_bytes("Q6_K", 256) == 210
    assert costs.gguf_tensor_bytes("F32", 576) == 576 * 4
    with pytest.raises(ConfigError, match="not whole Q4_1 blocks"):
        costs.gguf_tensor_bytes("Q4_1", 33)
    with pytest.raises(ConfigError, match="unknown weight format"):
        costs.weight_bits("int3")


def test_gguf_weight_bytes_of_the_default_model_match_its_header():
    g = GGUFFile(str(default_model_path()))
    tensors = [costs.GGUFTensor(t.name, t.tensor_type.name, int(t.n_elements), len(t.shape)) for t in g.reader.tensors]
    wb, counts = costs.gguf_weight_bytes(tensors)
    assert wb.stored == sum(int(t.n_bytes) for t in g.reader.tensors)  # the header's own sizes, tensor by tensor
    assert wb.per_step == wb.stored  # tied: the Q8_0 table is also the LM head
    assert wb.matmul_params == costs.matmul_params(g.config())  # the tensors agree with the config's shapes
    assert counts["Q4_1"] == 7 * 30 and counts["Q8_0"] == 1


def test_weight_bytes_tied_and_untied():
    parts = [
        costs.TensorBytes("embed", 100, embedding=True, embedding_params=50),
        costs.TensorBytes("layers", 300, 150),
        costs.TensorBytes("norms", 10),
    ]
    assert costs.weight_bytes(parts, tied=False) == costs.WeightBytes(410, 310, 150)
    assert costs.weight_bytes(parts, tied=True) == costs.WeightBytes(410, 410, 200)


def test_shape_weight_bytes_by_hand():
    cfg = PRESETS["llama-3-8b"]
    wb = costs.shape_weight_bytes(cfg, "bf16")
    assert wb.stored == 2 * cfg.num_params()
    assert wb.per_step == wb.stored - 2 * cfg.vocab_size * cfg.hidden_size  # untied: the table is not streamed
    assert wb.matmul_params == cfg.num_params() - cfg.vocab_size * cfg.hidden_size - 65 * cfg.hidden_size


def test_loaded_weight_bytes_of_a_dense_model_are_the_engines(tmp_path):
    llm = tiny_llm(tmp_path)
    e = llm.engine
    cfg = e.model_config
    wb = costs.loaded_weight_bytes(e.model, cfg.tie_word_embeddings)
    assert wb == engine_weight_bytes(e)
    assert wb.stored == e.memory.weight_bytes == linear_weight_bytes(e.model)[0]
    table = cfg.vocab_size * cfg.hidden_size * 4  # fp32
    assert wb.per_step == wb.stored - (0 if cfg.tie_word_embeddings else table)
    assert wb.matmul_params == costs.matmul_params(cfg)  # the loaded matrices agree with the config's shapes
    assert matmul_flops_per_token(e) == 2 * wb.matmul_params


# ---------------------------------------------------------------------- FLOPs and bounds


def test_decode_and_prefill_costs_by_hand():
    wb = costs.WeightBytes(1000, 800, 400)
    model = costs.DecodeCost(wb, kv_bytes_per_token=10, num_layers=2, num_heads=3, head_dim=4)
    assert model.flops_per_token(5) == 2 * 400 + 4 * 5 * 2 * 3 * 4
    step = model.step(batch=3, context=5)
    assert (step.weight_bytes, step.kv_bytes, step.flops) == (800, 150, 3 * model.flops_per_token(5))
    assert step.bytes == 950 and step.memory_seconds(950.0) == 1.0
    assert step.bound_seconds(950.0, step.flops / 2) == 2.0  # compute-bound here
    assert costs.roofline_tok_s(step, 3, 950.0, step.flops / 2) == 1.5
    pre = model.prefill(7)
    assert pre.flops == 2 * 400 * 7 + 2 * 2 * 3 * 4 * 49 and pre.kv_bytes == 70
    assert costs.decode_bound_tok_s(98e6, 25e9) == pytest.approx(255.1, abs=0.1)
    assert costs.decode_bound_tok_s(98e6, 25e9, batch=4) == 4 * costs.decode_bound_tok_s(98e6, 25e9)


def test_crossover_batch_is_the_first_compute_bound_batch():
    model = costs.DecodeCost(costs.WeightBytes(16e9, 16e9, 8e9), 131_072, 32, 32, 128)
    bw, peak = 3350e9, 989e12
    b = model.crossover_batch(16, bw, peak)
    step = model.step(b, 16)
    assert step.compute_seconds(peak) >= step.memory_seconds(bw)
    step = model.step(b - 1, 16)
    assert step.compute_seconds(peak) < step.memory_seconds(bw)
    assert model.crossover_batch(8192, bw, peak) is None


def test_bench_step_cost_is_the_cost_models(tmp_path):
    e = tiny_llm(tmp_path).engine
    weights, kv, flops = decode_step_cost(e, 4, 32.5)
    model = costs.DecodeCost.of(e.model_config, engine_weight_bytes(e), e.kv_spec.bytes_per_token)
    step = model.step(4, 32.5)
    assert (weights, kv, flops) == (step.weight_bytes, step.kv_bytes, step.flops)
    assert kv == int(4 * 32.5 * TINY_KV_BYTES_PER_TOKEN)


def test_the_cost_model_imports_no_engine_server_bench_plan_or_torch_at_module_level():
    tree = ast.parse(pathlib.Path(costs.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
    banned = ("membound.engine", "membound.server", "membound.bench", "membound.plan", "torch")
    assert not [n for n in names if n.startswith(banned)], names
