#!/usr/bin/env bash
# Set up the course in ./.venv: a CPU-friendly torch (unless one is already installed), then
# requirements.txt. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# Colab/Kaggle/a GPU box bring their own torch: keep it. Otherwise pin the release the course is
# tested with; a plain `torch` or an open range may pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
  # the tokenizer build (and so the build script's smoke test) reads the CLIP merges file that
  # ships inside the open_clip_torch wheel; nothing imports open_clip, so skip its dependencies
  "${PIP[@]}" --no-deps "open_clip_torch==3.3.0"
  "${PIP[@]}" "ruff>=0.6,<1"
fi
.venv/bin/python -c "import torch, diffusers, transformers; print(f'ready: torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}')"
