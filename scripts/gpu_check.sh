#!/usr/bin/env bash
# What only a GPU can show, in one report: DIR/gpu_check.md (default runs/gpu_check). About 9 minutes on one GPU;
# --device cpu runs the CPU-sized sections (a few minutes on 2 cores). Exit status 1 when a section failed.
#   bash scripts/gpu_check.sh [--device cpu|cuda|cuda:N] [--outdir DIR]
# The sections and what they compare: scripts/gpu_check.py; where the results go: docs/PERFORMANCE.md, "GPU check".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "$PYTHON" scripts/gpu_check.py "$@"
