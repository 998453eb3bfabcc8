"""max_model_len="auto": the context (and KV precision) chosen to fit target_concurrency sequences,
by hand arithmetic: on the cost model's function, the config's edge, an engine on CPU, `membound plan`."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from membound import LLM, SamplingParams, costs
from membound.config import EngineConfig
from membound.entrypoints.cli import build_parser, main
from membound.errors import ConfigError
from membound.plan.gpus import GPUSpec, get_gpu
from membound.plan.planner import load_shape, make_plan, render

GIB = 2**30
MIB = 2**20
BS = 16


def fits(n: int, length: int, blocks: int) -> bool:
    """n sequences of `length` tokens fit in `blocks` blocks: each holds ceil(length / BS) of them."""
    return n * -(-length // BS) <= blocks


# ---------------------------------------------------------------------- the choice, by hand


@pytest.mark.parametrize(
    ("blocks", "n", "expected"),
    [
        (50, 4, 192),  # 50 // 4 = 12 blocks each
        (51, 4, 192),
        (52, 4, 208),  # 13 each
        (50, 1, 800),
        (50, 50, 16),  # one block each
        (7, 3, 32),
    ],
)
def test_chosen_context_fits_and_the_next_block_up_does_not(blocks, n, expected):
    per_token = 100  # 1,600 bytes a block
    for budget in (blocks * 1600, blocks * 1600 + 1599):  # a partial block buys nothing
        fit = costs.fit_context(budget, {"bf16": per_token}, BS, n, 100_000)
        assert fit.max_model_len == expected and fit.kv_dtype == "bf16"
        assert fits(n, expected, blocks) and not fits(n, expected + BS, blocks)
        assert costs.max_context(budget, per_token, BS, n) == expected


def test_capped_at_the_models_context_even_off_a_block_boundary():
    fit = costs.fit_context(50 * 1600, {"bf16": 100}, BS, 4, 100)  # 192 fit; the model has 100
    assert fit.max_model_len == 100
    assert "4 x 100 tokens" in fit.describe() and "(the model's full context)" in fit.describe()


BF16, FP8, INT8 = 200, 100, 108  # bytes per token: 3,200 / 1,600 / 1,728 a block


def test_kv_auto_keeps_the_run_dtype_when_the_full_context_fits():
    budget = 25 * 3200  # bf16: 25 blocks, 6 each at N=4: 96 tokens
    fit = costs.fit_context(budget, {"bf16": BF16, "fp8": FP8}, BS, 4, 96, choose_kv_dtype=True)
    assert (fit.max_model_len, fit.kv_dtype) == (96, "bf16") and fit.alternative is None
    fit = costs.fit_context(budget, {"bf16": BF16, "fp8": FP8}, BS, 4, 64, choose_kv_dtype=True)
    assert (fit.max_model_len, fit.kv_dtype) == (64, "bf16")


def test_kv_auto_takes_the_narrowest_when_the_run_dtype_falls_short():
    budget = 25 * 3200  # 80,000 bytes
    # PyTorch backend: fp8 (1,600 B a block: 50 blocks, 12 each) over int8 and bf16 (6 each).
    fit = costs.fit_context(budget, {"bf16": BF16, "fp8": FP8, "int8": INT8}, BS, 4, 1024, choose_kv_dtype=True)
    assert (fit.max_model_len, fit.kv_dtype) == (12 * BS, "fp8")
    assert fit.describe() == (
        "4 x 192 tokens in 0.1 MiB of fp8 KV (50 blocks of 16, 12 per sequence); bf16 would allow only 4 x 96"
    )
    # Triton: int8 (80,000 // 1,728 = 46 blocks, 11 each).
    fit = costs.fit_context(budget, {"bf16": BF16, "int8": INT8}, BS, 4, 1024, choose_kv_dtype=True)
    assert (fit.max_model_len, fit.kv_dtype) == (11 * BS, "int8")
    assert fits(4, 176, 46) and not fits(4, 192, 46)
    # Capped: int8 would hold 176 but the model has 150; still longer than bf16's 96.
    fit = costs.fit_context(budget, {"bf16": BF16, "int8": INT8}, BS, 4, 150, choose_kv_dtype=True)
    assert (fit.max_model_len, fit.kv_dtype) == (150, "int8")


def test_a_given_kv_dtype_is_kept_and_a_longer_alternative_reported():
    fit = costs.fit_context(25 * 3200, {"bf16": BF16, "fp8": FP8, "int8": INT8}, BS, 4, 1024)
    assert (fit.max_model_len, fit.kv_dtype, fit.alternative) == (96, "bf16", "fp8")
    assert fit.describe().endswith("; fp8 would allow 4 x 192")


def test_budget_too_small_for_a_block_each():
    with pytest.raises(ConfigError, match=r"target_concurrency=4 sequences need a 16-token block each.*3 blocks"):
        costs.fit_context(3 * 3200, {"bf16": BF16}, BS, 4, 1024, choose_kv_dtype=True)
    # A given bf16 cannot, fp8 could: the error says so.
    with pytest.raises(ConfigError, match=r"holds 2 blocks of bf16.*fp8 would hold 4 x 16 tokens"):
        costs.fit_context(4 * 1600, {"bf16": BF16, "fp8": FP8}, BS, 4, 1024)
    # With kv_cache_dtype auto the same budget runs on fp8.
    fit = costs.fit_context(4 * 1600, {"bf16": BF16, "fp8": FP8}, BS, 4, 1024, choose_kv_dtype=True)
    assert (fit.max_model_len, fit.kv_dtype) == (16, "fp8")
    assert "bf16 would allow only less than a block each" in fit.describe()
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ConfigError, match="target_concurrency must be a positive integer"):
            costs.fit_context(GIB, {"bf16": BF16}, BS, bad, 1024)


# ---------------------------------------------------------------------- the config's edge


def test_config_validation():
    assert EngineConfig(max_model_len="auto").target_concurrency == 1
    with pytest.raises(ConfigError, match=r"max_model_len must be a positive integer, 'auto' or None, got 'max'"):
        EngineConfig(max_model_len="max")
    with pytest.raises(ConfigError, match=r"max_model_len must be a positive integer, 'auto' or None, got 'AUTO'"):
        EngineConfig(max_model_len="AUTO")
    with pytest.raises(ConfigError, match=r"target_concurrency \(4\) sizes max_model_len='auto'.*is None"):
        EngineConfig(target_concurrency=4)
    with pytest.raises(ConfigError, match=r"give max_model_len='auto' with it \(max_model_len is 1024\)"):
        EngineConfig(max_model_len=1024, target_concurrency=4)
    for bad in (0, -2, True, "4"):
        with pytest.raises(ConfigError, match="target_concurrency must be a positive integer"):
            EngineConfig(max_model_len="auto", target_concurrency=bad)


def test_max_num_seqs_raised_to_the_target(caplog):
    with caplog.at_level(logging.INFO, logger="membound"):
        c = EngineConfig(max_model_len="auto", target_concurrency=8, max_num_seqs=4)
    assert c.max_num_seqs == 8 and "max_num_seqs raised from 4 to target_concurrency=8" in caplog.text
    assert EngineConfig(max_model_len="auto", target_concurrency=8).max_num_seqs == 256  # already enough
    with pytest.raises(ConfigError, match=r"target_concurrency \(4096\) needs max_num_batched_tokens \(2048\)"):
        EngineConfig(max_model_len="auto", target_concurrency=4096)


def test_cli_flags():
    p = build_parser()
    a = p.parse_args(["generate", "x", "--max-model-len", "auto", "--target-concurrency", "8"])
    assert (a.max_model_len, a.target_concurrency) == ("auto", 8)
    assert p.parse_args(["generate", "x", "--max-model-len", "512"]).max_model_len == 512
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "x", "--max-model-len", "big"])
    assert main(["generate", "x", "--target-concurrency", "8"]) == 2  # a ConfigError before any loading


def test_kv_precisions_weighed_per_backend():
    from membound.engine.builder import kv_fit_options
    from membound.engine.kv_cache import KVCacheSpec

    spec = KVCacheSpec(30, 3, 64, 16, torch.bfloat16)
    assert list(kv_fit_options(spec, "torch", 9, torch.bfloat16)) == ["bf16", "fp8", "int8"]
    assert list(kv_fit_options(spec, "triton", 9, torch.bfloat16)) == ["bf16", "int8"]  # no fp8 on Triton
    given = KVCacheSpec(30, 3, 64, 16, torch.int8)
    assert list(kv_fit_options(given, "torch", 9, torch.bfloat16)) == ["int8", "fp8"]  # the given one first
    # fp32 over an int8 cache needs pages of at most 64 tokens on the Triton kernels: not weighed.
    wide = KVCacheSpec(30, 3, 64, 128, torch.float32)
    assert list(kv_fit_options(wide, "triton", 9, torch.float32)) == ["fp32"]


# ---------------------------------------------------------------------- an engine on CPU

SMOL = (30, 3, 64)  # SmolLM2-135M: layers, KV heads, head_dim; 8,192 positions
BUDGET = 64 * MIB


def smol_per_token(kv: str) -> int:
    return costs.kv_bytes_per_token(*SMOL, kv)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _engine(**kw) -> tuple[LLM, list[str]]:
    log = logging.getLogger("membound")
    handler, level = _Lines(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        llm = LLM(max_model_len="auto", kv_cache_memory_bytes=BUDGET, device="cpu", **kw)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return llm, [line for line in handler.lines if line.startswith("max_model_len=auto")]


@pytest.fixture(scope="module")
def auto4():
    return _engine(target_concurrency=4)


def run_dtype() -> str:
    """The engine's run dtype for the packed default model on this CPU (bf16 where it is in hardware)."""
    return costs.kv_dtype_name(EngineConfig().torch_dtype(torch.device("cpu"), packed_weights=True))


