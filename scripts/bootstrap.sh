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
  # pip byte-compiles what it installs: with PYTHONDONTWRITEBYTECODE set (as on this project's machines) nothing
  # imported later would be cached, and every worker process would compile torch and transformers again.
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
