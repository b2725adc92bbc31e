#!/usr/bin/env bash
# Set up the environment if needed, lint, and run the whole test suite (slow tests included).
#   bash scripts/test.sh            # everything (what CI runs)
#   bash scripts/test.sh -m "not slow"   # the fast part only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
