#!/usr/bin/env bash
# The device check: one command that checks and times the engine within one short GPU lease.
#
#   bash benchmarks/pack_wheels.sh                     # here, with a package index: benchmarks/wheels/ (no torch)
#   bash benchmarks/device_check.sh OUTDIR             # on the GPU machine (carry benchmarks/wheels)
#   HARNESS_SMOKE=1 bash benchmarks/device_check.sh OUTDIR   # CPU rehearsal at tiny sizes (a test runs it)
#
# It ends within DEVICE_CHECK_BUDGET_S seconds (default 520, under the 9 minutes one device command may take).
# Stages run in order of value, so a time limit cuts the least valuable ones:
#   a. ceilings       environment, bf16 matmul TFLOP/s and device copy GB/s, measured in this run
#   b. kernels_*      every Triton op at the 1.3B and 14B shapes vs its torch reference: error and time
#   c. nfe_*          bidirectional 1.3B 480x832x81, batch 1 and CFG batch 2: s/NFE of untouched diffusers (default
#                     SDPA, cuDNN SDPA) and anyflow (torch, triton, cuda; SDPA policy "tuned")
#   d. far_video      FAR 1.3B, a whole 81-frame video at 4 steps per chunk, measured end to end: anyflow, diffusers
#                     as shipped, and the output difference to the official semantics
#   e. cuda_*         the CUDA extension (built in the background from the first second, MAX_JOBS=16): checked and
#                     timed like b
#   f. pytest_gpu, 14B figures, if time is left
# Every figure is appended to OUTDIR/results.jsonl and flushed at once (python -m benchmarks report reads it); each
# (op, backend) or (model, variant) row is caught on its own, and a stage whose CUDA context died (exit 75) is
# rerun with --resume, skipping the rows it wrote. OUTDIR gets at most 6 files: results.jsonl, stages.tsv,
# log.txt (every stage's output), build.log, environment.txt, summary.md.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
OUT="${1:?usage: device_check.sh OUTDIR}"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
SMOKE="${HARNESS_SMOKE:-0}"
BUDGET="${DEVICE_CHECK_BUDGET_S:-520}"
WHEELS="${WHEELS:-benchmarks/wheels}"
START=$(date +%s)
RESULTS="$OUT/results.jsonl"; LOG="$OUT/log.txt"; STAGES="$OUT/stages.tsv"; BUILD_LOG="$OUT/build.log"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # anyflow and benchmarks from this tree, installed or not
: > "$LOG"; printf 'stage\trc\tseconds\n' > "$STAGES"
RESERVE=25  # seconds kept for the summary, which always runs

elapsed() { echo $(( $(date +%s) - START )); }

# -- e (started first): build anyflow._C in the background, in place, from the first second ------------------------
BUILD_PID=
if [[ $SMOKE == 1 ]]; then
  echo "smoke: no build; the cuda stage uses whatever anyflow._C this tree already has" > "$BUILD_LOG"
else
  if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]]; then export CUDA_HOME=/usr/local/cuda; fi  # nvcc may be a wrapper
  ( export ANYFLOW_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
    t0=$(date +%s)
    "$PY" setup.py -q build_ext --inplace > "$BUILD_LOG" 2>&1
    echo "== build_ext rc=$? in $(( $(date +%s) - t0 ))s" >> "$BUILD_LOG" ) &
  BUILD_PID=$!
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "command: bash benchmarks/device_check.sh $* (HARNESS_SMOKE=$SMOKE, budget ${BUDGET}s)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown), $(git status --porcelain 2>/dev/null | wc -l) changed files"
  { command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } \
    || echo "nvidia-smi: unavailable"
  { nvcc --version 2>&1 | tail -n 1; } || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"

stage() {  # stage NAME LIMIT_S CMD...: run with a timeout inside the budget; rerun with --resume after exit 75
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - RESERVE - $(elapsed) ))
  if (( left < 15 )); then
    echo "== $name: SKIP (budget spent)"; printf '%s\tskipped-budget\t0\n' "$name" >> "$STAGES"; return 0
  fi
  (( limit > left )) && limit=$left
  local t0 rc tries=0 args=("$@")
  t0=$(date +%s)
  while :; do
    echo "== $name (limit ${limit}s, at $(elapsed)s)" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "${args[@]}" >> "$LOG" 2>&1
    rc=$?
    tries=$(( tries + 1 ))
    limit=$(( BUDGET - RESERVE - $(elapsed) ))
    if [[ $rc == 75 && $tries -lt 3 && $limit -gt 15 ]]; then
      echo "== $name: CUDA context lost, rerunning the rows not yet written" | tee -a "$LOG"
      [[ " ${args[*]} " == *" --resume "* ]] || args+=(--resume)
      continue
    fi
    break
  done
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STAGES"
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

if compgen -G "$WHEELS/*.whl" > /dev/null && ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  # the wheels are packed for the GPU image's Python 3.12 (benchmarks/rehearse_gpu_image.sh installs them there)
  printf 'install\tskipped-not-python-3.12\t0\n' >> "$STAGES"
