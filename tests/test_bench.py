"""`membound bench`: every command on a tiny model, its JSON, its sanity, its plots."""

from __future__ import annotations

import json

import pytest

from membound.entrypoints.cli import main
from tests.conftest import save_tiny_hf_model, write_tiny_config
from tests.server_utils import ServerProcess

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--load-format", "dummy", "--kv-cache-memory", "16", "--no-progress"]


def _check_plots(files):
    assert files
    for f in files:
        data = f.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, f


def _check_record(rec, device="cpu"):
    assert rec["device"] == device and rec["torch"] and rec["dtype"] == "float32" and "commit" in rec
    assert rec["model"]


def test_latency_grid_json_sanity_and_plots(tmp_path, capsys):
    cfg = write_tiny_config(tmp_path / "cfg", max_position_embeddings=256)
    out = tmp_path / "lat.json"
    args = ["bench", "latency", str(cfg), *TINY, "--prompt-lens", "16,64,300", "--batches", "1,4",
            "--contexts", "32,128,1000", "--decode-steps", "4", "--max-model-len", "256",
            "--output-json", str(out), "--plot", str(tmp_path / "plots")]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "prefill" in text and "roofline" in text and "skipped" in text
    r = json.loads(out.read_text())
    _check_record(r["record"])
    assert r["ceilings"]["copy_bandwidth_gbs"] > 0 and r["ceilings"]["matmul_tflops"] > 0
    pre = {p["prompt_len"]: p for p in r["prefill"]}
    assert pre[16]["ms"] > 0 and pre[64]["tok_s"] > 0 and "skipped" in pre[300]
    ran = [p for p in r["decode"] if "skipped" not in p]
    assert {(p["batch"], p["context"]) for p in ran} == {(1, 32), (4, 32), (1, 128), (4, 128)}
    assert all("exceeds max_model_len" in p["skipped"] for p in r["decode"] if p["context"] == 1000)
    for p in ran:
        assert p["tok_s"] > 0 and p["step_ms"] > 0 and p["per_request_tok_s"] == pytest.approx(1000 / p["step_ms"])
        assert 0 < p["roofline_share"] <= 1.2
        assert p["bytes_per_step"] == p["weight_bytes_per_step"] + p["kv_bytes_per_step"]
        assert 0 < p["peak_memory_bytes"] < p["total_memory_bytes"]
        assert p["bound_tok_s"] > 0
    by = {(p["batch"], p["context"]): p for p in ran}
    for b in (1, 4):
        assert by[(b, 128)]["kv_bytes_per_step"] > by[(b, 32)]["kv_bytes_per_step"]  # more context, more KV bytes
    assert by[(4, 32)]["kv_bytes_per_step"] == pytest.approx(4 * by[(1, 32)]["kv_bytes_per_step"])
    assert r["nvml"] is None  # no GPU here
    _check_plots(sorted((tmp_path / "plots").glob("*.png")))
    assert {f.name for f in (tmp_path / "plots").glob("*.png")} == {
        "decode_vs_batch.png", "decode_vs_context.png", "prefill_latency.png", "roofline.png"
    }  # fmt: skip


