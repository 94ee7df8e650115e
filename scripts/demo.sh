#!/usr/bin/env bash
# Set up a virtualenv from the project's own files and run the demo: built-in
# workloads, each auto-shifted into its gear, with the reasons and the speedups.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -e ".[fast]"
exec .venv/bin/gearshift demo "$@"
