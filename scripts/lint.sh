#!/usr/bin/env bash
# The linter CI runs before the tests (configuration: pyproject.toml): ruff check. Fix most findings with
#   .venv/bin/ruff check --fix .
# ruff format is configured but not enforced yet: black-style formatting puts each argument of a long signature on
# its own line, which takes core.Smooth past its 150-line budget and seven functions past 60 lines; enforce it
# (add `"$RUFF" format --check .` here) once those are shortened.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUFF="${VENV:-.venv}/bin/ruff"
"$RUFF" check .
