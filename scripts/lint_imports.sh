#!/usr/bin/env bash
# The import contracts in pyproject.toml, checked on memq as `pip install .` lays it out (tasks/, workers/ and
# config/ become memq.tasks, memq.workers and memq.config only there). Run inside the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
python -m pip install -q --no-deps --no-build-isolation --target "$target" . 2>&1 | grep -v "^WARNING: Location" || true
cd "$target" && lint-imports --config "$root/pyproject.toml" --no-cache
