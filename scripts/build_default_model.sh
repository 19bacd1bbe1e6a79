#!/usr/bin/env bash
# Rebuild the shipped default model (anyflow/assets/anyflow-far-mini) from scratch on real footage:
# VAE -> dataset -> teacher -> FAR flow-map pretrain -> on-policy FMBS/DMD -> diffusers folder.
# Stages and their configs: anyflow/training/build_default.py, configs/default-far/*.yaml.
# Intermediate results go to runs/default-far (an interrupted build resumes there; delete it to start over).
#
#   bash scripts/build_default_model.sh [--threads N] [--stages vae,data,...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m anyflow.training.build_default --work runs/default-far "$@"
