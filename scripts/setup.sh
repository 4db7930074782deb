#!/usr/bin/env bash
# Sets up .venv with cnnkit. Installs torch==2.13.0 first, pinned, so that no dependency pulls
# the multi-GB CUDA build on a CPU machine (on this machine pip takes a local CPU wheel).
# Usage: bash scripts/setup.sh [--test]
#   --test also installs the test dependencies, and Debian's chromium (the report.html test opens
#   the report in it) and postgresql (the shared-study tests start a throw-away server from its
#   binaries: tests/postgres.py) when they are missing and this user may run apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
extra="[export,serve,labels]"
[ "${1:-}" = "--test" ] && extra="[export,serve,labels,test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
# apt_install PACKAGE WHAT TESTS: Debian's PACKAGE, where this user may run apt-get; else a note that TESTS skip.
apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's $1 for the $2 (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "$1" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$1" >/dev/null; }
    else
        echo "note: $1 is not installed, so the $2 will be skipped (install it with: sudo apt-get install $1)"
    fi
}
if [ "${1:-}" = "--test" ]; then
    command -v chromium >/dev/null 2>&1 || apt_install chromium "report.html browser test"
    # Debian keeps initdb and postgres off PATH, in /usr/lib/postgresql/VERSION/bin.
    command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
        || apt_install postgresql "shared-study tests (tune --storage)"
fi
.venv/bin/python -c "import cnnkit, torch; print(f'cnnkit {cnnkit.__version__} ready (torch {torch.__version__})')"
