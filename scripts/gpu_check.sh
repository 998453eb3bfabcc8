#!/usr/bin/env bash
# The GPU check: tests marked `gpu` plus the decode benchmarks, on a bare GPU machine that has
# torch, triton, transformers and safetensors. Anything else comes as wheels from .whl/
# (scripts/fetch_gpu_wheels.sh makes them). Results: JSON and logs under $OUT (default
# benchmarks/results/), a short table on stdout. Meant to finish well within 8 minutes on one H100.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
day=$(date +%F)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$out/gpu_smi_$day.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py \
  tests/test_cuda_graphs.py tests/test_quant_kernels.py tests/test_async_scheduling.py 2>&1 | tee "$out/gpu_tests_$day.log"
tests_rc=${PIPESTATUS[0]}
python3 benchmarks/gpu_decode.py --output "$out/gpu_decode_$day.json" 2>&1 | tee "$out/gpu_decode_$day.log"
bench_rc=${PIPESTATUS[0]}
python3 benchmarks/gpu_quant.py --out "$out/gpu_quant_$day.json" 2>&1 | tee "$out/gpu_quant_$day.log"
[ "${PIPESTATUS[0]}" = 0 ] || bench_rc=1
for m in llama-3-8b smollm2-135m; do
  python3 -m membound.entrypoints.cli bench latency "$m" --load-format dummy --prompt-lens 512,4096 \
    --batches 1,16,64 --contexts 512,4096 --no-progress --output-json "$out/gpu_latency_${m}_$day.json" \
    --plot "$out/gpu_plots_$m" 2>&1 | tee -a "$out/gpu_bench_$day.log"
  python3 -m membound.entrypoints.cli bench walls "$m" --load-format dummy \
    --output-json "$out/gpu_walls_${m}_$day.json" 2>&1 | tee -a "$out/gpu_bench_$day.log"
done
python3 -m membound.entrypoints.cli doctor --no-decode --json > "$out/gpu_doctor_$day.json" 2>/dev/null || true
echo "gpu tests rc=$tests_rc, benchmarks rc=$bench_rc"
exit $((tests_rc != 0 || bench_rc != 0))
