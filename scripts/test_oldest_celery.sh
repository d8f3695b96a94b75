#!/usr/bin/env bash
# The fault, poison, pipeline and Celery-internals tests again, on the oldest Celery that pyproject.toml admits
# (its `celery>=X` lower bound). An overlay venv (.venv-oldest-celery) holds only that Celery; everything else
# comes from .venv (scripts/bootstrap.sh), so this costs one small wheel, not a second install of the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
main_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
oldest=$(.venv/bin/python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(d for d in deps if d.startswith("celery"))
print(re.search(r">=\s*([0-9][0-9.]*)", spec).group(1))
PY
)
overlay=.venv-oldest-celery
if [ ! -x "$overlay/bin/python" ]; then
  .venv/bin/python -m venv "$overlay"
fi
overlay_site=$("$overlay/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$main_site')" > "$overlay_site/memq-main-venv.pth"
"$overlay/bin/python" -m pip install -q "celery==$oldest" 2>&1 | grep -v '^WARNING: Location' || true
export PATH="$PWD/$overlay/bin:$PWD/.venv/bin:$PATH"
"$overlay/bin/python" -c "import celery, sys; print('oldest supported Celery:', celery.__version__); sys.exit(0 if celery.__version__.startswith('$oldest') else 1)"
"$overlay/bin/python" -m pytest -p no:cacheprovider -n "${MEMQ_TEST_PROCESSES:-3}" "$@" \
  tests/test_faults.py tests/test_poison.py tests/test_pipeline.py tests/test_celery_internals.py \
  tests/test_events.py tests/test_broadcast_guard.py
