"""The CPU fast path (issue 15): thread choice, start-up pieces, and each rewritten op against a reference."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from membound import cpu
from membound.attention.torch_paged import decode_attention
from membound.config import EngineConfig
from membound.engine.kv_cache import _lazy_zeros
from membound.errors import ConfigError
from membound.kernels import cpu as cpu_ops
from membound.layers.rotary import apply_rope, half_tables
from membound.quant.linear import Int4Linear, Int8Embedding

# ------------------------------------------------------------------ cores and threads


def test_usable_cores_follow_affinity_and_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: None)
    assert cpu.usable_cores() == 4
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: 2.5)
    assert cpu.usable_cores() == 2
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: 0.5)
    assert cpu.usable_cores() == 1


def test_cgroup_quota_is_read_from_cpu_max(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path) is None
    assert cpu.cgroup_cpu_limit(tmp_path / "missing") is None


class FakeMeter:
    def __init__(self, others: list[float]) -> None:
        self.others = others

    def sample(self):
        return cpu.CpuLoad(cores=2, busy=2.0, own=2.0 - self.others.pop(0), interval_s=0.5)


def governor(others: list[float], fixed: bool = False) -> tuple[cpu.ThreadGovernor, list[int]]:
    calls: list[int] = []
    g = cpu.ThreadGovernor(2, fixed=fixed, interval_s=0.0, set_threads=calls.append)
    g._meter = FakeMeter(others)
    return g, calls


def test_governor_gives_up_a_core_a_neighbour_keeps_busy_and_takes_it_back():
    # Sharing a core, a busy neighbour shows as about half a core: two such readings drop a thread.
    g, calls = governor([0.5, 0.5, 1.0, 0.0, 0.0])
    assert [g.tick() for _ in range(5)] == [2, 1, 1, 1, 2]
    assert calls == [2, 1, 2] and g.changes == 2


def test_governor_ignores_a_single_burst_and_small_loads():
    g, calls = governor([0.9, 0.0, 0.2, 0.1, 0.2])
    assert [g.tick() for _ in range(5)] == [2, 2, 2, 2, 2]
    assert calls == [2] and g.changes == 0


def test_fixed_thread_count_is_applied_once_and_kept():
    g, calls = governor([1.0, 1.0, 1.0], fixed=True)
    assert [g.tick() for _ in range(3)] == [2, 2, 2] and calls == [2]


def test_load_meter_reads_proc_stat():
    meter = cpu.CpuLoadMeter()
    if meter.sample() is None and not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    x = 0
    for i in range(2_000_000):  # keep this process busy for a moment
        x += i
    load = meter.sample()
    assert load is not None and load.own > 0 and load.interval_s > 0 and load.cores == len(cpu.allowed_cpus())


def test_num_threads_is_validated_and_reaches_the_engine(tiny_model_dir):
    with pytest.raises(ConfigError, match="num_threads must be a positive integer"):
        EngineConfig(num_threads=0)
    from membound import LLM

    before = torch.get_num_threads()
    try:
        llm = LLM(str(tiny_model_dir), num_threads=1, skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 20)
        assert torch.get_num_threads() == 1 and llm.engine.stats().num_threads == 1
    finally:
        torch.set_num_threads(before)


def test_auto_dtype_on_cpu_is_bf16_only_for_packed_weights_on_bf16_hardware(monkeypatch):
    c, dev = EngineConfig(), torch.device("cpu")
    monkeypatch.setattr(cpu, "has_native_bf16", lambda: True)
    assert c.torch_dtype(dev, packed_weights=True) == torch.bfloat16
    assert c.torch_dtype(dev, packed_weights=False) == torch.float32
    monkeypatch.setattr(cpu, "has_native_bf16", lambda: False)
    assert c.torch_dtype(dev, packed_weights=True) == torch.float32
    assert EngineConfig(dtype="bf16").torch_dtype(dev) == torch.bfloat16


# ------------------------------------------------------------------ start-up pieces


def test_metadata_reader_matches_gguf_reader_and_skips_only_big_string_arrays():
    from gguf import GGUFReader

    from membound.model.loader import GGUFFile
    from membound.model.registry import default_model_path

    path = default_model_path()
    ours, theirs = GGUFFile(path), GGUFReader(path)
    assert [t.name for t in ours.reader.tensors] == [t.name for t in theirs.tensors]
    assert all(
        a.data_offset == b.data_offset and a.tensor_type == b.tensor_type
        for a, b in zip(ours.reader.tensors, theirs.tensors, strict=True)
    )
    skipped = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"}  # 49k and 48k strings: only their length
    for key, field in theirs.fields.items():
        if key in skipped:
            assert ours.array_length(key) == len(field.data) and ours.field(key) == []
        else:  # scalars, strings, and numeric arrays (token types) read whole as one view
            assert ours.field(key) == field.contents(), key
    assert ours.config().vocab_size == len(theirs.fields["tokenizer.ggml.tokens"].data) == 49152


def test_lazy_zeros_are_zero_and_writable():
    t = _lazy_zeros((3, 2, 5, 4), torch.bfloat16)
    assert t.shape == (3, 2, 5, 4) and t.dtype == torch.bfloat16 and not t.any()
    t[1, 1] = 2.0
    assert t.sum().item() == 40.0


# ------------------------------------------------------------------ ops against references


def test_rope_roll_form_matches_the_half_by_half_rotation():
    gen = torch.Generator().manual_seed(0)
    t, h, d = 5, 4, 16
    x = torch.randn(t, h, d, generator=gen)
    theta = torch.rand(t, d // 2, generator=gen) * 6
    cos, sin = theta.cos(), theta.sin()
    full_cos, signed_sin = torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    want = torch.cat((x1 * cos[:, None] - x2 * sin[:, None], x2 * cos[:, None] + x1 * sin[:, None]), -1)
    torch.testing.assert_close(apply_rope(x, full_cos, signed_sin), want)
    c, s = half_tables(full_cos, signed_sin)
    assert torch.equal(c, cos) and torch.equal(s, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,window", [(1, None), (1, 7), (4, None), (4, 9)])
def test_sdpa_decode_attention_matches_the_matmul_reference(dtype, batch, window):
    gen = torch.Generator().manual_seed(batch)
    kvh, h, d, bs, blocks = 2, 6, 16, 4, 12
    k_cache = torch.randn(kvh, blocks, bs, d, generator=gen).to(dtype)
    v_cache = torch.randn(kvh, blocks, bs, d, generator=gen).to(dtype)
    q = torch.randn(batch, h, d, generator=gen).to(dtype)
    lens = torch.tensor([11, 5, 16, 9][:batch], dtype=torch.int32)
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:4] for _ in range(batch)]).to(torch.int32)
    got = decode_attention(q, k_cache, v_cache, tables, lens, 0.25, window, None, int(lens.max()))
    # By hand, one sequence and one head at a time, in fp32: the tokens this query may see.
    want = torch.empty(batch, h, d)
    for b in range(batch):
        n = int(lens[b])
        keys = k_cache.float()[:, tables[b].long()].reshape(kvh, -1, d)[:, :n]
        values = v_cache.float()[:, tables[b].long()].reshape(kvh, -1, d)[:, :n]
        lo = 0 if window is None else max(0, n - window)
        for head in range(h):
            g = head // (h // kvh)
            p = torch.softmax(keys[g, lo:] @ q[b, head].float() * 0.25, -1)
            want[b, head] = p @ values[g, lo:]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_int4_dense_rows_match_the_packed_kernel_and_leave_decode_rows_alone():
    gen = torch.Generator().manual_seed(3)
    n, k = 192, 128
    layer = Int4Linear.quantize(torch.randn(n, k, generator=gen), 32)
    x = torch.randn(70, k, generator=gen).to(torch.bfloat16)
    packed = layer(x)
    mixed = layer.forward_rows(x, 6)
    assert torch.equal(mixed[:6], packed[:6])  # decode rows: the packed kernel, bit for bit
    exact = x.float() @ layer.dequantize().t()
    torch.testing.assert_close(mixed[6:].float(), exact[6:], atol=0.01 * exact.abs().max().item(), rtol=0)  # bf16


def test_int8_head_planes_give_the_table_s_logits():
    gen = torch.Generator().manual_seed(4)
    n, k, g = 128, 96, 32
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    d = torch.rand(n, k // g, generator=gen) * 0.02
    m = torch.rand(n, k // g, generator=gen) * 0.01
    emb = Int8Embedding(q, d, m, g, dtype=torch.bfloat16)
    assert emb.planes_nbytes() > 0
    x = torch.randn(3, k, generator=gen)
    w = (q.float().view(n, -1, g) * d[..., None] + m[..., None]).view(n, k)
    want = x.bfloat16().float() @ w.t()
    got = emb.logits(x.bfloat16()).float()
    torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item(), rtol=0)
    sym = Int8Embedding(q, d, None, g, dtype=torch.bfloat16)  # Q8_0: no offset
    w0 = (q.float().view(n, -1, g) * d[..., None]).view(n, k)
    want0 = x.bfloat16().float() @ w0.t()
    torch.testing.assert_close(sym.logits(x.bfloat16()).float(), want0, atol=0.02 * want0.abs().max().item(), rtol=0)
    untied = Int8Embedding(q, d, m, g, dtype=torch.bfloat16, head=False)  # lookups only: no planes
    assert untied.planes_nbytes() == 0
    fp32 = Int8Embedding(q, d, m, g, dtype=torch.float32)  # no planes: the exact chunked path
    assert fp32.planes_nbytes() == 0
    torch.testing.assert_close(fp32.logits(x), x @ w.t(), atol=1e-4, rtol=1e-4)
    assert np.isfinite(got.numpy()).all()


def test_released_gguf_pages_read_back_the_same_bytes():
    from membound.model.loader import GGUFFile
    from membound.model.registry import default_model_path

    g = GGUFFile(default_model_path())
    name = "blk.3.ffn_down.weight"
    before = np.array(g.tensors[name].data)
    g.release_pages(name, "token_embd.weight")
    assert np.array_equal(np.array(g.tensors[name].data), before)  # faulted back in from the file


# ------------------------------------------------------------------ the fused C ops (kernels/cpu_ops.c)

needs_c_ops = pytest.mark.skipif(not cpu_ops.available(), reason="membound.kernels._cpu_ops not built")


def test_c_ops_are_built_where_a_compiler_is():
    import shutil

    assert cpu_ops.available() or shutil.which("cc") is None and shutil.which("gcc") is None


@needs_c_ops
@pytest.mark.parametrize("with_residual", [False, True])
def test_c_add_rms_norm_matches_the_pytorch_one(with_residual):
    from membound.layers.norm import add_rms_norm

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 96, generator=gen).to(torch.bfloat16)
    res = torch.randn(7, 96, generator=gen).to(torch.bfloat16) if with_residual else None
    w = (torch.rand(96, generator=gen) + 0.5).to(torch.bfloat16)
    want_h, want_r = add_rms_norm(x, res, w, 1e-5)
    got_h, got_r = cpu_ops.add_rms_norm(x.clone(), None if res is None else res.clone(), w, 1e-5)
    assert torch.equal(got_r, want_r)  # the sum, rounded to bf16 once, as PyTorch does
    torch.testing.assert_close(got_h.float(), want_h.float(), atol=0, rtol=8e-3)  # within one bf16 ulp


@needs_c_ops
def test_c_rope_write_kv_matches_the_pytorch_one():
    from membound.layers.rotary import rope_write_kv

    gen = torch.Generator().manual_seed(6)
    t, h, kvh, d, blocks, bs = 5, 6, 2, 16, 4, 4
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=gen).to(torch.bfloat16)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], -1)
    q, k, v = q.view(t, h, d), k.view(t, kvh, d), v.view(t, kvh, d)
    theta = torch.rand(9, d // 2, generator=gen) * 6
    cos, sin = theta.cos().to(torch.bfloat16), theta.sin().to(torch.bfloat16)
    rows = torch.tensor([3, 0, 8, 8, 1])
    slots = torch.randperm(blocks * bs, generator=gen)[:t]
    caches = [[torch.randn(kvh, blocks, bs, d, generator=gen).to(torch.bfloat16) for _ in range(2)] for _ in range(2)]
    caches[1] = [c.clone() for c in caches[0]]
    want = rope_write_kv(q, k, v, cos, sin, rows, caches[0][0], caches[0][1], slots)
    got = cpu_ops.rope_write_kv(qkv, h, kvh, d, cos, sin, rows, caches[1][0], caches[1][1], slots)
    # PyTorch rounds x cos to bf16 before adding; the C op rounds once: a bf16 ulp of the inputs apart.
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(caches[1][0].float(), caches[0][0].float(), atol=1e-2, rtol=8e-3)
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slots] = False
    cache_k = caches[1][0].view(kvh, -1, d)
    assert torch.equal(cache_k[:, untouched], caches[0][0].view(kvh, -1, d)[:, untouched])  # other slots kept
    assert torch.equal(caches[1][1], caches[0][1])  # v copied as it is


@needs_c_ops
@pytest.mark.parametrize("heads,window", [(2, None), (4, 5), (8, 2)])
def test_c_decode_attention_matches_the_pytorch_reference(heads, window):
    from membound.attention.torch_paged import _decode_bmm

    gen = torch.Generator().manual_seed(heads)
    kv = [torch.randn(2, 6, 4, 16, generator=gen).to(torch.bfloat16) for _ in range(2)]
    qkv = torch.randn(3, heads + 5, 16, generator=gen).to(torch.bfloat16)
    q = qkv[:, :heads]  # rows strided, as the fused projection's q is
    tables = torch.tensor([[1, 2, 0], [3, 4, 5], [5, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([7, 12, 3], dtype=torch.int32)
    got = cpu_ops.decode_attention(q, *kv, tables, lens, 0.25, window)
    want = _decode_bmm(q.float(), kv[0].float(), kv[1].float(), tables, lens, 0.25, window)
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)


@needs_c_ops
def test_c_ops_refuse_indices_out_of_range_instead_of_writing_past_the_cache():
    kv = [torch.zeros(2, 3, 4, 16, dtype=torch.bfloat16) for _ in range(2)]
    q = torch.randn(1, 4, 16).to(torch.bfloat16)
    with pytest.raises(IndexError, match="block"):
        cpu_ops.decode_attention(
            q, *kv, torch.tensor([[7]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32), 1.0, None
        )
    with pytest.raises(IndexError, match="length"):
        cpu_ops.decode_attention(
            q, *kv, torch.tensor([[0]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32), 1.0, None
        )
    qkv = torch.randn(1, (4 + 4) * 16).to(torch.bfloat16)
    table = torch.randn(4, 8).to(torch.bfloat16)
    with pytest.raises(IndexError, match="slot"):
        cpu_ops.rope_write_kv(qkv, 4, 2, 16, table, table, torch.tensor([0]), *kv, torch.tensor([12]))
    assert not kv[0].any() and not kv[1].any()  # nothing written


@needs_c_ops
def test_c_decode_attention_is_the_path_bf16_batches_take():
    gen = torch.Generator().manual_seed(7)
    k_cache = torch.randn(2, 6, 4, 16, generator=gen).to(torch.bfloat16)
    q = torch.randn(3, 4, 16, generator=gen).to(torch.bfloat16)
    tables, lens = (
        torch.tensor([[1, 2, 0], [3, 4, 5], [5, 0, 0]], dtype=torch.int32),
        torch.tensor([7, 12, 3], dtype=torch.int32),
    )
    assert cpu_ops.decode_attention(q, k_cache, k_cache, tables, lens, 0.25, None) is not None
    assert cpu_ops.decode_attention(q.float(), k_cache.float(), k_cache.float(), tables, lens, 0.25, None) is None
    wide = torch.randn(cpu_ops.MAX_DECODE_BATCH + 1, 4, 16).to(torch.bfloat16)  # many rows: SDPA's threads
    many = tables[:1].repeat(wide.shape[0], 1)
    assert cpu_ops.decode_attention(wide, k_cache, k_cache, many, lens[:1].repeat(wide.shape[0]), 0.25, None) is None


def test_without_the_c_ops_the_cpu_kernel_set_runs_pytorch(monkeypatch):
    from membound.layers import CPU, add_rms_norm

    monkeypatch.setattr(cpu_ops, "_cpu_ops", None)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 32, generator=gen).to(torch.bfloat16)
    w = torch.rand(32, generator=gen).to(torch.bfloat16)
    assert cpu_ops.add_rms_norm(x, None, w, 1e-5) is None
    got, want = CPU.add_rms_norm(x, None, w, 1e-5), add_rms_norm(x, None, w, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_governor_puts_its_count_back_when_another_engine_changed_it():
    """Two engines in one process share torch's thread count: each step runs at its own engine's count."""
    current = [2]
    g = cpu.ThreadGovernor(
        2, fixed=True, set_threads=lambda n: current.__setitem__(0, n), get_threads=lambda: current[0]
    )
    current[0] = 1  # the other engine's governor
    assert g.tick() == 2 and current == [2]


def test_engine_thread_cap_is_the_process_allowance_not_another_engines_current_count(monkeypatch, tiny_model_dir):
    from membound import LLM

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(1)  # as another engine's governor may have left it
        llm = LLM(str(tiny_model_dir), skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 20)
        assert llm.engine.core.threads.max_threads == cpu.usable_cores()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        llm = LLM(str(tiny_model_dir), skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 20)
        assert llm.engine.core.threads.max_threads == 1
    finally:
        torch.set_num_threads(before)