elif compgen -G "$WHEELS/*.whl" > /dev/null; then
  stage install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/anyflow-site "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/anyflow-site"   # after the tree (the GPU image has no diffusers of its own)
else
  printf 'install\tskipped-no-wheels\t0\n' >> "$STAGES"
fi
"$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" >> "$OUT/environment.txt" 2>&1

if [[ $SMOKE != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "== no CUDA device: the device check needs a GPU (HARNESS_SMOKE=1 rehearses it on CPU)" | tee -a "$LOG"
  printf 'cuda\tskipped-no-cuda\t0\n' >> "$STAGES"
  exit 1
fi

J=(--jsonl "$RESULTS")
if [[ $SMOKE == 1 ]]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  K13=(--smoke); K14=(--smoke); M13=(--model tiny --height 32 --width 32 --frames 9); M14=("${M13[@]}")
  FAR=(--model tiny --height 32 --width 32 --frames 9 --chunk-partition 1,2); ITERS=1; SMOKE_FLAG=(--smoke)
else
  K13=(--model 1.3B); K14=(--model 14B); M13=(--model 1.3B); M14=(--model 14B); FAR=(--model 1.3B); ITERS=3
  SMOKE_FLAG=()
fi
BIDIR_VARIANTS=diffusers,diffusers:cudnn,anyflow:torch,anyflow:torch+tuned,anyflow:triton+tuned,anyflow:cuda+tuned

# a. ceilings
stage ceilings 60 "$PY" -m benchmarks ceilings "${SMOKE_FLAG[@]}" "${J[@]}"
# b. Triton ops at real shapes
stage kernels_triton_1.3B 150 "$PY" -m benchmarks kernels "${K13[@]}" --backends torch,triton "${J[@]}"
stage kernels_triton_14B 120 "$PY" -m benchmarks kernels "${K14[@]}" --backends torch,triton --no-baselines "${J[@]}"
# c. bidirectional 1.3B per NFE, batch 1 and CFG batch 2
stage nfe_1.3B_bidirectional 120 "$PY" -m benchmarks nfe "${M13[@]}" --mode bidirectional --iters "$ITERS" \
  --backends "$BIDIR_VARIANTS" "${J[@]}"
stage nfe_1.3B_bidirectional_cfg 120 "$PY" -m benchmarks nfe "${M13[@]}" --mode bidirectional --guidance \
  --iters "$ITERS" --backends "$BIDIR_VARIANTS" "${J[@]}"
# d. FAR 1.3B whole video, 4 steps per chunk, end to end (the rows it cannot lose first)
stage far_video_1.3B 170 "$PY" -m benchmarks levers "${FAR[@]}" --mode far --steps 4 --iters 1 --levers none \
  --pipelines anyflow,diffusers,diffusers_official,anyflow_all "${J[@]}"
# e. the CUDA extension: wait for the build, then check and time its ops
if [[ -n $BUILD_PID ]]; then
  left=$(( BUDGET - RESERVE - $(elapsed) - 60 ))
  while kill -0 "$BUILD_PID" 2> /dev/null && (( left > 0 )); do sleep 2; left=$(( left - 2 )); done
  kill -0 "$BUILD_PID" 2> /dev/null && { echo "== build: still running, stopped" >> "$BUILD_LOG"; kill "$BUILD_PID"; }
fi
"$PY" - "$RESULTS" "$BUILD_LOG" <<'PYEOF' | tee -a "$LOG"
import sys
from benchmarks import common
from anyflow import _ext
module, reason = _ext.extension_status()
log = open(sys.argv[2], encoding="utf-8", errors="replace").read().splitlines()
row = {"type": "build", "status": "ok" if module is not None else "failed", "reason": reason,
       "build_info": _ext.build_info(), "log_tail": log[-40:] if module is None else log[-3:]}
common.append_jsonl(sys.argv[1], row)
print("build:", row["status"], reason or "")
PYEOF
stage cuda_1.3B 90 "$PY" -m benchmarks kernels "${K13[@]}" --backends torch,cuda --no-baselines "${J[@]}"
# f. if time is left: the GPU-marked tests, 14B
if [[ $SMOKE != 1 ]]; then
  stage pytest_gpu 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_ops.py tests/test_triton_elementwise.py \
    tests/test_triton_attention.py tests/test_graphs.py tests/test_sdpa.py
fi
stage cuda_14B 60 "$PY" -m benchmarks kernels "${K14[@]}" --backends torch,cuda --no-baselines "${J[@]}"
stage nfe_14B_bidirectional 120 "$PY" -m benchmarks nfe "${M14[@]}" --mode bidirectional --iters "$ITERS" \
  --backends diffusers,diffusers:cudnn,anyflow:torch+tuned,anyflow:triton+tuned "${J[@]}"

RESERVE=0 stage summary 25 "$PY" -m benchmarks report --results "$OUT" --no-readme --markdown "$OUT/summary.md"
echo "== done in $(elapsed)s"; cat "$STAGES"
# exit 0 only when at least one figure landed: a run where every stage failed must not look fine
grep -q '"type": "row"' "$RESULTS" 2> /dev/null
