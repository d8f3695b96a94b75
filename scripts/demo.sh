#!/usr/bin/env bash
# The demo on a fresh machine: set-up, then `memq demo` (starts Redis/MongoDB/workers it needs, stops them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
exec memq demo "$@"
