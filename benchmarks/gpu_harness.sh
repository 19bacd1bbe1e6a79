#!/usr/bin/env bash
# One call on a GPU machine without internet: install carried wheels, build the CUDA extension, ctest,
# kernel checks + timings at real shapes, the NFE benchmark, then JSON + Markdown + a plot in OUTDIR.
#   bash benchmarks/pack_wheels.sh                 # here, with internet: benchmarks/wheels/ (no torch)
#   bash benchmarks/gpu_harness.sh OUTDIR          # there; HARNESS_BUDGET_S (default 540) caps the stages
# Then copy OUTDIR to benchmarks/results/<device>/ and run `python -m benchmarks report` for the README.
# Every stage's exit status, seconds and log land in OUTDIR (stages.tsv, <stage>.log); a failing stage
# does not stop the next. HARNESS_TAR=1 packs everything into OUTDIR/harness.tar.gz (for tools that
# fetch only a few files) and keeps summary.md, stages.tsv and the tarball. HARNESS_STAGES (comma list of
# stage-name prefixes, e.g. "build,ctest,pytest" then "kernels_1.3B,nfe_1.3B") runs only those stages (plus
# install and report), so a device session with a 10-minute call limit can spread the run over calls.
# HARNESS_SMOKE=1 is a CPU dry run (CI): every benchmark command at tiny sizes, no build/ctest/GPU pytest.
# Device sessions (10 min per call, machine released after 30 s idle: make the calls back to back, carrying
# benchmarks/wheels), e.g. HARNESS_BUDGET_S=560 with HARNESS_STAGES=build,ctest,pytest_gpu,kernels_1.3B,nfe_1.3B,
# then build,levers_1.3B,kernels_14B, then build,nfe_14B,levers_14B (build again: incremental while the machine
# is warm); a stage the budget skipped shows as skipped-budget in stages.tsv: name it in the next call.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:?usage: gpu_harness.sh OUTDIR}"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${HARNESS_BUDGET_S:-540}"
START=$(date +%s)
export PYTHONUNBUFFERED=1
printf 'stage\trc\tseconds\n' > "$OUT/stages.tsv"

RESERVE=40  # seconds kept for the report stage, which always runs

