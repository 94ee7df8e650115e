#!/usr/bin/env bash
# Set up a virtualenv from the project's own files and run every check CI runs:
# ruff and mypy on src/, then the test suite on Python 3.11 and, where the tool
# exists (../shared/tools/py314), on Python 3.14 too; then CPython 3.13's own tests
# for its pools against gearshift's drop-ins, where a CPython 3.13 is installed (pyenv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
echo "== ruff"; .venv/bin/ruff check $(ls -d src tests bench examples 2>/dev/null)
echo "== mypy"; .venv/bin/mypy src
echo "== pytest (python $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])'))"
.venv/bin/python -m pytest -q "$@"
PY314=../shared/tools/py314
if [[ -x $PY314 && -z ${GEARSHIFT_SKIP_314:-} ]]; then
  echo "== pytest (python 3.14, via $PY314)"
  if [[ ! -x .venv314/bin/python ]]; then
    "$PY314" python3.14 -m venv .venv314
  fi
  "$PY314" .venv314/bin/python -m pip install -q --upgrade pip
  "$PY314" .venv314/bin/python -m pip install -q -e ".[test]"
  "$PY314" .venv314/bin/python -m pytest -q "$@"
fi
if ls "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python3.13 >/dev/null 2>&1 && [[ -z ${GEARSHIFT_SKIP_CPYTHON_SUITES:-} ]]; then
  echo "== CPython 3.13's concurrent.futures and multiprocessing.Pool tests against the drop-ins"
  bash scripts/cpython_suites.sh
else
  echo "== (no CPython 3.13 under pyenv: CPython's own pool tests not run)"
fi
