"""The GPU verdict's harness (bench/gpu_bench.py) end to end on tiny shapes on the CPU (the Triton kernels through
the interpreter): every provider runs, its loss agrees with the plain formula, and the files it promises exist.
Times nothing meaningful (that is the GPU's job)."""

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run of the harness")
def test_gpu_bench_smoke_on_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_bench.py"), "--smoke", "--device", "cpu",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("results.csv", "summary.md", "speedup.png"):
        assert (tmp_path / name).exists(), name
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    providers = {row["provider"] for row in rows}
    assert {"ours cached (bf16)", "ours chunked (bf16)", "ours two-kernel (bf16)", "eager (autocast)",
            "torch.compile (autocast)", "3-GEMM floor (cuBLAS bf16)"} <= providers
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["ms"]) > 0
        if row["check_rel"]:  # bf16 products vs the fp32 formula
            assert float(row["check_rel"]) < 3e-2, row
