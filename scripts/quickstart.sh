#!/usr/bin/env bash
# Install sslt into the cached virtualenv and run the main job on the embedded synthetic benchmark:
# generate the benchmark, train recipes/quickstart.yaml, evaluate it on the VGG-SS-style and Flickr-style tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
export PATH="$SSLT_VENV/bin:$PATH"
sslt prepare synthetic --out data/synthetic
sslt train recipes/quickstart.yaml "$@"