def test_engine_picks_fp8_and_the_longest_context_for_4_sequences(auto4):
    llm, lines = auto4
    e = llm.engine
    # 64 MiB = 67,108,864 B. bf16: 23,040 B/token, 368,640 B a block: 182 blocks, 45 each: 720 tokens
    # (fp32: 91 blocks, 22 each: 352), short of the model's 8,192, so fp8: 11,520 B/token, 184,320 B a
    # block: 364 blocks, 91 each: 1,456 tokens.
    assert smol_per_token("fp8") == 11_520 and BUDGET // (11_520 * 16) == 364
    assert e.max_model_len == 91 * 16 == 1456
    assert e.kv_spec.dtype == torch.float8_e4m3fn and e.memory.num_blocks == 364
    assert fits(4, 1456, 364) and not fits(4, 1456 + BS, 364)
    run = run_dtype()
    run_len = BUDGET // (smol_per_token(run) * 16) // 4 * 16
    assert run_len == {"bf16": 720, "fp32": 352}[run]
    assert lines == [
        "max_model_len=auto: 4 x 1,456 tokens in 64.0 MiB of fp8 KV (364 blocks of 16, 91 per sequence); "
        f"{run} would allow only 4 x {run_len:,}"
    ]
    assert e.parts.input_batch.max_blocks == 91  # block tables as wide as the chosen context
    out = llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=2, temperature=0))
    assert all(len(o.outputs[0].token_ids) == 2 for o in out)


