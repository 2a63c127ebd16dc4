"""Numerical extremes, non-finite inputs and property-based agreement of all backends with the fp64 oracle."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import softtriple_triton as st
from conftest import TORCH_DEVICES, TRITON_DEVICE, loss_and_grads, make_inputs, rel_err

# CI runs a fixed set of examples (no flaky discoveries at landing time); locally they are random.
_CI = os.environ.get("CI", "") == "true"

FUSED = [("triton", TRITON_DEVICE)] + [("torch", d) for d in TORCH_DEVICES]


def _agree(backend, device, x, w, y, K, tol=1e-9, g=None, **kw):
    x, w, y = x.to(device), w.to(device), y.to(device)
    want = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, K, backend="reference", **kw), x, w, g)
    got = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, K, backend=backend, **kw), x, w, g)
    for name, a, b in zip(("loss", "d_embeddings", "d_fc"), got, want):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))
    return got


# --------------------------------------------------------------------------- extremes, fp64 oracle

@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("la,gamma", [(100.0, 0.01), (100.0, 1.0), (1.0, 0.01)])
def test_extreme_scale_and_temperature(backend, device, la, gamma):
    x, w, y = make_inputs(31, 16, 12, 4, seed=int(la))
    _agree(backend, device, x, w, y, 4, la=la, gamma=gamma, tau=0.2, margin=0.01)


@pytest.mark.parametrize("backend,device", FUSED)
def test_extreme_temperature_fp32_stays_finite_and_close(backend, device):
    """gamma = 0.01 in fp32: exp(-2/gamma) underflows, so the torch backend must subtract per-class maxima."""
    x, w, y = make_inputs(40, 24, 10, 5, seed=4)
    want = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, 5, la=50.0, gamma=0.01, backend="reference"),
                          x, w)
    got = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y.to(device), 5, la=50.0, gamma=0.01,
                                                         backend=backend), x.float().to(device), w.float().to(device))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("backend,device", FUSED)
def test_all_centers_of_a_class_identical(backend, device):
    x, w, y = make_inputs(20, 12, 6, 3, seed=1)
    w[:, 3:6] = w[:, 3:4]  # class 1: three copies of one center
    _agree(backend, device, x, w, y, 3, tau=0.5)


@pytest.mark.parametrize("backend,device", FUSED)
def test_embeddings_equal_to_centers(backend, device):
    x, w, y = make_inputs(12, 10, 6, 2, seed=2)
    for i in range(12):
        x[i] = w[:, (2 * y[i] + i % 2).item()] * 3.0  # exactly on one of its class's centers (after normalising)
    _agree(backend, device, x, w, y, 2, la=64.0, gamma=0.05)


@pytest.mark.parametrize("backend,device", FUSED)
def test_many_classes_one_dominant(backend, device):
    """C = 1500: the true class's logit dominates the rest by ~la, the others are all tiny in the softmax."""
    C, K, d = 1500, 2, 16
    x, w, y = make_inputs(9, d, C, K, seed=5)
    for i in range(9):
        w[:, 2 * y[i]] = x[i]
    _agree(backend, device, x, w, y, K, la=80.0, gamma=0.1, tau=0.1)


@pytest.mark.parametrize("backend,device", FUSED)
def test_batch_of_one_and_absent_classes(backend, device):
    x, w, _ = make_inputs(1, 8, 50, 3, seed=6)
    y = torch.tensor([49])
    _agree(backend, device, x, w, y, 3, tau=0.2)  # 49 classes absent from the batch still get gradients


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_identical_centers_no_nan(backend, device, dtype):
    x, w, y = make_inputs(16, 8, 4, 3, seed=7)
    w[:, 0:3] = w[:, 0:1]
    x, w = x.to(dtype).to(device), w.to(dtype).to(device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    loss = st.softtriple_loss(x, w, y.to(device), 3, tau=1.0, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    assert w.dtype == dtype and w.grad.dtype == dtype


@pytest.mark.parametrize("backend,device", FUSED)
def test_one_dimensional_embeddings(backend, device):
    """d = 1: every unit vector is +-1, so the normalised centers' gradient is analytically 0 (only rounding)."""
    x, w, y = make_inputs(7, 1, 5, 2, seed=10)
    got = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y.to(device), 2, backend=backend),
                         x.to(device), w.to(device))
    want = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, 2, backend="reference"), x, w)
    assert rel_err(got[0], want[0]) <= 1e-12
    assert got[2].abs().max() <= 1e-12


