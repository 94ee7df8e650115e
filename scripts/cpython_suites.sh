#!/usr/bin/env bash
# CI: CPython 3.13's own tests for its pools, run against gearshift's drop-ins (ThreadPoolExecutor,
# ProcessPoolExecutor, Pool). Needs the pyenv CPython 3.13 (it ships the `test` package); makes
# .venv313 (pip install -e .) on first use. Exit status: non-zero if any test fails.
#   scripts/cpython_suites.sh [SUITE ...]      suites: thread process wait as_completed pool-fork ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
exec "$PY" scripts/cpython_suites.py "$@"
