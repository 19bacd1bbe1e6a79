#!/usr/bin/env bash
# Download, on a machine with internet, the wheels the GPU machine lacks (it has torch 2.11+cu130,
# Triton 3.6, transformers, accelerate, safetensors, matplotlib, pytest-benchmark; no diffusers, no
# internet) into DIR (default benchmarks/wheels) for benchmarks/device_check.sh. Never torch or triton:
# --no-deps with an explicit list, and the result is checked.
#   bash benchmarks/pack_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR="${1:-benchmarks/wheels}"
PY="${PYTHON:-.venv/bin/python}"
# diffusers 0.42.1 is the pin; the rest are its light needs missing on the GPU image (the tree that travels is <= 64 MiB).
# requests and its needs: diffusers checks for it at import and the GPU image lacks it (found by the rehearsal,
# benchmarks/rehearse_gpu_image.sh). No imageio-ffmpeg: 60 MB, benchmarks write no video.
PACKAGES=("diffusers==0.42.1" importlib_metadata zipp ftfy wcwidth requests charset-normalizer idna urllib3 certifi)
mkdir -p "$DIR"
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${plat[@]}" -d "$DIR" "${PACKAGES[@]}"
if ls "$DIR" | grep -iqE '^(torch|triton|nvidia)[-_]'; then
  echo "pack_wheels: ERROR: $DIR holds a torch/triton/nvidia wheel:" >&2; ls "$DIR" | grep -iE '^(torch|triton|nvidia)[-_]' >&2
  exit 1
fi
echo "pack_wheels: $(ls "$DIR" | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR (no torch/triton/nvidia):"
ls "$DIR"
