#!/usr/bin/env bash
# Rehearse the device check on this CPU machine under the GPU image's versions, before a lease is spent on it:
# Python 3.12, torch 2.11.0 (its CUDA build: the same Python code as on the GPU), Triton 3.6.0, transformers 5.17.0,
# no diffusers of its own (the packed wheels are installed offline, --no-index, as on the GPU machine). The
# extension is built against that torch (CPU twins only here), then the HARNESS_SMOKE=1 device check runs.
#   bash benchmarks/rehearse_gpu_image.sh [OUTDIR]      # ~5 GB venv in $REHEARSAL_VENV (default /tmp/anyflow-gpu-image)
# The project's own pins are rehearsed by the test suite (tests/test_benchmarks.py runs the same smoke check).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-/tmp/anyflow-rehearsal}"
VENV="${REHEARSAL_VENV:-/tmp/anyflow-gpu-image}"
PY312="${PYTHON312:-python3.12}"  # with pyenv: PYTHON312=$(pyenv root)/versions/3.12.1/bin/python3.12
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY312" -m venv "$VENV"
  # what the GPU image has (environment: python3 3.12, torch 2.11.0+cu130, Triton 3.6.0, transformers 5.17, ninja)
  "$VENV/bin/python" -m pip install -q "torch==2.11.0" "triton==3.6.0" "numpy<2.4" "transformers==5.17.0" \
    "setuptools<82" accelerate safetensors matplotlib pytest pytest-benchmark ninja pybind11 pyyaml
fi
bash benchmarks/pack_wheels.sh
"$VENV/bin/python" -c "import diffusers" 2> /dev/null && { echo "rehearse: $VENV has diffusers; the GPU image has none" >&2; exit 1; }
rm -rf "$OUT"; mkdir -p "$OUT"
# the extension against torch 2.11, in a copy of the tree so that the project's own build stays as it is
SRC="$(mktemp -d)"; trap 'rm -rf "$SRC"' EXIT
git ls-files -z | xargs -0 -I{} cp --parents {} "$SRC"
cp -r benchmarks/wheels "$SRC/benchmarks/"
if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]]; then export CUDA_HOME=/usr/local/cuda; fi  # as device_check.sh does
( cd "$SRC" && MAX_JOBS=2 "$VENV/bin/python" setup.py -q build_ext --inplace > "$OUT/rehearsal-build.log" 2>&1 ) \
  || { echo "rehearse: extension build failed (see $OUT/rehearsal-build.log)"; }
HARNESS_SMOKE=1 PYTHON="$VENV/bin/python" bash "$SRC/benchmarks/device_check.sh" "$OUT"
