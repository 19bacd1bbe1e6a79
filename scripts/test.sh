#!/usr/bin/env bash
# Full local/CI check: environment, standalone CUDA kernel build + ctest (if nvcc and cmake exist),
# then pytest. Extra arguments go to pytest (default: the whole tests/ folder).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh

if command -v nvcc >/dev/null 2>&1 && command -v cmake >/dev/null 2>&1; then
  echo "test: CMake build of csrc/kernels + ctest"
  generator=()
  if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
  if [[ -f build/cmake/CMakeCache.txt ]]; then generator=(); fi  # keep the generator it was configured with
  mkdir -p build
  cmake -S . -B build/cmake "${generator[@]}" -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" > build/cmake-configure.log 2>&1 \
    || { cat build/cmake-configure.log; exit 1; }
  cmake --build build/cmake
  ctest --test-dir build/cmake --output-on-failure
else
  echo "test: SKIP CMake/ctest of csrc/kernels (nvcc or cmake not on PATH)"
fi

echo "test: pytest"
if [[ $# -eq 0 ]]; then set -- tests; fi
exec .venv/bin/python -m pytest -q "$@"
