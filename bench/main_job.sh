#!/usr/bin/env bash
# Sets itself up on a fresh machine and runs the benchmark:
#   bash bench/main_job.sh            # default grid -> bench/results/<device-tag>/
#   bash bench/main_job.sh --quick    # any bench/run.py options pass through
# Uses ./.venv when present; otherwise creates it and installs the package with the [bench] extra
# (+ [triton] where CUDA is present). Never replaces an existing torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch   # the platform's default wheel (CUDA build on Linux x86-64 with a GPU driver)
fi
extras="bench"
if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then extras="bench,triton"; fi
.venv/bin/python -c "import softtriple_triton, pandas, matplotlib, pytorch_metric_learning" 2>/dev/null \
  || .venv/bin/pip install -q -e ".[${extras}]"
exec .venv/bin/python bench/run.py "$@"
