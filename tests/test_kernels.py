"""The Triton launchers called directly: lane groups, tilings, class splits, chunks, modes and operand checks.

On a machine without a GPU these run through Triton's interpreter (TRITON_INTERPRET=1, set in conftest).
"""

import pytest
import torch
import torch.nn.functional as F
import triton

from conftest import TRITON_DEVICE, make_inputs, rel_err, rows_from_similarities
from softtriple_triton._common import LossParams
from softtriple_triton.kernels.backward_w import softtriple_backward_w
from softtriple_triton.kernels.backward_x import softtriple_backward_x
from softtriple_triton.kernels.config import check_operands, classes_per_tile, lane_efficiency, lane_groups, tile_config
from softtriple_triton.kernels.forward import softtriple_forward, softtriple_logits_forward
from softtriple_triton.kernels.grad_chunk import grad_chunk_tiles, softtriple_grad_chunk
from softtriple_triton.kernels.prepare import prepare_centers
from softtriple_triton.kernels.target import H100, INTERPRETER

HP = dict(la=32.0, gamma=0.05, margin=0.05)


def one(x):
    return torch.ones(1, dtype=x.dtype, device=x.device)


def autograd_oracle(x, wt, y, K, g, la, gamma, margin):
    """Per-row loss, dL/dx and dL/dwn [d, M] for s = x @ wt^T (the kernels' contract)."""
    xr = x.detach().double().requires_grad_(True)
    wr = wt.detach().double().requires_grad_(True)
    s = xr @ wr.t()
    s.retain_grad()
    rows, z = rows_from_similarities(s, y, K, la, gamma, margin)
    (rows * g).sum().backward()
    return rows.detach(), xr.grad, wr.grad.t(), s.grad, z.detach()


def unit_rows(wt):
    return wt / wt.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("lanes", [16, 64])
@pytest.mark.parametrize("K", [1, 3, 8, 10])
def test_tilings_and_splits_are_exact(splits, lanes, K):
    N, d, C = 77, 37, 23
    x, w, y = make_inputs(N, d, C, K, device=TRITON_DEVICE, seed=splits * 10 + K)
    wt = unit_rows(w.t().contiguous())
    g = torch.rand(N, dtype=torch.float64, device=TRITON_DEVICE)
    p = LossParams(K, **HP)
    rows_ref, dx_ref, dw_ref, _, _ = autograd_oracle(x, wt, y, K, g, **HP)
    rows, lse = softtriple_forward(x, wt, y, p, splits=splits, lanes=lanes)
    dx = softtriple_backward_x(x, wt, y, g, lse, None, p, one(x), splits=splits, lanes=lanes)
    dw = softtriple_backward_w(x, wt, y, g, lse, None, p, one(x), splits=splits, lanes=lanes)
    assert rel_err(rows, rows_ref) < 1e-12
    assert rel_err(dx, dx_ref) < 1e-12
    assert rel_err(dw, dw_ref) < 1e-12


@pytest.mark.parametrize("tiles_per_chunk", [1, 2, 100])
@pytest.mark.parametrize("K", [1, 3, 10])
def test_grad_chunks_give_ds(tiles_per_chunk, K):
    """The dL/ds chunk kernel over chunks of whole tiles: ds (times inv_scale), nothing outside the chunk."""
    N, d, C = 45, 20, 29
    x, w, y = make_inputs(N, d, C, K, device=TRITON_DEVICE, seed=K)
    wt = unit_rows(w.t().contiguous())
    g = torch.rand(N, dtype=torch.float64, device=TRITON_DEVICE)
    p = LossParams(K, **HP)
    _, lse = softtriple_forward(x, wt, y, p)
    ds_ref = autograd_oracle(x, wt, y, K, g, **HP)[3]
    cfg = grad_chunk_tiles(x, wt, K, lanes=16)
    n_tiles = triton.cdiv(C, cfg.block_c)
    inv_scale = torch.tensor([0.25], dtype=torch.float64, device=x.device)
    ds = torch.full((N, C * K), float("nan"), dtype=torch.float64, device=x.device)
    for t0 in range(0, n_tiles, tiles_per_chunk):
        t1 = min(n_tiles, t0 + tiles_per_chunk)
        c0, c1 = t0 * cfg.block_c * K, min(C * K, t1 * cfg.block_c * K)
        softtriple_grad_chunk(x, wt, y, g, lse, None, p, t0, t1, inv_scale, ds[:, c0:c1], cfg)
    assert rel_err(ds, ds_ref * 0.25) < 1e-12


