#!/usr/bin/env bash
# Sets up .venv with cnnkit. Installs torch==2.13.0 first, pinned, so that no dependency pulls
# the multi-GB CUDA build on a CPU machine (on this machine pip takes a local CPU wheel).
# Usage: bash scripts/setup.sh [--test]
#   --test also installs the test dependencies, and Debian's chromium (the report.html test opens
#   the report in it) when it is missing and this user may run apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
extra="[export,serve,labels]"
[ "${1:-}" = "--test" ] && extra="[export,serve,labels,test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's chromium for the report test (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
    else
        echo "note: chromium is not installed, so the report.html browser test will be skipped" \
             "(install it with: sudo apt-get install chromium)"
    fi
fi
.venv/bin/python -c "import cnnkit, torch; print(f'cnnkit {cnnkit.__version__} ready (torch {torch.__version__})')"
