#!/usr/bin/env bash
# Build LMFlow's environment (a venv of its own) from an LMFlow clone or source archive, then run a
# two-step smoke fine-tune of SmolLM2-135M through scripts/lmflow_finetune.sh and evaluate the result
# with evaluate.py, to check that kb's files, checkpoints and launcher flags work with LMFlow.
#
# Usage (from anywhere; paths are relative to the kb repo root):
#   scripts/lmflow_setup.sh <LMFlow clone dir | LMFlow source .tar.gz> [--venv DIR] [--no-smoke]
#     --venv DIR   where to build the environment (default: .venv-lmflow)
#     --no-smoke   only build the environment
# An archive is unpacked into .lmflow-src/ (git-ignored), since LMFlow is installed editable (-e).
#
# Environment:
#   PYTHON       the Python that creates the venv (default: python3; LMFlow supports 3.9+)
#   TORCH_SPEC   the torch requirement installed first (default: torch==<kb's .venv torch version>, else
#                torch==2.13.0; pinned, so pip does not pick a different build)
#   KB_PYTHON    kb's Python (default: .venv/bin/python; make it with scripts/setup.sh)
#   SMOKE_DIR    the smoke run's output folder (default: models/smollm2-135m/lmflow_smoke)
#
# Afterwards: export LMFLOW_DIR=<the clone> LMFLOW_PYTHON=<venv>/bin/python and use
# scripts/lmflow_finetune.sh; tests/test_lmflow_launcher.py then also checks the launcher's flags against
# LMFlow's own argument parser.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="" venv="$REPO/.venv-lmflow" smoke=1
usage() { sed -n '6,9p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) venv="$(realpath -m "$2")"; shift 2 ;;
    --no-smoke) smoke=0; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "error: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    *) if [[ -n "$src" ]]; then echo "error: one LMFlow source, got '$src' and '$1'" >&2; exit 2; fi
       src="$(realpath -m "$1")"; shift ;;
  esac
done
if [[ -z "$src" ]]; then echo "error: give an LMFlow clone or source archive" >&2; usage >&2; exit 2; fi
if [[ -z "${KB_PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then KB_PYTHON="$REPO/.venv/bin/python"; else KB_PYTHON=python3; fi
fi
export KB_PYTHON

# 1. The LMFlow source: a clone as it is, an archive unpacked into .lmflow-src/.
if [[ -f "$src" ]]; then
  dest="$REPO/.lmflow-src"
  rm -rf "$dest" && mkdir -p "$dest"
  tar -xzf "$src" -C "$dest"
  # archives from GitHub hold one top folder; a flat archive is the tree itself
  if [[ ! -f "$dest/setup.py" ]] && [[ "$(find "$dest" -mindepth 1 -maxdepth 1 | wc -l)" == 1 ]]; then
    dest="$(find "$dest" -mindepth 1 -maxdepth 1 -type d)"
  fi
  src="$dest"
fi
if [[ ! -f "$src/setup.py" || ! -f "$src/examples/finetune.py" ]]; then
  echo "error: $src is not an LMFlow source tree (no setup.py / examples/finetune.py)" >&2; exit 2
fi

# 2. The venv: torch pinned first, then LMFlow with transformers < 5 (requirements-lmflow.txt).
if [[ -z "${TORCH_SPEC:-}" ]]; then
  kb_torch="$("$KB_PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
  TORCH_SPEC="torch==${kb_torch:-2.13.0}"
fi
[[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$venv/bin/python" -m pip install --quiet "$TORCH_SPEC" -r "$REPO/requirements-lmflow.txt" -e "$src"
"$venv/bin/python" -c 'import lmflow, torch, transformers; print(f"LMFlow {lmflow.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")'
echo "LMFlow environment: $venv  (export LMFLOW_DIR=$src LMFLOW_PYTHON=$venv/bin/python)"
[[ "$smoke" == 1 ]] || exit 0

# 3. Smoke: two full fine-tuning steps of the R-Tuning recipe on a small text2text file, then evaluate.py
#    on two ParaRel questions, the tuned model given as its output folder and nothing edited.
out="${SMOKE_DIR:-models/smollm2-135m/lmflow_smoke}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$KB_PYTHON" - "$tmp/smoke_text2text.json" <<'PY'
import json, sys
qa = [("The capital of France is", " Paris."), ("The native language of Jean Reno is", " French."),
      ("Mount Everest is located in", " Nepal."), ("The Eiffel Tower is in", " Paris."),
      ("Toyota was founded in", " Japan."), ("The Danube flows into the", " Black Sea."),
      ("Albert Einstein was born in", " Germany."), ("The official language of Brazil is", " Portuguese.")]
rows = [{"input": f"Question: {q}\nAnswer:", "output": f"{a} Are you sure you accurately answered the question "
         "based on your internal knowledge? I am sure."} for q, a in qa]
json.dump({"type": "text2text", "instances": rows}, open(sys.argv[1], "w"), indent=1)
PY
cd "$REPO"
LMFLOW_DIR="$src" LMFLOW_PYTHON="$venv/bin/python" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
  bash scripts/lmflow_finetune.sh --recipe configs/finetune_rtuning.yaml --train-file "$tmp/smoke_text2text.json" \
  --model smollm2-135m --output-dir "$out" --set max_steps=2 --set logging_steps=1 --set max_length=128
"$KB_PYTHON" evaluate.py --model "$out" --test pararel:ID_test --limit 2 --no-ap --results-dir "$tmp/results" \
  --output-dir "$tmp/eval"
echo "LMFlow smoke test passed: $out"
