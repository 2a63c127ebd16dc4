#!/usr/bin/env bash
# One command from a fresh checkout (Debian/Ubuntu with apt; network to PyPI and the Debian mirror):
#   bash examples/glyphs/run.sh                  # ~10 min preset "quick" (+ a few minutes of font download / rendering)
#   bash examples/glyphs/run.sh --preset full    # the saturated reference results (~1 h on 2 CPU cores)
#   bash examples/glyphs/run.sh multimodal                 # K x m quick grid (multimodal.py --preset mm-quick)
#   bash examples/glyphs/run.sh multimodal --preset mm     # the committed K x m grid (see README for the time)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d "$ROOT/.venv" ] || python3 -m venv "$ROOT/.venv"
  . "$ROOT/.venv/bin/activate"
fi
python -c "import softtriple_triton" 2>/dev/null || pip install -e "$ROOT"
pip install -q -r "$HERE/requirements.txt"
# apt-get download needs current package lists (root needed only for this update)
if ! apt-cache show fonts-ipafont-gothic >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update; else sudo apt-get update; fi
fi
cd "$HERE"
python build_dataset.py --set kanji --num-classes 1000
if [ "${1:-}" = multimodal ]; then
  shift
  exec python multimodal.py "$@"
fi
exec python run_experiments.py "$@"
