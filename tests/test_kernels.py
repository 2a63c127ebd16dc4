"""The Triton launchers called directly: tilings, class splits, modes and operand checks.

On a machine without a GPU these run through Triton's interpreter (TRITON_INTERPRET=1, set in conftest).
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import TRITON_DEVICE, make_inputs, rel_err
from softtriple_triton.kernels.backward_w import softtriple_backward_w
from softtriple_triton.kernels.backward_x import softtriple_backward_x
from softtriple_triton.kernels.config import check_operands, tile_config
from softtriple_triton.kernels.forward import softtriple_forward, softtriple_logits_forward

HP = dict(la=32.0, gamma=0.05, margin=0.05)


def autograd_oracle(x, w, y, K, g, la, gamma, margin):
    """Per-row loss and (dx, dw, drw) with s = (x @ w) * rw, rw an independent input (the kernels' contract)."""
    xr = x.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    rw = (1.0 / w.double().norm(dim=0)).requires_grad_(True)
    s = (xr @ wr) * rw
    N, C = x.shape[0], w.shape[1] // K
    s3 = s.view(N, C, K)
    S = (torch.softmax(s3 / gamma, dim=2) * s3).sum(2)
    z = la * (S - margin * F.one_hot(y, C).double())
    rows = torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0]
    (rows * g).sum().backward()
    return rows.detach(), xr.grad, wr.grad, rw.grad, rw.detach()


@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("K", [1, 3, 8])
def test_tilings_and_splits_are_exact(splits, block_m, K):
    N, d, C = 77, 37, 23
    x, w, y = make_inputs(N, d, C, K, device=TRITON_DEVICE, seed=splits * 10 + K)
    g = torch.rand(N, dtype=torch.float64, device=TRITON_DEVICE)
    rows_ref, dx_ref, dw_ref, drw_ref, rw = autograd_oracle(x, w, y, K, g, **HP)
    rows, lse = softtriple_forward(x, w, rw, y, K, splits=splits, block_m=block_m, **HP)
    dx = softtriple_backward_x(x, w, rw, y, g, lse, None, K, splits=splits, block_m=block_m, **HP)
    dw, drw = softtriple_backward_w(x, w, rw, y, g, lse, None, K, splits=splits, block_m=block_m, **HP)
    assert rel_err(rows, rows_ref) < 1e-12
    assert rel_err(dx, dx_ref) < 1e-12
    assert rel_err(dw, dw_ref) < 1e-12
    assert rel_err(drw, drw_ref) < 1e-12


@pytest.mark.parametrize("K", [1, 5])
def test_logits_mode_forward_and_backward(K):
    N, d, C = 50, 30, 19
    x, w, _ = make_inputs(N, d, C, K, device=TRITON_DEVICE, seed=K)
    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    rw = (1.0 / w.norm(dim=0)).requires_grad_(True)
    s3 = ((xr @ wr) * rw).view(N, C, K)
    S_ref = (torch.softmax(s3 / 0.1, 2) * s3).sum(2)
    dS = torch.randn(N, C, dtype=torch.float64, device=TRITON_DEVICE)
    (S_ref * dS).sum().backward()
    S = softtriple_logits_forward(x, w, rw.detach(), K, 0.1)
    assert rel_err(S, S_ref) < 1e-13
    dx = softtriple_backward_x(x, w, rw.detach(), None, None, None, dS, K, 1.0, 0.1, 0.0, splits=2)
    dw, drw = softtriple_backward_w(x, w, rw.detach(), None, None, None, dS, K, 1.0, 0.1, 0.0, splits=2)
    assert rel_err(dx, xr.grad) < 1e-12
    assert rel_err(dw, wr.grad) < 1e-12
    assert rel_err(drw, rw.grad) < 1e-12


def test_strided_inputs_are_read_through_their_strides():
    """Non-contiguous x (a transposed view) and w (a column slice) give the contiguous answer."""
    N, d, C, K = 40, 24, 10, 2
    x, w, y = make_inputs(N, d, C, K, device=TRITON_DEVICE, seed=1)
    x_t = x.t().contiguous().t()                                             # column-major x
    w_big = torch.randn(d, C * K + 7, dtype=torch.float64, device=TRITON_DEVICE)
    w_big[:, 3:3 + C * K] = w
    w_view = w_big[:, 3:3 + C * K]                                           # row stride != C*K
    rw = 1.0 / w.norm(dim=0)
    ref = softtriple_forward(x, w, rw, y, K, **HP)[0]
    assert not x_t.is_contiguous() and not w_view.is_contiguous()
    assert torch.equal(softtriple_forward(x_t, w_view, rw, y, K, **HP)[0], ref)


def test_padded_lanes_never_leak_into_results():
    """K=3 pads to 4 lanes and C=5 to a whole tile: results must not depend on memory beyond the columns."""
    N, d, C, K = 20, 16, 5, 3
    x, w, y = make_inputs(N, d, C, K, device=TRITON_DEVICE, seed=2)
    store = torch.full((d, C * K + 64), float("nan"), dtype=torch.float64, device=TRITON_DEVICE)
    store[:, :C * K] = w
    w_nan_after = store[:, :C * K]   # NaNs right after the last real column in memory
    rw = 1.0 / w.norm(dim=0)
    a = softtriple_forward(x, w_nan_after, rw, y, K, **HP)[0]
    assert torch.isfinite(a).all()
    assert torch.equal(a, softtriple_forward(x, w, rw, y, K, **HP)[0])