@pytest.mark.parametrize("K", [1, 3, 10])
def test_cached_forward_and_its_dL_ds(K):
    """CACHE: the forward's factor a and logits z give dL/ds = dL/dS * a exactly (kernels/grad_cached.py), and the
    loss is the same as without the cache."""
    from softtriple_triton.kernels.grad_cached import softtriple_grad_cached

    N, d, C = 45, 20, 29
    x, w, y = make_inputs(N, d, C, K, device=TRITON_DEVICE, seed=K + 40)
    wt = unit_rows(w.t().contiguous())
    g = torch.rand(N, dtype=torch.float64, device=TRITON_DEVICE)
    p = LossParams(K, **HP)
    fac = torch.full((N, C * K), float("nan"), dtype=torch.float64, device=x.device)
    z = torch.full((N, C), float("nan"), dtype=torch.float64, device=x.device)
    rows, lse = softtriple_forward(x, wt, y, p, splits=3, cache=(fac, z, one(x)))
    assert torch.equal(rows, softtriple_forward(x, wt, y, p, splits=3)[0])
    _, _, _, ds_ref, zr = autograd_oracle(x, wt, y, K, g, **HP)
    assert rel_err(z, zr) < 1e-13
    ds = softtriple_grad_cached(fac, z, y, g, lse, p, torch.tensor([0.5], dtype=torch.float64, device=x.device),
                                torch.float64)
    assert rel_err(ds, ds_ref * 0.5) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_center_grad_is_the_normalisation_backward(dtype):
    from softtriple_triton.kernels.center_grad import center_grad

    fc = torch.randn(37, 90, dtype=torch.float64, device=TRITON_DEVICE)[:, 5:80]   # strided columns
    V = torch.randn(37, 75, dtype=torch.float64, device=TRITON_DEVICE)
    f = fc.to(dtype).double().requires_grad_(True)
    (F.normalize(f, dim=0) * V * 4.0).sum().backward()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rw = (1.0 / fc.to(dtype).double().norm(dim=0)).to(acc)
    got = center_grad(fc.to(dtype), V.to(acc), rw, torch.tensor([4.0], dtype=acc, device=fc.device))
    assert got.dtype == dtype
    assert rel_err(got, f.grad) < {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]


@pytest.mark.parametrize("K", [1, 5])
def test_logits_mode_forward_and_backward(K):
    N, d, C = 50, 30, 19
    x, w, _ = make_inputs(N, d, C, K, device=TRITON_DEVICE, seed=K)
    wt = unit_rows(w.t().contiguous())
    p = LossParams(K, 1.0, 0.1, 0.0)
    xr = x.clone().requires_grad_(True)
    wr = wt.clone().requires_grad_(True)
    s = xr @ wr.t()
    s.retain_grad()
    s3 = s.view(N, C, K)
    S_ref = (torch.softmax(s3 / 0.1, 2) * s3).sum(2)
    dS = torch.randn(N, C, dtype=torch.float64, device=TRITON_DEVICE)
    (S_ref * dS).sum().backward()
    for splits in (1, 3):
        assert rel_err(softtriple_logits_forward(x, wt, p, splits=splits), S_ref) < 1e-13
    dx = softtriple_backward_x(x, wt, None, None, None, dS, p, one(x), splits=2)
    dw = softtriple_backward_w(x, wt, None, None, None, dS, p, one(x), splits=2)
    assert rel_err(dx, xr.grad) < 1e-12
    assert rel_err(dw, wr.grad.t()) < 1e-12


