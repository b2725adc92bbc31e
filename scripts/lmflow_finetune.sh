#!/usr/bin/env bash
# Fine-tune with LMFlow (R-Tuning's trainer) on a kb training file, every hyperparameter explicit.
#
# The flags come from the same configs/*.yaml that finetune.py (the built-in TRL trainer) reads, via
# `finetune.py --lmflow`, so both trainers run the same recipe. Nothing is left to LMFlow's launcher
# defaults: its scripts/run_finetune.sh trains 0.01 epochs; R-Tuning's setting (configs/
# finetune_rtuning.yaml) is 1 epoch, lr 2e-5, batch 4, full fine-tuning.
#
# Install LMFlow once, in its own environment (transformers < 5; see README "LMFlow"):
#   git clone https://github.com/OptimalScale/LMFlow.git /path/LMFlow && scripts/lmflow_setup.sh /path/LMFlow
#   export LMFLOW_DIR=/path/LMFlow LMFLOW_PYTHON=$PWD/.venv-lmflow/bin/python
#
# Usage (from anywhere; paths are relative to the kb repo root):
#   scripts/lmflow_finetune.sh --recipe configs/finetune_rtuning.yaml \
#       --train-file training_data/smollm2-135m/rtuning_unsure_MMLU_ID_train_0shot.json \
#       [--model smollm2-135m] [--output-dir models/smollm2-135m/lmflow_rtuning] [--set key=value ...] [--dry-run]
#   --dry-run   print the LMFlow command and exit (needs neither LMFlow nor a GPU; writes nothing)
#
# Environment:
#   LMFLOW_DIR       the LMFlow clone (required unless --dry-run)
#   LMFLOW_PYTHON    the Python that has LMFlow installed (default: python)
#   LMFLOW_LAUNCHER  launcher prefix instead of $LMFLOW_PYTHON, e.g. "deepspeed --num_gpus 8"
#   LMFLOW_DEEPSPEED a DeepSpeed JSON passed as --deepspeed (e.g. $LMFLOW_DIR/configs/ds_config_zero3.json)
#   KB_PYTHON        the Python of this repo (default: .venv/bin/python, else python3)
#
# Output: <output-dir> holds LMFlow's model (or LoRA adapter), kb_base_model.json, config.yaml and, as
# from finetune.py, loss.json / loss.png / kb_finetune.json (`finetune.py --lmflow finish`), so
# `python evaluate.py --model <output-dir>` evaluates it like a finetune.py run. LMFlow itself decides
# the tokenisation details: a text2text sample gets no EOS token (finetune.py appends one), and every
# sample is padded to max_length (--block_size).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${KB_PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then KB_PYTHON="$REPO/.venv/bin/python"; else KB_PYTHON=python3; fi
fi

recipe="" train_file="" model="smollm2-135m" output_dir="" dry_run=0
sets=()
usage() { sed -n '13,17p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --recipe) recipe="$2"; shift 2 ;;
    --train-file) train_file="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --output-dir) output_dir="$2"; shift 2 ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -z "$recipe" || -z "$train_file" ]]; then
  echo "error: --recipe and --train-file are required" >&2; usage >&2; exit 2
fi
if [[ -z "$output_dir" ]]; then
  output_dir="models/$(basename "${model%/}" .gguf)/lmflow_$(basename "$recipe" .yaml)__$(basename "$train_file" .json)"
fi

mode=prepare
if [[ "$dry_run" == 1 ]]; then mode=args; fi
# Validates the recipe and the training file (one-line error, exit 2) before anything runs.
flags_text="$(cd "$REPO" && "$KB_PYTHON" finetune.py --lmflow "$mode" --recipe "$recipe" --train-file "$train_file" \
  --model "$model" --output-dir "$output_dir" ${sets[@]+"${sets[@]}"})"
mapfile -t flags <<< "$flags_text"
if [[ -n "${LMFLOW_DEEPSPEED:-}" ]]; then flags+=(--deepspeed "$LMFLOW_DEEPSPEED"); fi

read -r -a launcher <<< "${LMFLOW_LAUNCHER:-${LMFLOW_PYTHON:-python}}"
if [[ "$dry_run" == 1 ]]; then
  printf 'cd %q &&' "${LMFLOW_DIR:-<LMFLOW_DIR>}"
  printf ' %q' "${launcher[@]}" examples/finetune.py "${flags[@]}"
  printf '\n'
  exit 0
fi
if [[ -z "${LMFLOW_DIR:-}" || ! -f "$LMFLOW_DIR/examples/finetune.py" ]]; then
  echo "error: set LMFLOW_DIR to an LMFlow clone (and LMFLOW_PYTHON to its environment: scripts/lmflow_setup.sh)" >&2
  exit 2
fi
(cd "$LMFLOW_DIR" && "${launcher[@]}" examples/finetune.py "${flags[@]}")
(cd "$REPO" && "$KB_PYTHON" finetune.py --lmflow finish --recipe "$recipe" --train-file "$train_file" \
  --model "$model" --output-dir "$output_dir" ${sets[@]+"${sets[@]}"})
echo "LMFlow run finished -> $output_dir (evaluate with: python evaluate.py --model $output_dir)"