def test_operand_checks_name_the_problem():
    x, w, _ = make_inputs(4, 8, 3, 2, device=TRITON_DEVICE)
    rw = 1.0 / w.norm(dim=0)
    with pytest.raises(ValueError, match="width 8 but w has height 9"):
        check_operands(x, torch.randn(9, 6, dtype=torch.float64), rw, 2)
    with pytest.raises(ValueError, match="divide"):
        check_operands(x, w, rw, 4)
    with pytest.raises(TypeError, match="rw must be"):
        check_operands(x, w, rw.float(), 2)
    with pytest.raises(TypeError, match="x must be"):
        check_operands(x.to(torch.int32), w, rw, 2)


def test_tile_config_obeys_dot_minimums():
    for K in (1, 2, 3, 10, 17, 100, 1000):
        for C in (1, 2, 7, 1000):
            cfg = tile_config(5, 3, C, K, torch.device("cpu"))
            assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_d >= 16
            assert cfg.kp >= K and cfg.kp & (cfg.kp - 1) == 0


def test_opt_in_autotune_times_every_candidate_and_keeps_the_numbers(monkeypatch):
    """Autotuning is off by default; when on, every candidate tile runs (timed) and the pick gives the same result."""
    from softtriple_triton.kernels import config

    N, d, C, K = 45, 20, 11, 3
    x, w, y = make_inputs(N, d, C, K, device=TRITON_DEVICE, seed=12)
    rw = 1.0 / w.norm(dim=0)
    want = softtriple_forward(x, w, rw, y, K, **HP)[0]
    assert not config._autotune["enabled"]

    timed = []

    def fake_bench(fn):  # the interpreter has no meaningful timer: pretend each later candidate is faster
        fn()
        timed.append(1)
        return -float(len(timed))

    monkeypatch.setattr(config, "_bench", fake_bench)
    monkeypatch.setattr(config, "_tuned", {})
    monkeypatch.setattr(config, "_autotune_applies", lambda device: True)
    got = softtriple_forward(x, w, rw, y, K, **HP)[0]
    assert len(timed) >= 4 and len(config._tuned) == 1
    chosen = next(iter(config._tuned.values()))
    assert chosen != config.tile_config(N, d, C, K, x.device)
    assert rel_err(got, want) < 1e-13
    softtriple_forward(x, w, rw, y, K, **HP)  # second call: cached, no more timing
    assert len(timed) == len([t for t in timed])  and len(config._tuned) == 1


def test_set_autotune_round_trip():
    from softtriple_triton.kernels import config

    old = config.set_autotune(True)
    try:
        assert config._autotune["enabled"]
    finally:
        config.set_autotune(old)
    assert config._autotune["enabled"] == old


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with > 24 GB")
def test_offsets_past_two_to_the_31_on_cuda():
    """C*K*d > 2**31: w offsets (d index * row stride + column) and the dw partial buffer need int64."""
    torch.manual_seed(0)
    N, d, K = 64, 64, 2
    C = (2 ** 31) // (d * K) + 1000                # C*K*d = 2**31 + 128000
    x = torch.nn.functional.normalize(torch.randn(N, d, device="cuda"), dim=1).half()
    w = torch.randn(d, C * K, device="cuda", dtype=torch.float16)
    y = torch.randint(C - 500, C, (N,), device="cuda")  # labels among the last classes: past the 2**31 mark
    rw = (1.0 / w.float().norm(dim=0))
    g = torch.rand(N, device="cuda")
    rows, lse = softtriple_forward(x, w, rw, y, K, **HP)
    dw, drw = softtriple_backward_w(x, w, rw, y, g, lse, None, K, **HP)
    # oracle on the columns of the labelled classes only, with the full-row lse (exact up to fp32 rounding)
    tail = slice((C - 500) * K, C * K)
    s = (x.float() @ w[:, tail].float()) * rw[tail]
    s3 = s.view(N, 500, K)
    p = torch.softmax(s3 / HP["gamma"], dim=2)
    S = (p * s3).sum(2)
    z = HP["la"] * (S - HP["margin"] * F.one_hot(y - (C - 500), 500).float())
    zt = z.gather(1, (y - (C - 500))[:, None])[:, 0]
    assert torch.allclose(rows, lse - zt, rtol=1e-4, atol=1e-3)
    gS = (g * HP["la"])[:, None] * (torch.exp(z - lse[:, None]) - F.one_hot(y - (C - 500), 500).float())
    ds = (gS[:, :, None] * p * (1 + (s3 - S[:, :, None]) / HP["gamma"])).reshape(N, -1) * rw[tail]
    want_dw = x.float().t() @ ds
    assert torch.allclose(dw[:, tail], want_dw, rtol=2e-2, atol=1e-4)
