#!/usr/bin/env bash
# The whole R-Tuning + CRaFT study on SmolLM2-135M-Instruct (offline, packaged weights; runs on CPU).
#   bash scripts/run_smollm2_135m.sh --limit 50    # a smoke run of every stage
#   bash scripts/run_smollm2_135m.sh --dry-run     # print the commands only
# Its MMLU accuracy is near chance (docs/method.md section 3.7): read the ParaRel track for a real boundary.
set -euo pipefail
MODEL=smollm2-135m
MODEL_FLAGS=()
# No question reaches CRaFT's rehearsal thresholds (MCQ p(gold) > 0.99; open Cor, Cer >= 0.995) on a
# model this small, so rehearsal uses relaxed ones; the flow files record them as `relaxed`.
REHEARSAL_FLAGS=(--min-cor 0.6)
REHEARSAL_OPEN_FLAGS=(--min-cor 0.6 --min-cer 0.9)
source "$(dirname "${BASH_SOURCE[0]}")/pipeline.sh"
kb_pipeline "$@"
