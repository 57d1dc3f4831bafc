#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install requirements.txt into it.
# Idempotent: when .venv already holds exactly requirements.txt, it returns in about a second.
#   bash setup_environment.sh            # uses python3 (>= 3.10)
#   PYTHON=python3.12 bash setup_environment.sh
#   VENV=/path/to/venv bash setup_environment.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found; install Python >= 3.10 or set PYTHON=/path/to/python" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "error: Python >= 3.10 is required, $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 2
fi

stamp="$VENV/.requirements.sha256"
want="$( (cat requirements.txt; "$PYTHON" --version) | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "environment $VENV is up to date"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
echo "installing requirements.txt into $VENV (first time: a few minutes, torch is large)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet --progress-bar off -r requirements.txt
"$VENV/bin/python" -c 'import torch, torchvision, timm; print("torch", torch.__version__, "| torchvision", torchvision.__version__, "| timm", timm.__version__, "| CUDA available:", torch.cuda.is_available())'
echo "$want" > "$stamp"
echo "environment $VENV is ready"
