#!/usr/bin/env bash
# Create .venv and install sepals with its dev tools. Safe to run again.
#
# torch is installed first, pinned to 2.13.0: on this project's machines that version is
# a local CPU build, and pinning it keeps pip from pulling a multi-GB CUDA build through
# opacus' or flwr's looser requirements. Elsewhere, set TORCH_INDEX_URL (for example to
# PyTorch's CPU wheel index) to choose where torch comes from.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" torch==2.13.0 --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" torch==2.13.0
  fi
fi
"${PIP[@]}" -e ".[dev]"
echo "sepals installed in $(pwd)/.venv"
