#!/usr/bin/env bash
# Wheels for what membound needs and the GPU image lacks, into .whl/ (git-ignored; carried to the
# device with `carry=[".whl"]`). The image has Python 3.12, torch, triton, transformers,
# safetensors, tokenizers, numpy, pyyaml, tqdm, jinja2, pytest, matplotlib and nvidia-ml-py: only
# gguf is missing (pure Python, its own dependencies are on the image). Anything else carried
# would shadow the image's own build, so .whl/ is emptied first.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --abi none --platform any -d .whl gguf
ls .whl
