#!/usr/bin/env bash
# Sets up .venv with cnnkit. Installs torch==2.13.0 first, pinned, so that no dependency pulls
# the multi-GB CUDA build on a CPU machine (on this machine pip takes a local CPU wheel).
# Usage: bash scripts/setup.sh [--test]   (--test also installs the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
.venv/bin/python -c "import cnnkit, torch; print(f'cnnkit {cnnkit.__version__} ready (torch {torch.__version__})')"
