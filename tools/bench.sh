#!/usr/bin/env bash
# Sets up ./.venv (with pytorch-metric-learning, pandas, matplotlib) and runs the benchmark.
# Extra args go to bench/run.py (--quick, --full, --device ...).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh "triton,bench"
python bench/run.py "$@"
