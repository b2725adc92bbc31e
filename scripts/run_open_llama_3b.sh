#!/usr/bin/env bash
# The original study's openlm-research/open_llama_3b: R-Tuning + CRaFT at paper scale (one GPU, bf16).
# Needs hub access (or HF_HOME with the weights) and the main environment (requirements.txt).
#   bash scripts/run_open_llama_3b.sh
#   bash scripts/run_open_llama_3b.sh --dry-run    # print the commands only
set -euo pipefail
MODEL=openlm-research/open_llama_3b
MODEL_FLAGS=(--dtype bfloat16)
source "$(dirname "${BASH_SOURCE[0]}")/pipeline.sh"
kb_pipeline "$@"
