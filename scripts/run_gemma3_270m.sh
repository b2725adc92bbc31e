#!/usr/bin/env bash
# The whole R-Tuning + CRaFT study on Gemma-3-270M (offline, packaged GGUF weights, dequantised once).
#   bash scripts/run_gemma3_270m.sh --limit 50     # a smoke run of every stage
#   bash scripts/run_gemma3_270m.sh --dry-run      # print the commands only
set -euo pipefail
MODEL=gemma3-270m
MODEL_FLAGS=()
# No question reaches CRaFT's rehearsal thresholds (MCQ p(gold) > 0.99; open Cor, Cer >= 0.995) on a
# model this small, so rehearsal uses relaxed ones; the flow files record them as `relaxed`.
REHEARSAL_FLAGS=(--min-cor 0.6)
REHEARSAL_OPEN_FLAGS=(--min-cor 0.6 --min-cer 0.9)
source "$(dirname "${BASH_SOURCE[0]}")/pipeline.sh"
kb_pipeline "$@"
