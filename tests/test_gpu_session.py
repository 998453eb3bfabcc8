"""The GPU session script (benchmarks/gpu_session.py via scripts/gpu_check.sh) checked on CPU."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PHASES = ("tests", "teacher_forced", "decode_8b", "decode_smollm2", "attention", "quant", "hf_peer")
# Installed here, absent from the GPU image: nothing the session runs may need them.
SERVER_DEPS = ("fastapi", "uvicorn", "prometheus_client", "httpx", "schemathesis", "openai")


def test_gpu_phases_import_without_server_deps():
    code = (
        "import sys\n"
        f"for m in {SERVER_DEPS!r}: sys.modules[m] = None\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "import membound.entrypoints.cli, membound.bench.latency, membound.bench.walls, membound.bench.common\n"
        "import membound.engine.llm_engine, membound.plan.planner, membound.plan.ceilings, membound.plan.doctor\n"
        "import gpu_session\n"
        "print(','.join(p.name for p in gpu_session.PHASES))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [",".join(PHASES)]


@pytest.mark.slow
def test_smoke_session_writes_one_json_and_a_summary(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    (path,) = [p for p in files if p.suffix == ".json"]
    record = json.loads(path.read_text())
    assert record["smoke"] is True and record["versions"]["torch"]
    assert list(record["phases"]) == list(PHASES)
    for name, phase in record["phases"].items():
        assert phase["status"] in ("ok", "skipped"), (name, phase.get("note"), phase.get("tail"))
    assert record["phases"]["tests"]["numbers"]["counts"]["failed"] == 0
    assert record["phases"]["teacher_forced"]["numbers"]["worst"]["top1_agreement"] == 1.0  # fp32 both sides
    assert record["phases"]["decode_8b"]["numbers"]["int4/b1/async"]["tok_s"] > 0
    # The summary table comes last: its header, then one row per phase (and derived numbers).
    lines = r.stdout.rstrip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.split()[:3] == ["phase", "status", "s"])
    rows = [line.split()[0] for line in lines[header + 1 :]]
    assert rows[: len(PHASES)] == list(PHASES) and set(rows[len(PHASES) :]) <= {"derived"}
