#!/usr/bin/env bash
# Time every notebook as a learner runs it (the README's "CPU runtime" column): execute each one on the
# bundled models into a temporary folder, so that the stored outputs stay as they are, and print its
# wall-clock seconds (kernel start and imports included). Run it with nothing else busy on the machine.
#
#   bash scripts/time_notebooks.sh                 # all notebooks
#   bash scripts/time_notebooks.sh notebooks/05*   # some
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 COURSE_MODEL=mini TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
[ "$#" -gt 0 ] || set -- notebooks/*.ipynb
for notebook in "$@"; do
  start=$(date +%s%N)
  if "$PYTHON" -m jupyter nbconvert --to notebook --execute --output-dir "$OUT" \
      --ExecutePreprocessor.timeout=1200 "$notebook" > "$OUT/log" 2>&1; then
    echo "$notebook $(( ($(date +%s%N) - start) / 1000000000 )) s"
  else
    echo "$notebook FAILED:"; tail -20 "$OUT/log"; exit 1
  fi
done
