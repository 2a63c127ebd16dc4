"""The matrix work of a training step per path, counted (bench/flops.py): tl.dot executed by the interpreter with a
GPU's launch plan + torch matrix products. GEMM-equivalents of 2 N d C K FLOPs; shapes whose N and C are multiples
of the tiles, so no padding is counted. A recomputation added to a path (or one removed) changes the count."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
flops = pytest.importorskip("flops")

from softtriple_triton.kernels.target import A100, H200  # noqa: E402

EXPECTED = {  # GEMM-equivalents per step: forward + backward
    "triton, cached backward (default when the cache fits)": 3,
    "triton, chunked backward (default otherwise)": 4,
    "triton, two-kernel backward": 5,
    "torch backend, forward cache kept": 3,
    "torch backend, recompute": 4,
    "plain formula (eager / torch.compile)": 3,
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts interpreted tl.dot: a CPU-only run")
@pytest.mark.parametrize("K", [1, 10])
@pytest.mark.parametrize("target", [H200, A100], ids=["sm90", "sm80"])
def test_gemm_equivalents_per_path(K, target):
    N, d, C = 128, 32, 16 if K > 1 else 256
    for label, backend, option in flops.PATHS:
        got = flops.count_step(backend, option, N, d, C, K, target=target)
        assert got["total"] == pytest.approx(EXPECTED[label], abs=1e-9), (label, got)
        if backend == "triton":  # the library products are 2 per step (none in the two-kernel backward)
            assert got["torch"] == pytest.approx(0 if "two-kernel" in label else 2, abs=1e-9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts interpreted tl.dot: a CPU-only run")
def test_padding_is_counted():
    """C = 100, K = 10: the last class tile of 8 holds 4 classes: 104 / 100 of the work in each Triton dot."""
    got = flops.count_step("triton", dict(backward="chunked"), 128, 32, 100, 10, target=H200)
    assert got["triton"] == pytest.approx(2 * 1.04, abs=1e-9) and got["torch"] == pytest.approx(2, abs=1e-9)
