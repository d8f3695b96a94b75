#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs memq with everything the demo and the tests need.
# Idempotent: a second run only checks. torch is pinned to 2.13.0 (the CPU build on this project's
# machines; elsewhere set PIP_INDEX_URL=https://download.pytorch.org/whl/cpu for a small CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.memq-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # --no-compile: Python compiles what it imports on first use; compiling every installed module up front (torch,
  # transformers, scipy...) cost a fresh clone ~20 s of its set-up here.
  python -c "import torch" 2>/dev/null || python -m pip install -q --no-compile "torch==2.13.0"
  python -m pip install -q --no-compile -e ".[dev]"
  touch "$stamp"
fi
