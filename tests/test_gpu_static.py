"""The compiled-code check of the default GPU variants, ahead of time (no GPU needed): bench/gpu_static.py --check.

Compiles (or takes from the committed cache, keyed by kernel source, specialisation, options, target and Triton
version) the launches the public API makes for bf16/fp32, fp16/fp32, bf16/bf16 and fp32 at "high" (TF32), K in
{1, 3, 10}, on sm_90 and sm_80, for the cached and the chunked backward, and fails on any register spill, on shared
memory over the per-block limit, or on a dot kernel without tensor-core MMA instructions. Runs in a subprocess:
it must not see TRITON_INTERPRET (the kernels must be real JITFunctions).
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia import compiler as nv
        return os.path.exists(nv.get_ptxas(90).path)
    except Exception:
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="needs the ptxas that ships in the triton wheel")
def test_default_tensor_core_variants_compile_clean():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_static.py"), "--check", "--jobs", "2"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    tail = r.stdout[-3000:] + r.stderr[-3000:]
    assert "default variants checked, 0 violations" in r.stdout, tail
    assert r.returncode == 0, tail
