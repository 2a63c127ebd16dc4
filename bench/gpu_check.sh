#!/usr/bin/env bash
# The one-call GPU verdict (< 9 minutes on an H200, about 7.5 planned): run it once when a GPU is lent and commit
# what it writes. Usage (repository root, CUDA machine):  OUT=/some/dir bash bench/gpu_check.sh
#   1. env.txt         device, driver, torch, triton, pytorch-metric-learning versions
#   2. pytest.log      the exactness tests on CUDA (compiled kernels, no interpreter), <= 200 s
#   3. crosscheck.md   the kernels the API loaded (n_regs, n_spills) against ptxas -v and the committed AOT report
#   4. bench/          every backward path and dtype policy vs eager / torch.compile / PML (autocast) and the
#                      3-GEMM cuBLAS floor at the target shapes: results.csv, summary.md, speedup.png (<= 240 s)
# At most 8 files come back from the device tool: keep it that way (7 now). Never mixes in CPU numbers.
set -u
OUT="${OUT:-${1:-bench/results/gpu-check}}"
mkdir -p "$OUT/bench"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# pytorch-metric-learning is not on the GPU image: carried as a wheel when the caller put one under .whl/
# (here: pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl pytorch-metric-learning==2.9.0;
#  call the device tool with carry [".whl"]); without it the PML provider is skipped, and says so in env.txt
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# the package (kernels/ is mapped to softtriple_triton.kernels by pyproject, so PYTHONPATH alone is not enough)
"$PY" -c "import softtriple_triton.kernels" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  || echo "WARNING: could not install the package (pip install -e .)"
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  "$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}{p.minor}", "SMs", p.multi_processor_count, "memory", p.total_memory)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton missing:", e)
try:
    import pytorch_metric_learning as p; print("pytorch-metric-learning", p.__version__)
except Exception:
    print("pytorch-metric-learning not installed (its provider is skipped)")
PYEOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
"$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA: stopping"; exit 2; }
t0=$(date +%s)
# 2. exactness on CUDA: parity (fp64 / low precision), the dtype policy on its rounded-operand oracle, the
#    launchers, gradcheck, the API; stop at 200 s whatever is left (kernels compile on first use)
timeout 200 "$PY" -m pytest -q -p no:cacheprovider -x -rs tests/test_kernels.py tests/test_dtype_policy.py \
  tests/test_parity.py tests/test_gradcheck.py tests/test_api.py > "$OUT/pytest.log" 2>&1
echo "pytest (CUDA) rc=$? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
tail -3 "$OUT/pytest.log"
# 3. loaded kernels vs the AOT report
timeout 60 "$PY" bench/gpu_crosscheck.py --out "$OUT" > /dev/null 2> "$OUT/crosscheck.err"
echo "crosscheck rc=$? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
tail -2 "$OUT/crosscheck.md" 2>/dev/null; [ -s "$OUT/crosscheck.err" ] && tail -3 "$OUT/crosscheck.err" >> "$OUT/env.txt"
rm -f "$OUT/crosscheck.err"
# 4. the benchmark, within its own time budget (it writes what it finished)
timeout 250 "$PY" bench/gpu_bench.py --out "$OUT/bench" --budget-s 220 > "$OUT/bench/bench.log" 2>&1
echo "bench rc=$? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
cat "$OUT/bench/summary.md" 2>/dev/null | head -40
