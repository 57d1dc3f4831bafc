#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite. Extra arguments go to pytest.
#   bash run_tests.sh            # whole suite, slow tests included (a plain `pytest` leaves them out: pyproject.toml)
#   bash run_tests.sh -k denoiser
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup_environment.sh
# one OpenMP thread per process (the suite starts multi-process jobs); set OMP_NUM_THREADS to override
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${VENV:-.venv}/bin/python" -m pytest -q -m "" tests "$@"  # -m "": every test, the slow ones too
