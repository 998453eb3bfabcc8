"""batch_invariant: a seeded request gives the same tokens alone as under any load (issue 20, finding 3).

The load that broke it: staggered arrivals, chunked prefill, a KV pool small enough to preempt, prompts
that share prefixes (cache hits), sampling at temperature 1-2 with every setting. On the default model
(packed int4 weights, bf16 where the CPU has it) the default path differs for about a third of the
requests (measured: 5 of 16); batch_invariant must make every one identical.
"""

from __future__ import annotations

import pytest
import torch

from membound.attention.base import AttentionMetadata
from membound.attention.torch_paged import TorchPagedAttention, prefill_attention, write_kv
from membound.config import EngineConfig
from membound.engine.llm_engine import LLMEngine
from membound.errors import ConfigError
from membound.layers.invariant import TILE, RowTiled, rows_independent
from membound.sampling_params import SamplingParams
from tests.conftest import write_tiny_config

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum old songs of the sea".split()
SHARED = "You are a helpful assistant. Answer briefly and truthfully, then stop. " * 2


def _requests(n: int = 16) -> list[tuple[str, SamplingParams]]:
    out = []
    for i in range(n):
        r = (i * 3) % len(WORDS)
        body = " ".join(WORDS[r:] + WORDS[:r]) * (1 + i % 3)
        prompt = (SHARED if i % 2 else "") + body  # half share a 2-block prefix: prefix-cache hits
        params = SamplingParams(
            temperature=1.0 + (i % 5) * 0.25,
            seed=1000 + i,
            max_tokens=32,
            ignore_eos=True,
            top_p=0.9 if i % 3 == 0 else 1.0,
            top_k=40 if i % 4 == 1 else 0,
            min_p=0.05 if i % 5 == 2 else 0.0,
            repetition_penalty=1.1 if i % 2 else 1.0,
            presence_penalty=0.5 if i % 6 == 3 else 0.0,
        )
        out.append((prompt, params))
    return out


def _alone(cfg: EngineConfig, reqs) -> dict[str, list[int]]:
    e = LLMEngine(cfg)
    outs = {}
    for i, (prompt, params) in enumerate(reqs):
        e.reset_prefix_cache()  # alone means alone: nothing reused from the request before
        e.add_request(f"r{i}", prompt, params)
        while e.has_unfinished_requests():
            for o in e.step():
                if o.finished:
                    outs[o.request_id] = list(o.outputs[0].token_ids)
    return outs


def _under_load(cfg: EngineConfig, reqs) -> tuple[dict[str, list[int]], LLMEngine]:
    e = LLMEngine(cfg)
    outs, i, step = {}, 0, 0
    while i < len(reqs) or e.has_unfinished_requests():
        if i < len(reqs) and step % 2 == 0:  # a new arrival every other step, mid-decode of the others
            e.add_request(f"r{i}", *reqs[i])
            i += 1
        step += 1
        for o in e.step():
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
    return outs, e


@pytest.mark.parametrize("dtype", ["auto", "float32"])  # bf16 + C ops where the CPU has bf16; fp32 + PyTorch
def test_seeded_requests_alone_equal_under_staggered_chunked_preempting_load(dtype):
    reqs = _requests()
    base = dict(max_model_len=256, batch_invariant=True, dtype=dtype)
    alone = _alone(EngineConfig(**base, kv_cache_memory_bytes=64 << 20), reqs)
    # 40-token steps chunk every prompt; ~270 tokens of KV cannot hold 8 sequences.
    kv = (3 << 20) * EngineConfig(dtype=dtype).torch_dtype(torch.device("cpu"), True).itemsize
    loaded, e = _under_load(
        EngineConfig(**base, kv_cache_memory_bytes=kv, max_num_batched_tokens=40, max_num_seqs=8), reqs
    )
    s = e.stats()
    assert s.num_preemptions > 0 and s.prefix_cache_hits > 0  # the load had both
    assert s.prompt_tokens_computed > sum(len(e.tokenizer.encode(p)) for p, _ in reqs) * 0.5
    differ = [k for k in alone if alone[k] != loaded[k]]
    assert len(alone) == len(loaded) == 16 and not differ, differ


