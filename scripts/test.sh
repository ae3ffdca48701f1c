#!/usr/bin/env bash
# Set everything up and run the whole test suite: unit tests, the build script's smoke run, and
# every notebook under nbval, all on the CPU and offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 COURSE_MODEL=mini TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
# Two workers (CI has two cores), each kernel on an equal share of the cores: these tiny models gain
# little from a second thread, so two notebooks at a time finish the suite sooner. `--dist
# loadscope` keeps each notebook (and each test module) on one worker, its cells in order.
WORKERS=${TEST_WORKERS:-2}
CORES=$(nproc 2>/dev/null || echo 2)
THREADS=$(( CORES / WORKERS )); [ "$THREADS" -ge 1 ] || THREADS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS}
exec .venv/bin/python -m pytest -n "$WORKERS" --dist loadscope "$@"
