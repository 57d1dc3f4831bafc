#!/usr/bin/env bash
# Set up the environment if needed (idempotent; about a second when .venv is up to date), then run the embedded
# end-to-end demo (FT-CADIS on scikit-learn's digits, CPU, a few minutes). Extra arguments go to demo.py.
#   bash run_demo.sh                 # sigma 0.5, outputs in demo_output/
#   bash run_demo.sh --quick         # a much shorter run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup_environment.sh
export MPLBACKEND="${MPLBACKEND:-Agg}"
exec "${VENV:-.venv}/bin/python" demo.py "$@"