def test_the_thread_count_stays_fixed_under_batch_invariant(tmp_path):
    """A BLAS may split a row's sums differently at another thread count (MKL does for group-wise int8
    layers), so the thread governor must not change it while batch_invariant is on."""
    from membound.engine.builder import build_engine

    model = write_tiny_config(tmp_path / "m")
    kw = dict(model=str(model), load_format="dummy", skip_tokenizer_init=True, max_model_len=64)
    assert build_engine(EngineConfig(**kw, batch_invariant=True)).core.threads.fixed
    assert not build_engine(EngineConfig(**kw)).core.threads.fixed


def test_batch_invariant_is_refused_off_the_cpu_path():
    with pytest.raises(ConfigError, match="batch_invariant must be True or False"):
        EngineConfig(batch_invariant="yes")
    with pytest.raises(ConfigError, match="PyTorch attention backend only"):
        from membound.attention import get_backend

        get_backend("triton", torch.device("cpu"), batch_invariant=True)


def test_rows_independent_sees_a_row_count_dependence_and_row_tiling_removes_it():
    torch.manual_seed(0)
    w = torch.randn(64, 48)

    def fake_blas(x: torch.Tensor) -> torch.Tensor:
        # A kernel switch at 16 rows, as MKL's sgemm has: the big-batch path rounds through bf16.
        y = x @ w.T
        return y.bfloat16().float() if x.shape[0] >= 16 else y

    assert not rows_independent(fake_blas, 48, torch.float32, 64)
    tiled = RowTiled(fake_blas)
    assert rows_independent(tiled, 48, torch.float32, 64)
    x = torch.randn(2 * TILE + 3, 48)
    assert torch.equal(tiled(x), x @ w.T)  # the tiles below the switch compute the plain product


