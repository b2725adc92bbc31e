#!/usr/bin/env bash
# The original study's THUDM/chatglm2-6b (remote code): R-Tuning + CRaFT at paper scale (one GPU, bf16).
# Its remote code breaks on transformers >= 4.42, so it runs in its own pinned environment:
#   python3 -m venv .venv-chatglm2 && .venv-chatglm2/bin/pip install -r requirements-chatglm2.txt
#   bash scripts/run_chatglm2_6b.sh                # uses .venv-chatglm2 when it exists (or set PY=...)
#   bash scripts/run_chatglm2_6b.sh --dry-run      # print the commands only
# Remote code runs only at the commit below (the one public evaluation configs pin for THUDM/chatglm2-6b,
# e.g. OpenCompass's); read that commit's *.py files before the first run, or set REVISION=<another
# 40-hex commit you have read>.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PY:-} && -x $root/.venv-chatglm2/bin/python ]]; then PY=.venv-chatglm2/bin/python; fi
if [[ " $* " != *" --dry-run "* ]]; then
  # Fail in a second, not after the first model load: the pinned environment is required.
  (cd "$root" && "${PY:-.venv/bin/python}" -c 'import sys, transformers
v = tuple(int(x) for x in transformers.__version__.split(".")[:2])
sys.exit(f"error: chatglm2-6b needs transformers < 4.42 (found {transformers.__version__}); see requirements-chatglm2.txt" if v >= (4, 42) else 0)')
fi
MODEL=THUDM/chatglm2-6b
REVISION=${REVISION:-b1502f4f75c71499a3d566b14463edd62620ce9f}
MODEL_FLAGS=(--trust-remote-code --revision "$REVISION" --dtype bfloat16)
source "$root/scripts/pipeline.sh"
kb_pipeline "$@"
