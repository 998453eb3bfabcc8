"""`membound plan` arithmetic against hand-computed cases, and `membound doctor`'s verdicts."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import pytest

from membound import costs
from membound.entrypoints.cli import main
from membound.errors import ConfigError
from membound.model.registry import PRESETS, default_model_path
from membound.plan import doctor
from membound.plan.gpus import GPUS, GPUSpec, get_gpu, match_device_name
from membound.plan.planner import load_shape, make_plan, shape_weight_bytes, weight_bits
from membound.quant.linear import linear_weight_bytes

GIB = 2**30


def test_llama3_8b_kv_bytes_per_token_and_weights_by_hand():
    shape = load_shape("llama-3-8b")
    plan = make_plan(shape, get_gpu("h100-sxm"), context=8192, concurrency=1)
    # 2 (K and V) x 32 layers x 8 KV heads x 128 head_dim x 2 bytes
    assert plan.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert plan.kv_bytes_needed == 8192 * 131_072  # exactly 1 GiB
    # 8,030,261,248 parameters (the published count), all 16-bit.
    assert shape.config.num_params() == 8_030_261_248
    assert plan.weight_bytes == 2 * 8_030_261_248
    # The 128256 x 4096 embedding table is gathered, not streamed; the LM head is streamed.
    assert plan.weight_bytes_per_step == plan.weight_bytes - 2 * 128_256 * 4096


def test_gqa_shrinks_the_kv_cache_the_seed_tables_assume():
    # The fourth seed lists Llama 3 70B at ~10 GB of FP16 KV for 4K tokens: that is 64 KV heads.
    # With its 8 KV heads (GQA 8:1) it is 2 x 80 x 8 x 128 x 2 B = 320 KiB per token, 1.25 GiB at 4K.
    plan = make_plan(load_shape("llama-3-70b"), get_gpu("h100-sxm"), context=4096, concurrency=1)
    assert plan.kv_bytes_per_token == 327_680
    assert plan.kv_bytes_needed == 4096 * 327_680 == int(1.25 * GIB)
    assert make_plan(load_shape("llama-3-70b"), get_gpu("h100-sxm"), 4096, 1, kv_dtype="fp8").kv_bytes_needed == (
        plan.kv_bytes_needed // 2
    )


@pytest.mark.parametrize(
    ("fmt", "bits"),
    [("bf16", 16), ("fp8", 8), ("int8", 8), ("int4", 4.25), ("Q8_0", 8.5), ("Q4_0", 4.5), ("Q4_1", 5.0),
     ("Q4_K", 4.5), ("Q6_K", 6.5625), ("q5_k", 5.5)],
)  # fmt: skip
def test_bits_per_weight(fmt, bits):
    assert weight_bits(fmt) == bits


def test_unknown_and_mixed_weight_formats_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown weight format 'int3'.*known: fp32, bf16"):
        weight_bits("int3")
    with pytest.raises(ConfigError, match="_S/_M/_L files mix types"):
        weight_bits("Q4_K_M")


def test_int4_keeps_the_lm_head_16_bit_and_gguf_types_do_not():
    cfg = PRESETS["llama-3-8b"]
    head = 128_256 * 4096
    layers = 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336)
    norms = 2 * (32 * 2 * 4096 + 4096)
    assert shape_weight_bytes(cfg, "int4").per_step == int(layers * 4.25 / 8 + head * 2 + norms)
    assert shape_weight_bytes(cfg, "Q4_0").per_step == int(layers * 4.5 / 8 + head * 4.5 / 8 + norms)


def _tiny_gpu(memory_bytes: float) -> GPUSpec:
    return GPUSpec("test", memory_bytes / GIB, 1000, 100, None, 1)


def test_fit_boundary_and_largest_concurrency():
    shape = load_shape("llama-3.2-1b")
    probe = make_plan(shape, _tiny_gpu(80 * GIB), context=4096, concurrency=1, gpu_memory_utilization=1.0)
    per_seq = 4096 * probe.kv_bytes_per_token
    # Memory for weights + overhead + exactly 5 sequences of 4096 tokens.
    memory = shape.weights.stored + (1 << 30) + 5 * per_seq
    fits = make_plan(shape, _tiny_gpu(memory), 4096, 5, gpu_memory_utilization=1.0)
    assert fits.fits and fits.headroom_bytes < probe.kv_bytes_per_token * 16 and fits.max_concurrency == 5
    over = make_plan(shape, _tiny_gpu(memory), 4096, 6, gpu_memory_utilization=1.0)
    assert not over.fits and over.headroom_bytes < 0 and over.max_concurrency == 5
    # Largest context at 6 sequences: 5 x 4096 x 6/6 blocks spread over 6, rounded down to whole blocks.
    assert over.max_context == (5 * 4096 // 6) // 16 * 16


def test_decode_bounds_by_hand_and_the_crossover_batch():
    gpu = get_gpu("h100-sxm")
    shape = load_shape("llama-3-8b")
    plan = make_plan(shape, gpu, context=16, concurrency=1, batches=(1, 64, 512, 1024))
    p1 = plan.decode[0]
    assert p1.bytes_per_step == plan.weight_bytes_per_step + 16 * 131_072
    assert p1.memory_bound_tok_s == pytest.approx(3350e9 / p1.bytes_per_step)
    flops = 2 * shape.weights.matmul_params + 4 * 16 * 32 * 32 * 128
    assert p1.compute_bound_tok_s == pytest.approx(989e12 / flops)
    assert p1.bound_tok_s == pytest.approx(min(p1.memory_bound_tok_s, p1.compute_bound_tok_s))
    # At 16 tokens of context decode turns compute-bound near batch 300 (989 TFLOPS / 3.35 TB/s / 2 B).
    b = plan.crossover_batch
    assert 250 < b < 350

    def times(batch):
        nbytes = plan.weight_bytes_per_step + batch * 16 * 131_072
        return nbytes / gpu.bandwidth, batch * flops / (gpu.bf16_tflops * 1e12)

    mem, comp = times(b)
    assert comp >= mem
    mem, comp = times(b - 1)
    assert comp < mem
    # At 8k context the KV reads grow as fast as the FLOPs: never compute-bound.
    assert make_plan(shape, gpu, context=8192, concurrency=1).crossover_batch is None
    # The issue's target: 75% of the H100 SXM spec bandwidth is about 167 tok/s at batch 1.
    assert 0.75 * 3350e9 / plan.weight_bytes_per_step == pytest.approx(167, abs=4)


def test_gguf_header_of_the_embedded_smollm2():
    shape = load_shape(None)
    c = shape.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert shape.weight_format.startswith("GGUF (Q4_1 x ")
    size = pathlib.Path(default_model_path()).stat().st_size
    assert 0.9 * size < shape.weights.stored < size  # tensor data is nearly all of the file
    assert shape.weights.per_step == shape.weights.stored  # tied: the table is also the LM head
    # With --weights the bytes come from the shape instead.
    assert load_shape(None, "bf16").weights.stored == 2 * c.num_params()


def test_gpu_table_covers_the_cards_and_matches_cuda_names():
    for key in ("rtx-3090", "rtx-4090", "rtx-5090", "a10", "l4", "l40s", "a100-40gb", "a100-80gb", "h100-pcie",
                "h100-sxm", "h200", "b200"):  # fmt: skip
        g = GPUS[key]
        assert g.memory_gib > 10 and g.bandwidth_gbs > 100 and g.bf16_tflops > 50 and g.l2_mib > 0
    assert get_gpu("H100") is GPUS["h100-sxm"] and get_gpu("NVIDIA GeForce RTX 4090") is GPUS["rtx-4090"]
    with pytest.raises(ConfigError, match="unknown GPU 'tpu'"):
        get_gpu("tpu")
    names = {
        "NVIDIA H100 80GB HBM3": "h100-sxm",
        "NVIDIA H100 PCIe": "h100-pcie",
        "NVIDIA L40S": "l40s",
        "NVIDIA L4": "l4",
        "NVIDIA A100-SXM4-40GB": "a100-40gb",
        "NVIDIA GeForce RTX 3090": "rtx-3090",
        "NVIDIA H200": "h200",
    }
    for cuda_name, key in names.items():
        assert match_device_name(cuda_name) is GPUS[key], cuda_name
    assert match_device_name("Tesla T4") is None


def test_presets_the_issue_names_exist():
    for name in ("llama-3-8b", "llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b", "llama-3-70b", "mistral-7b",
                 "qwen2.5-7b", "qwen3-0.6b", "qwen3-8b", "qwen3-32b", "phi-3-mini", "smollm2-135m",
                 "smollm2-360m", "smollm2-1.7b"):  # fmt: skip
        assert name in PRESETS
    # Published parameter counts, to 1%.
    for name, billions in (("llama-3-70b", 70.55), ("qwen3-32b", 32.76), ("phi-3-mini", 3.82)):
        assert PRESETS[name].num_params() / 1e9 == pytest.approx(billions, rel=0.01), name


def test_plan_cli_json_and_text(capsys):
    assert main(["plan", "llama-3-8b", "--gpu", "h100-sxm", "--context", "8192", "--concurrency", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_bytes_per_token"] == 131_072 and out["fits"] and len(out["decode"]) == 9
    assert main(["plan", "llama-3-70b", "--gpu", "rtx-4090"]) == 0
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "GQA 8:1" in text
    assert main(["plan", "--gpu", "cpu", "--context", "2048"]) == 0  # the embedded GGUF, measured CPU
    assert "CPU (measured" in capsys.readouterr().out
    assert main(["plan", "llama-3-8b", "--gpu", "h100", "--weights", "int5"]) == 2
    assert "unknown weight format" in capsys.readouterr().err


# ---------------------------------------------------------------------- doctor verdicts on recorded readings

HEALTHY_H100 = doctor.GPUReadings(
    name="NVIDIA H100 80GB HBM3",
    compute_capability=(9, 0),
    memory_total=80 * GIB,
    memory_used=1 * GIB,
    memory_used_by_others=0,
    driver_version="580.65",
    cuda_version="12.8",
    triton_version="3.5.0",
    temperature_c=45,
    sm_clock_mhz=1980,
    sm_clock_max_mhz=1980,
    throttle_reasons=0,
    pcie_gen=5,
    pcie_gen_max=5,
    pcie_width=16,
    pcie_width_max=16,
)


def _statuses(checks):
    return {(c.name, c.status) for c in checks}


def test_doctor_healthy_gpu_is_all_ok():
    checks = doctor.judge_gpu(HEALTHY_H100, busy=True)
    assert doctor.worst(checks) == doctor.OK
    assert ("compute capability", doctor.OK) in _statuses(checks)
    assert "fp8 yes" in next(c.detail for c in checks if c.name == "compute capability")


def test_doctor_flags_thermal_throttling_and_heat():
    hot = dataclasses.replace(
        HEALTHY_H100, temperature_c=89, sm_clock_mhz=1200, throttle_reasons=doctor.THROTTLE_HW_THERMAL
    )
    checks = doctor.judge_gpu(hot, busy=True)
    got = _statuses(checks)
    assert (
        ("temperature", doctor.WARN) in got and ("throttling", doctor.FAIL) in got and ("SM clock", doctor.WARN) in got
    )
    assert doctor.worst(checks) == doctor.FAIL
    assert any("cool the GPU" in c.fix for c in checks)


def test_doctor_power_cap_low_clocks_only_matter_under_load():
    capped = dataclasses.replace(HEALTHY_H100, sm_clock_mhz=900, throttle_reasons=doctor.THROTTLE_SW_POWER_CAP)
    assert ("throttling", doctor.WARN) in _statuses(doctor.judge_gpu(capped))
    idle = dataclasses.replace(HEALTHY_H100, sm_clock_mhz=345, throttle_reasons=doctor.THROTTLE_GPU_IDLE)
    assert doctor.worst(doctor.judge_gpu(idle, busy=False)) == doctor.OK


def test_doctor_flags_memory_taken_by_another_process_and_narrow_pcie():
    shared = dataclasses.replace(HEALTHY_H100, memory_used_by_others=20 * GIB, pcie_width=8, triton_version=None)
    got = _statuses(doctor.judge_gpu(shared))
    assert ("memory used by other processes", doctor.WARN) in got
    assert ("PCIe link", doctor.WARN) in got and ("triton", doctor.WARN) in got


def test_doctor_fit_check():
    shape = load_shape("llama-3-8b")
    need = shape.weights.stored + 4096 * 131_072 + GIB
    assert doctor.judge_fit(shape, need, 4096, "bf16", GIB).status == doctor.OK
    bad = doctor.judge_fit(shape, need - 1, 4096, "bf16", GIB)
    assert bad.status == doctor.FAIL and "--weights int4" in bad.fix


def test_doctor_runs_for_real_on_this_cpu(capsys, smollm2):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["GPU"]["status"] == doctor.WARN and "no CUDA GPU" in checks["GPU"]["detail"]
    assert "GB/s measured" in checks["CPU memory bandwidth"]["detail"]
    rate = float(checks["decode (batch 1)"]["detail"].split()[0])
    bound = float(checks["decode (batch 1)"]["detail"].replace(",", "").split(" vs ")[1].split()[0])
    assert 0 < rate < 1.2 * bound and math.isfinite(bound)
    # The bound is the packed default's own weight bytes over the measured bandwidth: the
    # engine's, not the fp32 parameter count (538 MB) the doctor once divided by.
    data = checks["CPU decode bound"]["data"]
    engine_bytes = doctor.engine_weight_bytes_per_step(smollm2.engine)
    planes = smollm2.engine.model.embed_tokens.planes_nbytes()  # the head reads these, not the int8 table
    table = smollm2.engine.model.embed_tokens.weight_nbytes() - planes
    assert (
        data["weight_bytes_per_token"]
        == engine_bytes
        == linear_weight_bytes(smollm2.engine.model)[0] - (table if planes else 0)
    )
    assert data["bound_tok_s"] == pytest.approx(data["bandwidth_gbs"] * 1e9 / engine_bytes, rel=1e-12)
    assert bound == pytest.approx(data["bound_tok_s"], abs=0.06)  # the decode check's reference, as printed


def test_doctor_decode_bound_is_engine_weight_bytes_over_bandwidth(smollm2):
    engine = smollm2.engine
    assert engine.quantization == "gguf"  # the default: the file's Q4_1 / Q8_0 blocks kept packed
    nbytes = doctor.engine_weight_bytes_per_step(engine)
    planes = engine.model.embed_tokens.planes_nbytes()
    # Tied: all of it streams, except that on a bf16 CPU the head reads its nibble planes, not the table.
    table = engine.model.embed_tokens.weight_nbytes() - planes if planes else 0
    assert nbytes == engine.memory.weight_bytes - table == linear_weight_bytes(engine.model)[0] - table
    check, bound = doctor.decode_bound("default", nbytes, 50.0, "as loaded")
    assert bound == 50.0 * 1e9 / nbytes
    assert check.data == {"weight_bytes_per_token": nbytes, "bandwidth_gbs": 50.0, "bound_tok_s": bound}
    # ~98 MB: Q4_1 layers at 5 bits, the Q8_0 table (also the LM head) at 9 bits, norms; the head's
    # planes keep a bf16 scale and zero per 32 weights in each of two planes (+3.5 MB).
    assert 95e6 < nbytes < 103e6
    assert nbytes == pytest.approx(load_shape(None).weights.per_step, rel=0.06)  # the file's own blocks


# ---------------------------------------------------------------------- plan against the engine


def test_plan_for_the_engines_model_and_settings_matches_its_memory_plan(smollm2, capsys):
    """`membound plan` for the default model with the engine's settings (CPU: fp32 KV, 16-token
    blocks, the fixture's 128 MiB KV budget) gives the engine's own memory plan."""
    engine, mem = smollm2.engine, smollm2.engine.memory
    assert main(["plan", "--gpu", "cpu", "--kv-cache-memory", "128", "--context", "1024", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["kv_dtype"] == costs.kv_dtype_name(engine.kv_spec.dtype) and plan["kv_budget_source"] == "given"
    assert plan["kv_bytes_per_token"] == engine.kv_spec.bytes_per_token
    assert plan["kv_block_bytes"] == engine.kv_spec.bytes_per_block
    assert plan["kv_blocks"] == pytest.approx(mem.num_blocks, rel=0.01)
    assert plan["kv_cache_bytes"] == pytest.approx(mem.kv_bytes, rel=0.01)
    assert plan["kv_tokens"] == pytest.approx(mem.kv_tokens, rel=0.01)
    assert plan["max_concurrency"] == int(mem.max_concurrency)  # whole sequences of 1024 tokens
    # In fact they are equal: one cost model.
    assert (plan["kv_blocks"], plan["kv_cache_bytes"]) == (mem.num_blocks, mem.kv_bytes)
    # Weights: the file's block bytes vs what the engine streams; within 6% (the Q8_0 table keeps
    # an fp32 scale per 32 weights where the file has an fp16 one; on a bf16 CPU the head reads
    # two nibble planes, each with a bf16 scale and zero per 32 weights).
    assert plan["weight_bytes_per_step"] == pytest.approx(doctor.engine_weight_bytes_per_step(engine), rel=0.06)


@pytest.mark.parametrize("kv", ["fp32", "bf16", "fp8", "int8"])
def test_plan_kv_bytes_are_the_engines_for_every_kv_dtype(kv):
    import torch

    from membound.engine.kv_cache import KVCacheSpec

    shape = load_shape("llama-3-8b")
    c = shape.config
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[kv]
    spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16, dtype)
    plan = make_plan(shape, get_gpu("h100-sxm"), 4096, 1, kv_dtype=kv)
    assert plan.kv_bytes_per_token == spec.bytes_per_token and plan.kv_block_bytes == spec.bytes_per_block


def test_plan_kv_budget_follows_the_engine_on_cpu_and_gpu():
    import torch

    from membound.config import EngineConfig
    from membound.engine.memory import kv_budget_bytes

    shape = load_shape(None)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = GPUSpec("CPU", ram / GIB, 50, 1, None, 0, cpu=True)
    plan = make_plan(shape, cpu, 1024, 1)
    from membound.cpu import has_native_bf16

    # The engine's auto dtype for the packed default: bf16 where the CPU has it in hardware.
    assert plan.kv_dtype == ("bf16" if has_native_bf16() else "fp32") and plan.kv_budget_source == "cpu default"
    assert plan.kv_budget_bytes == kv_budget_bytes(EngineConfig(), torch.device("cpu"), 0, 0)
    # A GPU: utilization x memory - weights - overhead, where the engine's overhead is its measured
    # activation peak (plus graphs and other processes' memory).
    gpu = _tiny_gpu(8 * GIB)
    plan = make_plan(shape, gpu, 1024, 1, gpu_memory_utilization=0.5, overhead_bytes=GIB)
    assert plan.kv_budget_source == "device"
    assert plan.kv_budget_bytes == int(0.5 * gpu.memory_bytes) - shape.weights.stored - GIB
    assert plan.kv_blocks == plan.kv_budget_bytes // plan.kv_block_bytes