def _meta(
    seq_lens: list[int], q_lens: list[int], block_size: int, tables: list[list[int]], num_decodes: int
) -> AttentionMetadata:
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    slots = []
    for n, q, table in zip(seq_lens, q_lens, tables, strict=True):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(n - q, n)]
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        num_decodes=num_decodes,
        seq_lens_host=tuple(seq_lens),
        query_start_loc_host=tuple(starts),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_rowwise_attention_matches_causal_prefill_and_ignores_its_batch(dtype, window):
    """Each row alone (the batch-invariant backend) equals the causal reference, and a row's bits do not
    change with what else is in the step or how its sequence's prompt was chunked."""
    g = torch.Generator().manual_seed(1)
    kvh, h, d, bs, nblocks = 2, 4, 16, 4, 16
    k_cache = torch.randn(kvh, nblocks, bs, d, generator=g).to(dtype)
    v_cache = torch.randn(kvh, nblocks, bs, d, generator=g).to(dtype)
    table_a, table_b = [3, 7, 1, 9], [2, 5, 11]
    qa = torch.randn(13, h, d, generator=g).to(dtype)  # sequence a: 13 tokens
    qb = torch.randn(9, h, d, generator=g).to(dtype)
    backend = TorchPagedAttention(batch_invariant=True)
    scale = d**-0.5
    # Whole prompt a alone, reference first.
    meta = _meta([13], [13], bs, [table_a], 0)
    ref = prefill_attention(qa, k_cache, v_cache, meta.block_tables[0], 13, scale, window)
    whole = backend.attend(qa, k_cache, v_cache, meta, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(whole.float(), ref.float(), atol=tol, rtol=tol)
    # Sequence a's last 5 tokens as a chunk, beside a decode of b (9 cached) and a chunk of b.
    meta2 = _meta([9, 13], [1, 5], bs, [table_b, table_a], 1)
    mixed = backend.attend(torch.cat((qb[8:9], qa[8:])), k_cache, v_cache, meta2, scale, window)
    assert torch.equal(mixed[1:], whole[8:])  # the same bits for a's rows
    alone_b = backend.attend(qb[8:9], k_cache, v_cache, _meta([9], [1], bs, [table_b], 1), scale, window)
    assert torch.equal(mixed[:1], alone_b)


def test_row_kv_metadata_is_each_rows_position_plus_one():
    meta = _meta([6, 10, 3], [1, 4, 3], 4, [[1, 2], [3, 4, 5], [6]], 1)
    tables, lens, host = meta.row_kv
    assert host == [6, 7, 8, 9, 10, 1, 2, 3] and lens.tolist() == host
    assert tables[:, 0].tolist() == [1, 3, 3, 3, 3, 6, 6, 6]


def test_write_kv_then_rowwise_equals_default_backend_closely():
    """The invariant path computes the same attention as the default one (to rounding)."""
    g = torch.Generator().manual_seed(2)
    kvh, h, d, bs, nblocks = 2, 4, 16, 4, 8
    k_cache = torch.zeros(kvh, nblocks, bs, d)
    v_cache = torch.zeros(kvh, nblocks, bs, d)
    meta = _meta([7, 5], [1, 5], bs, [[1, 2], [4, 5]], 1)
    k = torch.randn(6, kvh, d, generator=g)
    v = torch.randn(6, kvh, d, generator=g)
    k_cache.normal_(generator=g)
    v_cache.normal_(generator=g)
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping, None)
    q = torch.randn(6, h, d, generator=g)
    a = TorchPagedAttention(batch_invariant=True).attend(q, k_cache, v_cache, meta, d**-0.5, None)
    b = TorchPagedAttention().attend(q, k_cache, v_cache, meta, d**-0.5, None)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_server_seeded_streams_under_load_equal_the_same_requests_alone(tmp_path):
    """The finding as it was seen: seeded requests at temperature 2 through `membound serve`, streamed
    concurrently with staggered starts, against the same bodies sent one at a time, not streamed."""
    import json
    import threading
    import time

    import httpx

    from tests.server_utils import ServerProcess

    server = ServerProcess(
        ["--max-model-len", "256", "--kv-cache-memory", "6", "--batch-invariant"], tmp_path / "s.log"
    )
    try:
        bodies = [
            {"prompt": p, "seed": sp.seed, "temperature": 2.0 if i % 2 else 1.2, "top_p": sp.top_p,
             "max_tokens": 24, "ignore_eos": True}
            for i, (p, sp) in enumerate(_requests(12))
        ]  # fmt: skip
        url = f"{server.url}/v1/completions"
        alone = [httpx.post(url, json=b, timeout=120).json()["choices"][0]["text"] for b in bodies]
        streamed: dict[int, str] = {}

        def stream(i: int) -> None:
            time.sleep(0.15 * i)  # arrivals staggered across each other's prefill and decode
            parts = []
            with httpx.stream("POST", url, json={**bodies[i], "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        parts.append(json.loads(line[6:])["choices"][0]["text"])
            streamed[i] = "".join(parts)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert [streamed.get(i) for i in range(len(bodies))] == alone
    finally:
        assert server.stop() == 0, server.log_tail()


def _logits_alone_and_beside_others(batch_invariant: bool, tmp_path) -> tuple[int, list[int]]:
    """A dummy fp32 model whose matmuls MKL computes by row count and whose MLP is wide enough for
    PyTorch to split SiLU mid-row across 3 threads: sequence A's logits alone vs beside a sequence B of
    1-24 tokens in the same step. Returns (tiled layers, B's lengths at which A's logits changed)."""
    from membound.engine.builder import build_engine

    model = write_tiny_config(tmp_path / "m", hidden_size=128, intermediate_size=2560, vocab_size=256)
    parts = build_engine(
        EngineConfig(
            model=str(model), load_format="dummy", skip_tokenizer_init=True, dtype="float32", max_model_len=128,
            kv_cache_memory_bytes=16 << 20, num_threads=3, batch_invariant=batch_invariant,
        )
    )  # fmt: skip
    m, kv, bs = parts.model, parts.runner.kv_caches, parts.config.block_size
    ids = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0))

    def run(seqs: list[torch.Tensor], tables: list[list[int]]) -> torch.Tensor:
        meta = _meta([len(s) for s in seqs], [len(s) for s in seqs], bs, tables, 0)
        positions = torch.cat([torch.arange(len(s)) for s in seqs])
        return m.compute_logits(m(torch.cat(seqs), positions, kv, meta))

    a = ids[:40]
    with torch.inference_mode():
        alone = run([a], [[0, 1, 2]])
        changed = [
            n for n in range(1, 25) if not torch.equal(run([ids[40 : 40 + n], a], [[5, 6], [0, 1, 2]])[n:], alone)
        ]
    tiled = sum(1 for name, _ in m.named_modules() if name.endswith(".inner"))
    return tiled, changed


def test_tiled_fp32_matmuls_and_serial_silu_make_logits_independent_of_the_step(tmp_path):
    tiled, changed = _logits_alone_and_beside_others(True, tmp_path / "inv")
    assert tiled == 8 and changed == []  # qkv, o, gate_up, down of both layers: MKL's fp32 kernels
    _, changed = _logits_alone_and_beside_others(False, tmp_path / "default")
    assert changed  # the check has teeth: without the mode, A's logits move with B