stage() {  # stage NAME TIMEOUT_S CMD...: run with a timeout unless the budget is spent; record rc + time
  local name=$1 limit=$2; shift 2
  if [[ -n "${HARNESS_STAGES:-}" && $name != install && $name != report ]]; then
    local want=0 p
    IFS=, read -ra _prefixes <<< "$HARNESS_STAGES"
    for p in "${_prefixes[@]}"; do [[ -n $p && $name == "$p"* ]] && want=1; done
    if (( ! want )); then printf '%s\tskipped-not-selected\t0\n' "$name" >> "$OUT/stages.tsv"; return 0; fi
  fi
  local left=$(( BUDGET - RESERVE - ($(date +%s) - START) ))
  [[ $name == report ]] && left=$(( left + RESERVE ))
  if (( left < 20 && limit > 20 )) || (( left < 5 )); then
    echo "== $name: SKIP (time budget spent)"; printf '%s\tskipped-budget\t0\n' "$name" >> "$OUT/stages.tsv"; return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/stages.tsv"
  tail -n 15 "$OUT/$name.log"
  echo "== $name: rc=$rc"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "command: bash benchmarks/gpu_harness.sh $*"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  { command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } \
    || echo "nvidia-smi: unavailable"
  nvcc --version 2>&1 | tail -n 1 || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"

if compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
  stage install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/anyflow-site benchmarks/wheels/*.whl
  export PYTHONPATH="/tmp/anyflow-site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "== install: no benchmarks/wheels/*.whl (run benchmarks/pack_wheels.sh first if diffusers is missing)"
  printf 'install\tskipped-no-wheels\t0\n' >> "$OUT/stages.tsv"
fi
"$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" >> "$OUT/environment.txt" 2>&1

SMOKE="${HARNESS_SMOKE:-0}"
if [[ $SMOKE == 1 ]]; then
  M13=(--model tiny); M14=(--model tiny); KER=(--smoke); PIPE=tiny
  SIZE=(--height 32 --width 32 --frames 9 --chunk-partition 1,2)
else
  M13=(--model 1.3B); M14=(--model 14B); KER=(--model 1.3B); PIPE=wan; SIZE=()
fi
iters() { if [[ $SMOKE == 1 ]]; then echo 1; else echo "$1"; fi; }

if [[ $SMOKE != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "== SKIP: no CUDA device here; build, ctest, kernels and NFE benchmark need a GPU (nothing else to do)"
  printf 'cuda\tskipped-no-cuda\t0\n' >> "$OUT/stages.tsv"
  exit 0
fi

if [[ $SMOKE == 1 ]]; then
  printf 'build,ctest,pytest_gpu\tskipped-smoke\t0\n' >> "$OUT/stages.tsv"
else
  stage build 240 env ANYFLOW_BUILD_CUDA=1 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .
  stage ctest 150 bash -c 'cmake -S . -B build/harness -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" && cmake --build build/harness -j 16 && ctest --test-dir build/harness --output-on-failure'
  stage pytest_gpu 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_graphs.py tests/test_sdpa.py \
    tests/test_cuda_ops.py tests/test_triton_elementwise.py tests/test_triton_attention.py
fi
stage kernels_1.3B 120 "$PY" -m benchmarks kernels "${KER[@]}" --out "$OUT"
stage nfe_1.3B_bidirectional 200 "$PY" -m benchmarks nfe "${M13[@]}" "${SIZE[@]}" --mode bidirectional --iters "$(iters 5)" \
  --pipeline "$PIPE" --out "$OUT"
stage nfe_1.3B_far 150 "$PY" -m benchmarks nfe "${M13[@]}" "${SIZE[@]}" --mode far --iters "$(iters 3)" --out "$OUT"
stage levers_1.3B_bidirectional 120 "$PY" -m benchmarks levers "${M13[@]}" "${SIZE[@]}" --mode bidirectional --steps 4 \
  --iters "$(iters 2)" --out "$OUT"
stage levers_1.3B_far 240 "$PY" -m benchmarks levers "${M13[@]}" "${SIZE[@]}" --mode far --steps 4 --iters "$(iters 2)" \
  --out "$OUT"
if [[ $SMOKE == 1 ]]; then KER=(--smoke); else KER=(--model 14B); fi
stage kernels_14B 120 "$PY" -m benchmarks kernels "${KER[@]}" --out "$OUT"
stage nfe_14B_bidirectional 150 "$PY" -m benchmarks nfe "${M14[@]}" "${SIZE[@]}" --mode bidirectional --iters "$(iters 3)" \
  --backends diffusers,diffusers:cudnn,anyflow:auto,anyflow:auto+tuned,anyflow:cuda --out "$OUT"
stage nfe_14B_far 120 "$PY" -m benchmarks nfe "${M14[@]}" "${SIZE[@]}" --mode far --iters "$(iters 2)" \
  --backends diffusers,anyflow:auto,anyflow:auto+tuned --out "$OUT"
stage levers_14B_far 240 "$PY" -m benchmarks levers "${M14[@]}" "${SIZE[@]}" --mode far --steps 4 --iters "$(iters 1)" \
  --levers cross_kv,all --pipelines none --out "$OUT"
stage report 60 "$PY" -m benchmarks report --results "$OUT" --no-readme --markdown "$OUT/summary.md" --plot "$OUT/nfe.png"

if [[ "${HARNESS_TAR:-0}" == 1 ]]; then
  tar czf /tmp/harness.tar.gz -C "$OUT" . && find "$OUT" -mindepth 1 ! -name summary.md ! -name stages.tsv -delete \
    && mv /tmp/harness.tar.gz "$OUT/"
fi
echo "== done in $(( $(date +%s) - START ))s; stages:"; cat "$OUT/stages.tsv"