def test_strided_inputs_are_read_through_their_strides():
    """Non-contiguous x (a transposed view) and wt (a row-strided view) give the contiguous answer."""
    N, d, C, K = 40, 24, 10, 2
    x, w, y = make_inputs(N, d, C, K, device=TRITON_DEVICE, seed=1)
    wt = unit_rows(w.t().contiguous())
    x_t = x.t().contiguous().t()                                             # column-major x
    big = torch.randn(C * K, d + 5, dtype=torch.float64, device=TRITON_DEVICE)
    big[:, 2:2 + d] = wt
    wt_view = big[:, 2:2 + d]                                                # row stride != d
    p = LossParams(K, **HP)
    ref = softtriple_forward(x, wt, y, p)[0]
    assert not x_t.is_contiguous() and not wt_view.is_contiguous()
    assert torch.equal(softtriple_forward(x_t, wt_view, y, p)[0], ref)


@pytest.mark.parametrize("K", [3, 7])
def test_padded_lanes_never_leak_into_results(K):
    """K=7 has a masked lane in group B and C=5 fills no whole tile: results must not depend on memory beyond the
    centers' rows."""
    N, d, C = 20, 16, 5
    x, w, y = make_inputs(N, d, C, K, device=TRITON_DEVICE, seed=2)
    wt = unit_rows(w.t().contiguous())
    store = torch.full((C * K + 64, d), float("nan"), dtype=torch.float64, device=TRITON_DEVICE)
    store[:C * K] = wt
    p = LossParams(K, **HP)
    a = softtriple_forward(x, store[:C * K], y, p)[0]
    assert torch.isfinite(a).all()
    assert torch.equal(a, softtriple_forward(x, wt, y, p)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_prepared_centers_are_the_rounded_normalised_columns(dtype):
    fc = torch.randn(33, 70, dtype=torch.float64, device=TRITON_DEVICE)[:, 3:60]  # strided columns
    fc[:, 5] = 0.0                                                                  # F.normalize: 1 / max(norm, 1e-12)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    f = fc.to(dtype)
    wt, rw = prepare_centers(f, dtype, acc)
    want_rw = (1.0 / f.double().norm(dim=0).clamp_min(1e-12)).to(acc)
    assert wt.is_contiguous() and wt.dtype == dtype and rw.dtype == acc
    assert rel_err(rw, want_rw) < (1e-15 if acc == torch.float64 else 1e-7)
    assert torch.equal(wt, (f.to(acc) * rw).t().to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_prepared_centers_of_huge_columns(dtype):
    """No overflow of the squares: fp32 sums them in fp64, fp64 scales each column by its largest entry."""
    big = 1e30 if dtype == torch.float32 else 1e200
    fc = torch.randn(16, 8, dtype=torch.float64, device=TRITON_DEVICE) * big
    wt, rw = prepare_centers(fc.to(dtype), dtype, dtype)
    want = (fc / fc.norm(dim=0)).t() if dtype == torch.float32 else (fc / (fc / big).norm(dim=0) / big).t()
    assert torch.isfinite(wt).all() and rel_err(wt, want) < (1e-6 if dtype == torch.float32 else 1e-14)


def test_operand_checks_name_the_problem():
    x, w, _ = make_inputs(4, 8, 3, 2, device=TRITON_DEVICE)
    wt = w.t().contiguous()
    with pytest.raises(ValueError, match="width 8 but wt has width 9"):
        check_operands(x, torch.randn(6, 9, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="divide"):
        check_operands(x, wt, 4)
    with pytest.raises(TypeError, match="share the product dtype"):
        check_operands(x, wt.float(), 2)
    with pytest.raises(TypeError, match="x must be"):
        check_operands(x.to(torch.int32), wt, 2)


def test_lane_groups_cover_every_center_once():
    for K in range(1, 70):
        ka, kb = lane_groups(K)
        assert ka & (ka - 1) == 0 and ka <= K and (kb == 0 or kb & (kb - 1) == 0)
        assert K <= ka + kb and (kb == 0) == (ka == K)
        assert K - ka <= kb < 2 * max(K - ka, 1)      # group B is K - KA rounded up to a power of two
    assert lane_groups(10) == (8, 2) and lane_efficiency(10) == 1.0
    assert lane_efficiency(7) == 7 / 8


def test_tile_config_obeys_dot_minimums():
    for target in (INTERPRETER, H100):
        for dt in (torch.float64, torch.float32, torch.bfloat16):
            for K in (1, 2, 3, 10, 17, 100, 1000):
                for C in (1, 2, 7, 1000):
                    cfg = tile_config("forward", 5, 3, C, K, dt, target)
                    assert cfg.block_n >= 16 and cfg.block_d >= 16
                    assert cfg.block_c * cfg.ka >= 16 and (cfg.kb == 0 or cfg.block_c * cfg.kb >= 16)
                    assert cfg.block_c & (cfg.block_c - 1) == 0
    assert classes_per_tile(10, 1000, 128) == 16   # 8 + 2 lanes per class: 160 lanes


def test_opt_in_autotune_times_every_candidate_and_keeps_the_numbers(monkeypatch):
    """Autotuning is off by default; when on, every candidate tile runs (timed) and the pick gives the same result."""
    from softtriple_triton.kernels import config

    N, d, C, K = 45, 20, 11, 3
    x, w, y = make_inputs(N, d, C, K, device=TRITON_DEVICE, seed=12)
    wt = unit_rows(w.t().contiguous())
    p = LossParams(K, **HP)
    want = softtriple_forward(x, wt, y, p)[0]
    assert not config._autotune["enabled"]

    timed = []

    def fake_bench(fn):  # the interpreter has no meaningful timer: pretend each later candidate is faster
        fn()
        timed.append(1)
        return -float(len(timed))

    monkeypatch.setattr(config, "_bench", fake_bench)
    monkeypatch.setattr(config, "_tuned", {})
    monkeypatch.setattr(config, "_autotune_applies", lambda target: True)
    got = softtriple_forward(x, wt, y, p)[0]
    n_timed = len(timed)
    assert n_timed >= 4 and len(config._tuned) == 1
    assert rel_err(got, want) < 1e-13
    softtriple_forward(x, wt, y, p)  # second call: cached, no more timing
    assert len(timed) == n_timed and len(config._tuned) == 1


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
    """C*K*d > 2**31: wt offsets (row * row stride) and the gradient buffers need int64."""
    from softtriple_triton import fused

    torch.manual_seed(0)
    N, d, K = 64, 64, 2
    C = (2 ** 31) // (d * K) + 1000                # C*K*d = 2**31 + 128000
    x = F.normalize(torch.randn(N, d, device="cuda"), dim=1)
    w = torch.randn(d, C * K, device="cuda", dtype=torch.float16)
    y = torch.randint(C - 500, C, (N,), device="cuda")  # labels among the last classes: past the 2**31 mark
    g = torch.rand(N, device="cuda")
    p = LossParams(K, **HP)
    rows, lse, xp, wt, rw, fac, z = fused.loss_forward(x, w, y, p, torch.float16, True)
    _, dfc = fused.backward(xp, w, wt, rw, y, g, lse, None, p, fac, z)
    x = xp
    # oracle on the columns of the labelled classes only, with the full-row lse (exact up to rounding)
    tail = slice((C - 500) * K, C * K)
    wn = wt[tail].float().t()
    s = x.float() @ wn
    s3 = s.view(N, 500, K)
    pr = torch.softmax(s3 / HP["gamma"], dim=2)
    S = (pr * s3).sum(2)
    oh = F.one_hot(y - (C - 500), 500).float()
    z = HP["la"] * (S - HP["margin"] * oh)
    zt = z.gather(1, (y - (C - 500))[:, None])[:, 0]
    assert torch.allclose(rows, lse - zt, rtol=1e-4, atol=1e-3)
    gS = (g * HP["la"])[:, None] * (torch.exp(z - lse[:, None]) - oh)
    ds = (gS[:, :, None] * pr * (1 + (s3 - S[:, :, None]) / HP["gamma"])).reshape(N, -1)
    V = x.float().t() @ ds
    want = rw[tail] * (V - wn * (ds * s).sum(0))
    assert torch.allclose(dfc[:, tail].float(), want, rtol=2e-2, atol=1e-4)
