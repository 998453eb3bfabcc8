#!/usr/bin/env bash
# The GPU session (benchmarks/gpu_session.py): gpu-marked tests, teacher-forced parity, decode,
# attention and quantized-matmul kernels, the HF peer; about 7 minutes on a cold H200. Results
# under $OUT (default benchmarks/results/gpu_<date>/): one JSON, one log, one PNG; the summary
# table is printed last. The GPU image has torch, triton, transformers, pytest, matplotlib,
# nvidia-ml-py; what it lacks (gguf) comes as wheels in .whl/ (scripts/fetch_gpu_wheels.sh).
#   bash scripts/gpu_check.sh [--smoke] [--phases tests,decode_8b] [--list]
# --smoke: the same phases on CPU at tiny sizes (Triton interpreter), a check of the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=$(mktemp -d "${TMPDIR:-/tmp}/membound-wheels.XXXXXX")
trap 'rm -rf "$site"' EXIT
used=()
for whl in .whl/*.whl; do
  [ -e "$whl" ] || continue
  dist=$(basename "$whl"); dist=${dist%%-*}
  # A carried wheel must never shadow a package of the image: unpack only what is missing.
  if "$py" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null; then
    echo "gpu_check: $dist is installed here; $whl not used"
  else
    "$py" -m zipfile -e "$whl" "$site" && used+=("$(basename "$whl")")
  fi
done
export PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 GPU_SESSION_WHEELS="${used[*]:-}"
"$py" benchmarks/gpu_session.py "$@"
