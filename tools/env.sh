#!/usr/bin/env bash
# Creates (or reuses) ./.venv with the CPU build of torch and the project installed editable.
# Usage: source tools/env.sh EXTRAS   (EXTRAS e.g. "triton,test" or "triton,bench")
set -euo pipefail
extras="${1:-triton,test}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
# torch first, pinned: on these machines torch==2.13.0 is a local CPU wheel; an unpinned torch would
# pull a multi-GB CUDA build. pyproject.toml itself accepts torch 2.11-2.14 (GPU machines have 2.11).
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q --disable-pip-version-check torch==2.13.0
fi
"$py" -m pip install -q --disable-pip-version-check -e "$root[$extras]"
export PATH="$venv/bin:$PATH"