# --------------------------------------------------------------------------- non-finite inputs propagate

@pytest.mark.parametrize("backend,device", FUSED + [("reference", "cpu")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embedding_row_propagates_to_its_row_only(backend, device, bad):
    """Policy: like PyTorch's losses, non-finite inputs propagate (no error, no silent finite number)."""
    x, w, y = make_inputs(10, 8, 5, 2, seed=8)
    x[3, 2] = bad
    rows = st.softtriple_loss(x.to(device), w.to(device), y.to(device), 2, reduction="none", backend=backend)
    assert torch.isnan(rows[3])
    keep = torch.arange(10) != 3
    ok = st.softtriple_loss(x[keep], w, y[keep], 2, reduction="none", backend="reference")
    assert rel_err(rows[keep.to(device)], ok) <= 1e-12
    assert torch.isnan(st.softtriple_loss(x.to(device), w.to(device), y.to(device), 2, backend=backend))


@pytest.mark.parametrize("backend,device", FUSED + [("reference", "cpu")])
def test_non_finite_center_propagates(backend, device):
    x, w, y = make_inputs(6, 8, 5, 2, seed=9)
    w[1, 4] = float("nan")
    assert torch.isnan(st.softtriple_loss(x.to(device), w.to(device), y.to(device), 2, backend=backend))


# --------------------------------------------------------------------------- property-based

def _case(draw):
    K = draw(hs.integers(1, 6))
    return dict(
        N=draw(hs.integers(1, 40)), d=draw(hs.integers(2, 40)), C=draw(hs.integers(1, 30)), K=K,
        la=draw(hs.floats(0.5, 80.0)), gamma=draw(hs.floats(0.02, 2.0)), tau=draw(hs.sampled_from([0.0, 0.3])),
        margin=draw(hs.floats(0.0, 0.5)), normalize=draw(hs.booleans()),
        reduction=draw(hs.sampled_from(["mean", "sum", "none"])), seed=draw(hs.integers(0, 10_000)),
    )


def _check_case(backend, device, c):
    x, w, y = make_inputs(c["N"], c["d"], c["C"], c["K"], seed=c["seed"], scale=1.0 if c["normalize"] else 0.3)
    g = torch.rand(c["N"], dtype=torch.float64, device=device) + 0.1 if c["reduction"] == "none" else None
    kw = dict(la=c["la"], gamma=c["gamma"], margin=c["margin"], normalize_embeddings=c["normalize"])
    rows = st.softtriple_loss(x, w, y, c["K"], reduction="none", backend="reference", **kw)
    # A row with loss L ~ 0 has q_target = 1 - L: any formula (the oracle's included) computes q - 1 with absolute
    # error ~eps, so gradients are only defined to ~eps / L relative. Tolerance: 1e-9, or 100 eps / min L if larger.
    # (L == 0 exactly only for C == 1, where all gradients are exactly 0 on every backend.)
    min_loss = rows.min().item()
    tol = max(1e-9, 100 * 2.2e-16 / min_loss) if min_loss > 0 else 1e-9
    _agree(backend, device, x, w, y, c["K"], tol=tol, g=g, la=c["la"], gamma=c["gamma"], tau=c["tau"], margin=c["margin"],
           normalize_embeddings=c["normalize"], reduction=c["reduction"])


@settings(max_examples=int(os.environ.get("ST_HYPOTHESIS_EXAMPLES", 40)), deadline=None, derandomize=_CI, suppress_health_check=[HealthCheck.too_slow])
@given(hs.composite(_case)())
def test_property_torch_backend_matches_oracle(c):
    _check_case("torch", "cpu", c)


@settings(max_examples=int(os.environ.get("ST_HYPOTHESIS_EXAMPLES", 12)), deadline=None, derandomize=_CI, suppress_health_check=[HealthCheck.too_slow])
@given(hs.composite(_case)())
def test_property_triton_backend_matches_oracle(c):
    _check_case("triton", TRITON_DEVICE, c)
