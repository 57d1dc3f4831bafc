#!/usr/bin/env bash
# The linters CI runs before the tests (configuration: pyproject.toml). Fix most findings with
#   .venv/bin/ruff check --fix . && .venv/bin/ruff format .
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUFF="${VENV:-.venv}/bin/ruff"
"$RUFF" check .
"$RUFF" format --check .
