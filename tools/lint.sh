#!/usr/bin/env bash
# Lint (ruff) and type check (mypy on softtriple_triton/); both configured in pyproject.toml. Sets up ./.venv like
# tools/test.sh, which runs this first when it runs the whole suite (no arguments), as CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh "triton,test"
ruff check .
mypy
