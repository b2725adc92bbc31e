#!/usr/bin/env bash
# The original study's Qwen/Qwen-7B (remote code): R-Tuning + CRaFT at paper scale (one 80 GB GPU, bf16).
# Qwen-7B's remote code needs tiktoken and transformers_stream_generator: pip install them into .venv.
#   bash scripts/run_qwen_7b.sh
#   bash scripts/run_qwen_7b.sh --dry-run          # print the commands only
set -euo pipefail
MODEL=Qwen/Qwen-7B
MODEL_FLAGS=(--trust-remote-code --dtype bfloat16)
source "$(dirname "${BASH_SOURCE[0]}")/pipeline.sh"
kb_pipeline "$@"
