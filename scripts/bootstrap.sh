#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs memq with everything the demo and the tests need.
# Idempotent: a second run only checks. torch is pinned to 2.13.0 (the CPU build on this project's
# machines; elsewhere set PIP_INDEX_URL=https://download.pytorch.org/whl/cpu for a small CPU wheel).
# The install runs through uv (installed into .venv by pip first) where uv can be had: it resolves and installs the
# stack in about a third of pip's time, from the same indexes (pip's own configuration, translated by
# scripts/pip_sources.py). Where uv cannot be installed, pip does it. Either way everything is byte-compiled: with
# PYTHONDONTWRITEBYTECODE set (as on this project's machines) nothing imported later would be cached, and every
# worker process would compile torch and transformers again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.memq-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if python -m pip install -q uv 2>/dev/null && command -v uv >/dev/null; then
    mapfile -t sources < <(python scripts/pip_sources.py)
    uv pip install -q --python .venv/bin/python --compile-bytecode "${sources[@]}" "torch==2.13.0" -e ".[dev]"
  else
    python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e ".[dev]"
  fi
  touch "$stamp"
fi
