"""The per-class regulariser against the official (C*K)^2 Gram formula, and its memory bound."""

import pytest
import torch

import softtriple_triton as st
from conftest import loss_and_grads, make_inputs, rel_err


@pytest.mark.parametrize("C,K", [(1, 2), (7, 3), (13, 10), (4, 1)])
def test_matches_gram_formula_fp64(C, K):
    _, w, _ = make_inputs(1, 19, C, K, seed=C * K)
    got = loss_and_grads(lambda a, b: st.center_regularizer(b, K) + 0 * a.sum(), w[:1, :1], w)
    want = loss_and_grads(lambda a, b: st.reference_regularizer(b, K) + 0 * a.sum(), w[:1, :1], w)
    assert rel_err(got[0], want[0]) <= 1e-12 if K > 1 else got[0].item() == 0.0
    if K > 1:
        assert rel_err(got[2], want[2]) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_centers_no_nan(dtype):
    """In fp16 2 + 1e-5 rounds to 2: identical centers would give sqrt(0) and NaN gradients. Computed in fp32."""
    w = torch.randn(8, 1, dtype=torch.float64).repeat(1, 12).to(dtype)  # 3 classes x 4 identical centers
    w.requires_grad_(True)
    r = st.center_regularizer(w, 4)
    r.backward()
    assert r.dtype == torch.float32
    assert torch.isfinite(r) and torch.isfinite(w.grad).all()
    # identical centers put the value at sqrt(1e-5): fp32 cancellation in 2 - 2<w,w> leaves ~1% error
    assert rel_err(r, st.reference_regularizer(w.detach().double(), 4)) < 5e-2


def test_never_builds_the_gram_matrix():
    """C*K = 300,000 centers: the (C*K)^2 Gram matrix would need 360 GB in fp32 on this 24 GB machine."""
    C, K, d = 30_000, 10, 4
    w = torch.randn(d, C * K)
    r = st.center_regularizer(w, K)
    # compare with the Gram formula on a slice of classes (the regulariser is a mean over classes)
    part = st.reference_regularizer(w[:, : 20 * K].double(), K)
    assert torch.isfinite(r)
    assert 0.5 * part.item() < r.item() < 2.0 * part.item()
