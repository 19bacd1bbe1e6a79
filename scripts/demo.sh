#!/usr/bin/env bash
# End-to-end demo without downloads: set up .venv, then generate a real short video with the shipped
# default model (anyflow-far-mini, a causal FAR AnyFlow model trained by this project on real footage)
# from one of the evaluation captions, at 4 flow-map steps per chunk -> out.mp4.
#
#   bash scripts/demo.sh                                                   # text-to-video
#   bash scripts/demo.sh --image ../shared/data/anyflow_eval/images/2.jpg  # image-to-video
#   bash scripts/demo.sh --video ../shared/data/anyflow_eval/videos/2.mp4  # video-to-video
#   bash scripts/demo.sh --grid 1,2,4,8,16 --out grid.mp4                  # same noise at each step count
#
# Extra arguments go to `anyflow generate` (later ones win); relative paths are taken from the repository root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup_env.sh

PROMPT="A focused trail runner's powerful strides through a dense, sun-dappled forest. The camera tracks \
alongside, highlighting muscular exertion, sweat, and determined facial expression."
args=(--prompt "$PROMPT" --out out.mp4)
if [[ " $* " == *" --grid "* ]]; then args+=("$@"); else args+=(--steps 4 "$@"); fi
.venv/bin/anyflow generate "${args[@]}"
