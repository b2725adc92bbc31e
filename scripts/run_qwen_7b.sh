#!/usr/bin/env bash
# The original study's Qwen/Qwen-7B (remote code): R-Tuning + CRaFT at paper scale (one 80 GB GPU, bf16).
# Qwen-7B's remote code needs tiktoken and transformers_stream_generator: pip install them into .venv.
#   bash scripts/run_qwen_7b.sh
#   bash scripts/run_qwen_7b.sh --dry-run          # print the commands only
# Remote code runs only at the commit below (the hub's head of Qwen/Qwen-7B since 2024-01-04, its
# `sha` in the hub's public model metadata); read that commit's *.py files before the first run, or
# set REVISION=<another 40-hex commit you have read>.
set -euo pipefail
MODEL=Qwen/Qwen-7B
REVISION=${REVISION:-ef3c5c9c57b252f3149c1408daf4d649ec8b6c85}
MODEL_FLAGS=(--trust-remote-code --revision "$REVISION" --dtype bfloat16)
source "$(dirname "${BASH_SOURCE[0]}")/pipeline.sh"
kb_pipeline "$@"