def test_engine_keeps_a_given_kv_dtype_and_names_the_longer_one():
    llm, lines = _engine(target_concurrency=4, kv_cache_dtype="int8")
    # int8: 2 x 30 x 3 x (64 + 4) = 12,240 B/token, 195,840 B a block: 342 blocks, 85 each: 1,360 tokens.
    assert BUDGET // (12_240 * 16) == 342
    assert llm.engine.max_model_len == 85 * 16 == 1360 and llm.engine.kv_spec.dtype == torch.int8
    assert lines == [
        "max_model_len=auto: 4 x 1,360 tokens in 64.0 MiB of int8 KV (342 blocks of 16, 85 per sequence); "
        "fp8 would allow 4 x 1,456"
    ]


# ---------------------------------------------------------------------- membound plan


def test_plan_prints_the_engines_choice(auto4):
    _, lines = auto4
    shape = load_shape(None)
    cpu = GPUSpec("CPU", 16, 50, 1, None, 0, cpu=True)
    plan = make_plan(shape, cpu, "auto", 4, kv_cache_memory_bytes=BUDGET)
    assert (plan.context, plan.kv_dtype, plan.kv_blocks) == (1456, "fp8", 364)
    assert plan.max_context == 1456 and plan.max_concurrency == 4
    assert f"max_model_len=auto: {plan.context_fit.describe()}" == lines[0]
    assert f"context   auto: {plan.context_fit.describe()}" in render(plan, shape).splitlines()


def test_plan_by_hand_on_a_gpu():
    shape = load_shape("llama-3-8b")  # 131,072 B/token in bf16: 2 MiB a block; int8 67,584 B/token
    room = 2400 * 2 * MIB + 2 * MIB - 1  # 2,400 bf16 blocks and most of another
    gpu = GPUSpec("test", (shape.weights.stored + GIB + room) / GIB, 1000, 100, None, 1)
    plan = make_plan(shape, gpu, "auto", 8, kv_dtype="bf16", gpu_memory_utilization=1.0)
    assert plan.kv_budget_bytes == room and plan.kv_blocks == 2400
    assert (plan.context, plan.kv_dtype) == (300 * 16, "bf16")  # 2,400 // 8 = 300 blocks each
    assert fits(8, 4800, 2400) and not fits(8, 4800 + BS, 2400)
    # int8 (the Triton backend's): room // 1,081,344 = 4,656 blocks, 582 each: 9,312, capped at 8,192.
    assert room // (67_584 * 16) == 4656
    assert plan.context_fit.describe().endswith("; int8 would allow 8 x 8,192")
    auto = make_plan(shape, gpu, "auto", 8, gpu_memory_utilization=1.0)
    assert (auto.context, auto.kv_dtype) == (8192, "int8")
    assert auto.context_fit.describe() == (
        "8 x 8,192 tokens in 4.69 GiB of int8 KV (the model's full context); bf16 would allow only 8 x 4,800"
    )
    with pytest.raises(ConfigError, match="context must be a positive integer or 'auto'"):
        make_plan(shape, gpu, "longest", 8)


def test_plan_cli(capsys):
    args = ["plan", "llama-3-8b", "--gpu", "rtx-4090", "--context", "auto", "--concurrency", "8", "--kv-dtype"]
    assert main([*args, "bf16", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    blocks = p["kv_budget_bytes"] // (131_072 * 16)
    assert p["context"] == blocks // 8 * 16 < 8192 and p["kv_dtype"] == "bf16"
    assert p["context_fit"]["max_model_len"] == p["context"]
    assert main([*args, "auto"]) == 0
    out = capsys.readouterr().out
    plan = make_plan(load_shape("llama-3-8b"), get_gpu("rtx-4090"), "auto", 8)
    assert plan.kv_dtype == "int8" and f"context   auto: {plan.context_fit.describe()}\n" in out
