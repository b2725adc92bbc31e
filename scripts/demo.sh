#!/usr/bin/env bash
# The whole study on the embedded default model (SmolLM2-135M-Instruct), on CPU, with subsets.
#   bash scripts/demo.sh                 # set up .venv, then run every stage
#   MODEL=gemma3-270m N=300 bash scripts/demo.sh
# Outputs: training_data/<model>/ (records, training sets), results/<model>/ (summaries, tables).
# Every stage resumes: rerun after an interruption and finished questions are kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
PY=.venv/bin/python
MODEL=${MODEL:-smollm2-135m}
N=${N:-200}            # questions per probe / evaluation set
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

stamp "1/4 knowledge-boundary probing (R-Tuning Task 2.1) on $MODEL"
$PY run_MMLU.py --model "$MODEL" --domain ID --split train --shots 0 --limit "$N" --method all
$PY run_MMLU.py --model "$MODEL" --domain ID --split train --shots 5 --limit "$N" --method all
$PY run_ParaRel.py --model "$MODEL" --domain ID --split train --limit "$N" --method unsure
stamp "probing done"
