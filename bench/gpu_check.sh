#!/usr/bin/env bash
# One prepared GPU check (< 9 minutes on an H200): the test suite on CUDA, then a quick GPU benchmark.
# Usage (repository root, on a machine with CUDA):  OUT=/some/dir bash bench/gpu_check.sh
# Writes under $OUT: env.txt, pytest_cuda.log, bench/ (results.csv, *.png, summary.md), bench.log.
# Never mixes in CPU numbers: the bench runs with --device cuda and fails if CUDA is missing.
set -u
OUT="${OUT:-${1:-bench/results/gpu-check}}"
mkdir -p "$OUT/bench"
# a python whose torch sees CUDA: $PYTHON, else ./.venv (if its torch is a CUDA build), else python3
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  PY=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=.venv/bin/python
  fi
fi
# the package (kernels/ is mapped to softtriple_triton.kernels by pyproject, so PYTHONPATH is not enough)
"$PY" -c "import softtriple_triton.kernels" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  || echo "WARNING: could not install the package (pip install -e .)"
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton missing:", e)
try:
    import pytorch_metric_learning as p; print("pytorch-metric-learning", p.__version__)
except Exception:
    print("pytorch-metric-learning not installed")
PYEOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
"$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA: stopping"; exit 2; }
# 1. the test suite on CUDA (~4.5 min budget): with a GPU every Triton-backend test runs the compiled kernels
#    on CUDA tensors (no interpreter), plus the tests marked cuda; the glyph training smoke test is CPU-only
timeout 270 "$PY" -m pytest -q -p no:cacheprovider -rs tests --ignore=tests/test_glyphs.py > "$OUT/pytest_cuda.log" 2>&1
echo "pytest (CUDA) rc=$?" | tee -a "$OUT/env.txt"
tail -5 "$OUT/pytest_cuda.log"
# 2. quick GPU bench (~4 min budget): the GPU targets' shapes first, triton vs eager / torch.compile / PML /
#    GEMM floor; on SIGTERM (timeout) it still writes summary.md and the plots of what it finished (exit 3)
timeout 230 "$PY" bench/run.py --quick --device cuda --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/env.txt"
tail -25 "$OUT/bench.log"
