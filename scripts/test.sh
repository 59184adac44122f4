#!/usr/bin/env bash
# Install sslt with its test extras into a cached virtualenv (outside the clone) and run the tests.
# The venv lives in ${XDG_CACHE_HOME:-~/.cache}/sslt/venv-<hash of pyproject.toml>: a repeat run reuses it, a fresh
# machine builds it from scratch (about 90 s with pip; uv/poetry would ignore the machine's local torch wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
echo "sslt tests: venv $SSLT_VENV" >&2
"$SSLT_VENV/bin/python" -m pytest "$@"
