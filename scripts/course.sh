#!/usr/bin/env bash
# Set everything up and open the course in JupyterLab, on the bundled mini model (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export COURSE_MODEL=${COURSE_MODEL:-mini}
exec .venv/bin/jupyter lab notebooks/00_quickstart.ipynb "$@"
