#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch, triton, transformers, safetensors), for Python 3.12,
# into .whl/ (git-ignored; carried to the device with the `carry` argument).
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl gguf nvidia-ml-py pytest pluggy iniconfig matplotlib contourpy cycler fonttools kiwisolver \
  pyparsing pillow python-dateutil six pygments
