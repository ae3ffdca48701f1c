#!/usr/bin/env bash
# Set everything up and run the whole test suite: unit tests, the build script's smoke run, and
# every notebook under nbval, all on the CPU and offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 COURSE_MODEL=mini TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
