#!/usr/bin/env bash
# End-to-end demo without downloads: set up .venv, write a tiny random AnyFlow FAR checkpoint, and
# generate a 21-frame 64x64 video from it (noise-like output: the weights are random).
#
#   bash scripts/demo.sh                                                   # text-to-video
#   bash scripts/demo.sh --image ../shared/data/anyflow_eval/images/1.jpg  # image-to-video
#   bash scripts/demo.sh --video ../shared/data/anyflow_eval/videos/1.mp4  # video-to-video
#
# Extra arguments go to `anyflow generate`; relative paths are taken from the repository root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup_env.sh

if [ ! -f tiny-anyflow-far/model_index.json ]; then
    .venv/bin/anyflow make-tiny tiny-anyflow-far --force
fi

# The tiny checkpoint's chunk partition is 1,1,2,2 (6 latent frames = 21 pixel frames).
.venv/bin/anyflow generate --model tiny-anyflow-far --prompt "a red panda eating bamboo" --steps 4 \
    --height 64 --width 64 --num-frames 21 --out out.mp4 "$@"
