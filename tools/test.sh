#!/usr/bin/env bash
# Sets up ./.venv and runs the test suite. Without a GPU the Triton kernels run through Triton's
# interpreter on CPU tensors (TRITON_INTERPRET=1); with one, on CUDA. Extra args go to pytest; without any (the
# whole suite, as CI runs it) the lint and type checks of tools/lint.sh run first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
    bash tools/lint.sh
fi
source tools/env.sh "triton,test"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1
fi
python -m pytest -q -p no:cacheprovider "$@" tests