def test_throughput_random_and_jsonl_with_hf_comparison(tmp_path, capsys):
    save_tiny_hf_model(tmp_path / "hf", "llama")
    out = tmp_path / "tp.json"
    args = ["bench", "throughput", str(tmp_path / "hf"), "--kv-cache-memory", "16", "--no-progress",
            "--num-prompts", "6", "--input-len", "8,24", "--output-len", "4,12", "--compare", "hf",
            "--hf-batch-size", "4", "--output-json", str(out), "--plot", str(tmp_path / "p")]  # fmt: skip
    assert main(args) == 0
    assert "membound / hf output tok/s" in capsys.readouterr().out
    r = json.loads(out.read_text())
    m, h = r["runs"]["membound"], r["runs"]["hf"]
    assert m["requests"] == h["requests"] == 6 and m["output_tokens"] == h["output_tokens"]
    assert 6 * 4 <= m["output_tokens"] <= 6 * 12 and 6 * 8 <= m["prompt_tokens"] <= 6 * 24
    assert m["output_tok_s"] > 0 and r["ratio_output_tok_s"] == pytest.approx(m["output_tok_s"] / h["output_tok_s"])
    assert m["total_tok_s"] == pytest.approx((m["prompt_tokens"] + m["output_tokens"]) / m["elapsed_s"])
    _check_plots(list((tmp_path / "p").glob("*.png")))

    data = tmp_path / "work.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": [5, 6, 7, 8][: i + 1], "output_len": 3 + i}) for i in range(4)))
    assert main(["bench", "throughput", str(tmp_path / "hf"), "--kv-cache-memory", "16", "--no-progress",
                 "--dataset", str(data), "--output-json", str(out)]) == 0  # fmt: skip
    r = json.loads(out.read_text())["runs"]["membound"]
    assert r["requests"] == 4 and r["output_tokens"] == 3 + 4 + 5 + 6 and r["prompt_tokens"] == 10
    data.write_text('{"prompt": [1, 2]}\nnot json\n')
    assert main(["bench", "throughput", str(tmp_path / "hf"), "--kv-cache-memory", "16", "--dataset", str(data)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_walls_table(tmp_path, capsys):
    cfg = write_tiny_config(tmp_path / "cfg")
    out = tmp_path / "w.json"
    assert main(["bench", "walls", str(cfg), *TINY, "--batch", "2", "--context", "40", "--output-json", str(out),
                 "--plot", str(tmp_path / "p")]) == 0  # fmt: skip
    r = json.loads(out.read_text())
    _check_record(r["record"])
    walls = {w["wall"]: w for w in r["walls"]}
    measured = [w for name, w in walls.items() if name.startswith(("host", "device"))]
    assert sum(w["share_of_step"] for w in measured) == pytest.approx(1.0)
    assert all(w["ms"] >= 0 for w in measured) and walls["device: model forward + sampling"]["ms"] > 0
    assert walls["bound: memory time"]["ms"] > 0 and walls["bound: compute time"]["ms"] > 0
    assert walls["launch overhead"]["ms"] is None
    assert r["tok_s"] == pytest.approx(2000 / r["step_ms"])
    assert "host: scheduling" in capsys.readouterr().out
    _check_plots(list((tmp_path / "p").glob("*.png")))


def test_bench_serve_against_a_real_membound_server(tiny_model_dir, tmp_path, capsys):
    server = ServerProcess(["--model", str(tiny_model_dir), "--max-model-len", "256", "--kv-cache-memory", "32"],
                           tmp_path / "s.log")  # fmt: skip
    try:
        out = tmp_path / "serve.json"
        args = ["bench", "serve", "--base-url", server.url + "/v1", "--concurrency", "1,4", "--num-prompts", "8",
                "--input-words", "16", "--output-len", "8", "--goodput", "ttft:60000", "tpot:0.001",
                "--output-json", str(out), "--plot", str(tmp_path / "p"), "--no-progress"]  # fmt: skip
        assert main(args) == 0
        text = capsys.readouterr().out
        assert "TTFT p50 ms" in text and "goodput" in text
        r = json.loads(out.read_text())
        assert [row["concurrency"] for row in r["runs"]] == [1, 4]
        for row in r["runs"]:
            assert row["requests"] == 8 and row["failed"] == 0
            assert row["output_tok_s"] == pytest.approx(8 * 8 / row["duration_s"])
            assert row["ttft_ms"]["median"] <= row["ttft_ms"]["p99"] and row["tpot_ms"]["mean"] > 0
            assert row["e2e_ms"]["median"] >= row["ttft_ms"]["median"]
            assert row["goodput"] == 0  # a 1 us TPOT target is out of reach (a tiny model steps in ~1 ms)
        m = server.metrics()
        assert m["membound:request_success_total{finished_reason=length}"] == 16
        _check_plots(list((tmp_path / "p").glob("*.png")))
    finally:
        assert server.stop() == 0


def test_bad_bench_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "latency", "--batches", "0,4"])
    assert "positive integers" in capsys.readouterr().err
    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--goodput", "speed:5"]) == 2
    assert "--goodput takes ttft:MS" in capsys.readouterr().err
    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9"]) == 2  # nothing listens there
    assert "cannot list models" in capsys.readouterr().err


def test_device_ceilings_are_cached_per_device(tmp_path, monkeypatch):
    import torch

    from membound.bench import common

    monkeypatch.setenv("MEMBOUND_CACHE", str(tmp_path))
    calls = []
    real = common.measure

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, quick=True)

    monkeypatch.setattr(common, "measure", counting)
    first = common.device_ceilings(torch.device("cpu"), torch.float32)
    again = common.device_ceilings(torch.device("cpu"), torch.float32)
    assert first == again and len(calls) == 1 and (tmp_path / "ceilings.json").is_file()
    common.device_ceilings(torch.device("cpu"), torch.float32, remeasure=True)
    assert len(calls) == 2


def test_quality_table_against_full_precision(tmp_path, capsys):
    save_tiny_hf_model(tmp_path / "hf", "llama", hidden_size=128, intermediate_size=256)
    out = tmp_path / "q.json"
    args = ["bench", "quality", str(tmp_path / "hf"), "--kv-cache-memory", "16", "--formats", "int8,int4,fp8",
            "--tokens", "24", "--output-json", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "top-1 agree" in capsys.readouterr().out
    r = json.loads(out.read_text())
    rows = {row["format"]: row for row in r["rows"]}
    assert set(rows) == {"reference", "int8", "int4", "fp8"} and r["tokens"] == 8 + 24
    assert rows["reference"]["mean_kl"] == 0 and rows["reference"]["top1_agreement"] == 1
    for fmt in ("int8", "int4", "fp8"):
        assert rows[fmt]["mean_kl"] > 0 and 0 <= rows[fmt]["top1_agreement"] <= 1
        assert rows[fmt]["max_kl"] >= rows[fmt]["mean_kl"]
        assert rows[fmt]["weight_bytes_per_step"] < rows["reference"]["weight_bytes_per_step"]
    assert rows["int8"]["mean_kl"] < rows["int4"]["mean_kl"]  # RTN int4 on random weights loses more
    assert main(["bench", "quality", str(tmp_path / "hf"), "--formats", "int3"]) == 2
    assert "--formats takes int8, int4, fp8" in capsys.readouterr().err
