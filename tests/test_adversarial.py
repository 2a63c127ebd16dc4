"""Adversarial suite (issue 11): uses a new user might try, on every backend and public function.

Each use is either judged against the fp64 oracle (the reference backend in fp64 on exactly the same rounded input
values: loss and the gradient of every input leaf) -- tests named test_exact_* -- or must raise a clear
ValueError / TypeError / NotImplementedError / RuntimeError whose message names the argument and what was expected
-- tests named test_error_*. Uses that can break the interpreter (environment variables, threads) run in a
subprocess. Shapes are tiny: the triton backend runs through Triton's interpreter on CPU.
"""

import copy
import os
import pickle
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import softtriple_triton as st
from conftest import HAS_CUDA, TOL, TRITON_DEVICE

BACKENDS = [("reference", "cpu"), ("torch", "cpu"), ("triton", TRITON_DEVICE)]
IDS = [b for b, _ in BACKENDS]


def _backends():
    """BACKENDS as pytest parameters, each named by its backend."""
    return [pytest.param(b, d, id=b) for b, d in BACKENDS]


def _data(N=7, d=8, C=4, K=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(d, C * K, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    return x, w, y


def _err(got, want, floor=1e-300):
    """max |got - want| / max |want| (the denominator at least ``floor``), in fp64."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(floor)).item()


def _tol(*tensors):
    """conftest's tolerance of the least precise input dtype; 2x for fp16/bf16 (at d = 8 one rounding of the
    normalised rows to the input dtype, scaled by la = 20, reaches the table's rtol)."""
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    dt = min(floats, key=order.index)
    rtol, gtol = TOL[dt]
    return (2 * rtol, 2 * gtol) if dt in (torch.float16, torch.bfloat16) else (rtol, gtol)


def _run(backend, leaves, make, K, fn="loss", g=None, **kw):
    """Loss (or logits) of make(leaves) and the gradient of every floating leaf."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in leaves.items()}
    args = make(leaves)
    if fn == "loss":
        out = st.softtriple_loss(*args, K, backend=backend, **kw)
    else:
        out = st.softtriple_logits(*args[:2], K, backend=backend, **kw)
    (out if g is None else out * g.to(out)).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items() if v.grad is not None}


def _exact(backend, device, leaves, make, K=2, fn="loss", g=None, tol=None, floor=1e-300, **kw):
    """The backend on ``device`` against the fp64 oracle on the same rounded leaves (``floor``: for gradients that
    are 0 analytically, the smallest max |want| the error is relative to)."""
    on_dev = {k: v.to(device) for k, v in leaves.items()}
    got, got_g = _run(backend, on_dev, make, K, fn, g, **kw)
    as64 = {k: (v.double() if v.is_floating_point() else v) for k, v in leaves.items()}
    want, want_g = _run("reference", as64, make, K, fn, g, **kw)
    rtol, gtol = tol or _tol(*leaves.values())
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert _err(got, want) <= rtol, ("value", _err(got, want))
    assert set(got_g) == set(want_g)
    for k in want_g:
        assert got_g[k].dtype == leaves[k].dtype, k
        assert _err(got_g[k], want_g[k], floor) <= gtol, (k, _err(got_g[k], want_g[k], floor))


def _leaf(t, device="cpu", dtype=None):
    """A fresh leaf requiring grad (never the caller's tensor: .to() may return it unchanged)."""
    return t.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)


def _plain(x, w, y):
    return {"x": x, "w": w, "y": y}, lambda L: (L["x"], L["w"], L["y"])


# --------------------------------------------------------------------------- views, strides, aliasing

def _transposed_embeddings():
    x, w, y = _data()
    return {"xt": x.t().contiguous(), "w": w, "y": y}, lambda L: (L["xt"].t(), L["w"], L["y"])


def _strided_rows():
    x, w, y = _data(N=14)
    return {"x": x, "w": w, "y": y[::2]}, lambda L: (L["x"][::2], L["w"], L["y"])


def _column_slice_embeddings():
    x, w, y = _data(d=11)
    w = w[2:10]
    return {"x": x, "w": w, "y": y}, lambda L: (L["x"][:, 2:10], L["w"], L["y"])


def _expanded_rows():
    x, w, y = _data()
    return {"x0": x[:1], "w": w, "y": y}, lambda L: (L["x0"].expand(7, 8), L["w"], L["y"])


def _transposed_fc():
    x, w, y = _data()
    return {"x": x, "wt": w.t().contiguous(), "y": y}, lambda L: (L["x"], L["wt"].t(), L["y"])


def _fc_column_slice():
    x, w, y = _data(C=6)
    return {"x": x, "w": w, "y": y % 3}, lambda L: (L["x"], L["w"][:, :6], L["y"])


def _fc_row_step():
    x, w, y = _data(d=16)
    return {"x": x[:, ::2].contiguous(), "w": w, "y": y}, lambda L: (L["x"], L["w"][::2], L["y"])


def _strided_int32_labels():
    x, w, y = _data()
    y2 = torch.stack([y, y], 1).reshape(-1).to(torch.int32)
    return {"x": x, "w": w, "y2": y2}, lambda L: (L["x"], L["w"], L["y2"][::2])


def _uint8_labels():
    x, w, y = _data()
    return _plain(x, w, y.to(torch.uint8))


def _embeddings_are_a_view_of_fc():
    _, w, y = _data(C=4)
    return {"w": w, "y": y[:5]}, lambda L: (L["w"].t()[:5], L["w"], L["y"])


def _embeddings_shared_with_fc_storage():
    x, w, y = _data()
    both = torch.cat([x.reshape(-1), w.reshape(-1)])
    return {"both": both, "y": y}, lambda L: (L["both"][:56].view(7, 8), L["both"][56:].view(8, 8), L["y"])


VIEWS = {f.__name__[1:]: f for f in (
    _transposed_embeddings, _strided_rows, _column_slice_embeddings, _expanded_rows, _transposed_fc,
    _fc_column_slice, _fc_row_step, _strided_int32_labels, _uint8_labels, _embeddings_are_a_view_of_fc,
    _embeddings_shared_with_fc_storage)}


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("case", list(VIEWS))
def test_exact_views_and_strides(case, backend, device):
    _exact(backend, device, *VIEWS[case](), tau=0.2)


# --------------------------------------------------------------------------- dtypes, hyper-parameter types, shapes

DTYPES = {
    "fp16_x_fp32_fc": (torch.float16, torch.float32), "bf16_both": (torch.bfloat16, torch.bfloat16),
    "fp64_x_fp32_fc": (torch.float64, torch.float32), "fp16_both": (torch.float16, torch.float16),
    "fp32_x_bf16_fc": (torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("case", list(DTYPES))
def test_exact_dtypes(case, backend, device):
    x, w, y = _data()
    dx, dw = DTYPES[case]
    _exact(backend, device, *_plain(x.to(dx), w.to(dw), y), tau=0.2)


HYPER = {
    "numpy_scalars": dict(K=np.int64(2), la=np.float32(16.0), gamma=np.float64(0.2)),
    "int_hyper": dict(la=20, gamma=1, tau=0, margin=0),
    "no_normalisation": dict(normalize_embeddings=False),
    "reduction_sum": dict(reduction="sum"),
    "huge_margin": dict(margin=10.0),
    "one_class": dict(C=1, tau=0.5),
    "one_dim": dict(d=1, floor=1.0),  # unit rows and centers are +-1: both gradients are 0 analytically
    "one_row": dict(N=1),
    "K_larger_than_d": dict(K=9, d=3, C=2),
}


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("case", list(HYPER))
def test_exact_hyper_and_shapes(case, backend, device):
    kw = dict(HYPER[case])
    shape = {k: kw.pop(k) for k in ("N", "d", "C") if k in kw}
    K = kw.pop("K", 2)
    x, w, y = _data(K=int(K), dtype=torch.float64, **shape)  # fp64: the exactness claim (1e-9)
    if not kw.get("normalize_embeddings", True):
        x = x * 0.3
    _exact(backend, device, *_plain(x, w, y), K=K, **kw)


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_reduction_none_with_strided_grad_output(backend, device):
    x, w, y = _data()
    g = torch.rand(14, dtype=torch.float64)[::2]
    _exact(backend, device, *_plain(x, w, y), g=g.to(device), reduction="none")


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_logits_of_views(backend, device):
    _exact(backend, device, *_transposed_embeddings(), fn="logits", gamma=0.3)


# --------------------------------------------------------------------------- extreme but finite values

def _scaled(rows=(), cols=(), factor=1.0, dtype=torch.float32, **data):
    x, w, y = _data(**data)
    x, w = x.double(), w.double()
    for r in rows:
        x[r] *= factor
    for c in cols:
        w[:, c] *= factor
    return x.to(dtype), w.to(dtype), y


EXTREMES = {
    "fp32_rows_1e30": lambda: _scaled(rows=(0, 3), factor=1e30),
    "fp32_tiny_rows_1e-30": lambda: _scaled(rows=(1, 2), factor=1e-30),   # norm < 1e-12: F.normalize's clamp
    "fp16_rows_at_max": lambda: _scaled(rows=(2,), factor=6e4 / 3, dtype=torch.float16),
    "bf16_rows_1e37": lambda: _scaled(rows=(4,), factor=1e37, dtype=torch.bfloat16),
    "zero_row": lambda: _scaled(rows=(5,), factor=0.0),
    "zero_center": lambda: _scaled(cols=(1,), factor=0.0),
    "tiny_centers_1e-20": lambda: _scaled(cols=(2, 3), factor=1e-20),
    "identical_rows": lambda: (lambda x, w, y: (x[:1].repeat(7, 1), w, y))(*_data()),
}


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("case", list(EXTREMES))
def test_exact_extreme_values(case, backend, device):
    _exact(backend, device, *_plain(*EXTREMES[case]()), tau=0.2)


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_large_scale_at_the_shift_threshold(backend, device):
    x = torch.tensor([[1.0, 0.0]])  # opposite its class's center (-1, 0); the oracle's d embeddings: [0, 1e4]
    w = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    _exact(backend, device, *_plain(x, w, torch.tensor([0])), K=1, la=1e4, gamma=0.025)


def test_exact_huge_centers_regularizer():
    _, w, _ = _data(C=3, K=3)
    w[:, 4] *= 1e30
    got = _leaf(w)
    st.center_regularizer(got, 3).backward()
    want = _leaf(w, dtype=torch.float64)
    st.reference_regularizer(want, 3).backward()
    assert _err(st.center_regularizer(w, 3), st.reference_regularizer(w.double(), 3)) <= 1e-6
    col = want.grad.abs().amax(dim=0, keepdim=True)  # per column: the huge column's gradient is ~1e-30
    assert ((got.grad.double() - want.grad) / col).abs().max() <= 1e-5


# --------------------------------------------------------------------------- autograd modes

def _oracle(x, w, y, K=2, **kw):
    return st.softtriple_loss(x.double().cpu(), w.double().cpu(), y.cpu(), K, backend="reference", **kw)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_exact_without_grad(mode, backend, device):
    x, w, y = (t.to(device) for t in _data())
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        loss = st.softtriple_loss(x, w.requires_grad_(True), y, 2, backend=backend)
        S = st.softtriple_logits(x, w, 2, backend=backend)
    assert loss.grad_fn is None and _err(loss, _oracle(x, w, y)) <= 1e-6
    assert _err(S, st.softtriple_logits(x.double().cpu(), w.detach().double().cpu(), 2, backend="reference")) <= 1e-6


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_training_after_an_inference_mode_call(backend, device):
    x, w, y = _data()
    with torch.inference_mode():
        st.softtriple_loss(x.to(device), w.to(device), y.to(device), 2, backend=backend)
        st.softtriple_logits(x.to(device), w.to(device), 2, backend=backend)
    _exact(backend, device, *_plain(x, w, y))


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_under_anomaly_detection(backend, device):
    with torch.autograd.detect_anomaly(check_nan=True):
        _exact(backend, device, *_plain(*_data()), tau=0.3)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_exact_under_checkpoint(reentrant, backend, device):
    x, w, y = _data()
    lin = torch.nn.Linear(8, 8).double()

    def grads(be, dev, dt):
        net = copy.deepcopy(lin).to(device=dev, dtype=dt)
        a, b = _leaf(x, dev, dt), _leaf(w, dev, dt)
        f = lambda p, q: st.softtriple_loss(net(p), q, y.to(dev), 2, backend=be)  # noqa: E731
        loss = torch.utils.checkpoint.checkpoint(f, a, b, use_reentrant=reentrant)
        loss.backward()
        return loss, a.grad, b.grad, net.weight.grad

    for got, want in zip(grads(backend, device, torch.float32), grads("reference", "cpu", torch.float64)):
        assert _err(got, want) <= 1e-5


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_retain_graph_twice(backend, device):
    x, w, y = _data()
    a, b = _leaf(x, device), _leaf(w, device)
    loss = st.softtriple_loss(a, b, y.to(device), 2, backend=backend)
    loss.backward(retain_graph=True)
    once = a.grad.clone(), b.grad.clone()
    loss.backward()
    a64, b64 = _leaf(x, dtype=torch.float64), _leaf(w, dtype=torch.float64)
    _oracle(a64, b64, y).backward()
    for g1, g2, ref in zip(once, (a.grad, b.grad), (a64.grad, b64.grad)):
        assert _err(g1, ref) <= 1e-5 and _err(g2, 2 * ref) <= 1e-5


def _grad_of_one_input(backend, device, wrt, create_graph, tol):
    """torch.autograd.grad of the loss w.r.t. one input only (the other does not require grad)."""
    x, w, y = _data(dtype=torch.float64)
    args = {"x": x.to(device), "w": w.to(device)}
    args[wrt] = _leaf(args[wrt])
    (got,) = torch.autograd.grad(st.softtriple_loss(args["x"], args["w"], y.to(device), 2, backend=backend),
                                 args[wrt], create_graph=create_graph)
    ref = {"x": x, "w": w}
    ref[wrt] = _leaf(ref[wrt])
    (want,) = torch.autograd.grad(_oracle(ref["x"], ref["w"], y), ref[wrt])
    assert _err(got, want) <= tol


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_autograd_grad_of_one_input(backend, device):
    _grad_of_one_input(backend, device, "w", False, 1e-12)


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_first_order_gradient_with_create_graph(backend, device):
    _grad_of_one_input(backend, device, "x", True, 1e-12)


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_or_error_double_backward(backend, device):
    x, w, y = _data(dtype=torch.float64)
    t = torch.randn_like(x)

    def hvp(be, dev):
        a = _leaf(x, dev)
        (gx,) = torch.autograd.grad(st.softtriple_loss(a, w.to(dev), y.to(dev), 2, backend=be), a, create_graph=True)
        return torch.autograd.grad((gx * t.to(dev)).sum(), a)[0]

    if backend == "triton":
        with pytest.raises(NotImplementedError, match="first derivatives only.*backend='reference'"):
            hvp(backend, device)
    else:
        assert _err(hvp(backend, device), hvp("reference", "cpu")) <= 1e-10


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_func_grad(backend, device):
    x, w, y = _data(dtype=torch.float64)
    f = lambda be, dev: (lambda a, b: st.softtriple_loss(a, b, y.to(dev), 2, tau=0.2, backend=be))  # noqa: E731
    got = torch.func.grad(f(backend, device), argnums=(0, 1))(x.to(device), w.to(device))
    want = torch.func.grad(f("reference", "cpu"), argnums=(0, 1))(x, w)
    assert max(_err(a, b) for a, b in zip(got, want)) <= 1e-12


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_func_vmap_per_sample_gradients(backend, device):
    x, w, _ = _data(dtype=torch.float64)
    xb, yb = torch.randn(3, 4, 8, dtype=torch.float64), torch.randint(0, 4, (3, 4))
    f = lambda be, wd: (lambda a, lab: st.softtriple_loss(a, wd, lab, 2, backend=be))  # noqa: E731
    got = torch.func.vmap(torch.func.grad(f(backend, w.to(device))))(xb.to(device), yb.to(device))
    want = torch.func.vmap(torch.func.grad(f("reference", w)))(xb, yb)
    assert _err(got, want) <= 1e-12


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_func_jacrev_of_logits(backend, device):
    x, w, _ = _data(N=3, dtype=torch.float64)
    f = lambda be, wd: (lambda a: st.softtriple_logits(a, wd, 2, backend=be))  # noqa: E731
    got = torch.func.jacrev(f(backend, w.to(device)))(x.to(device))
    assert _err(got, torch.func.jacrev(f("reference", w))(x)) <= 1e-12


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_func_jvp_wrt_embeddings(backend, device):
    x, w, y = _data(dtype=torch.float64)
    t = torch.randn_like(x)
    f = lambda be, dev: (lambda a: st.softtriple_loss(a, w.to(dev), y.to(dev), 2, reduction="none",  # noqa: E731
                                                      backend=be))
    _, got = torch.func.jvp(f(backend, device), (x.to(device),), (t.to(device),))
    _, want = torch.func.jvp(f("reference", "cpu"), (x,), (t,))
    assert _err(got, want) <= 1e-12


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_or_error_forward_ad_wrt_centers(backend, device):
    x, w, y = _data(dtype=torch.float64)
    t = torch.randn_like(w)

    def tangent(be, dev):
        with fwAD.dual_level():
            loss = st.softtriple_loss(x.to(dev), fwAD.make_dual(w.to(dev), t.to(dev)), y.to(dev), 2, backend=be)
            return fwAD.unpack_dual(loss).tangent

    if backend == "triton":
        with pytest.raises(NotImplementedError, match="fc has a tangent.*backend='reference'"):
            tangent(backend, device)
    else:
        assert _err(tangent(backend, device), tangent("reference", "cpu")) <= 1e-12


def test_error_triton_logits_forward_mode():
    x, w, _ = (t.to(TRITON_DEVICE) for t in _data(dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="softtriple_logits\\(backend='triton'\\) has no forward-mode rule.*"
                                                  "backend='reference'"):
        torch.func.jvp(lambda a: st.softtriple_logits(a, w, 2, backend="triton"), (x,), (torch.ones_like(x),))


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_under_autocast(backend, device):
    """torch / reference: fp32 math inside. triton: products in the autocast dtype (bf16), judged against the fp64
    oracle on the same rounded operands (test_dtype_policy.rounded_oracle) plus the fp32 regulariser."""
    from test_dtype_policy import rounded_oracle

    x, w, y = _data()
    dev_type = torch.device(device).type
    with torch.autocast(dev_type, dtype=torch.bfloat16):
        loss = st.softtriple_loss(x.to(device), w.to(device), y.to(device), 2, backend=backend)
    want = _oracle(x, w, y)
    if backend == "triton":
        want = rounded_oracle(x, w, y, 2, torch.bfloat16, la=20.0, gamma=0.1, margin=0.01)[0] \
            + 0.2 * st.reference_regularizer(w.double(), 2)
    assert loss.dtype == torch.float32 and _err(loss, want) <= 1e-6


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_meta_then_real(backend, device):
    """Shape inference on meta tensors, then the same call on real ones."""
    x, w, y = _data()
    m = st.softtriple_loss(x.to("meta"), w.to("meta"), y.to("meta"), 2, reduction="none", backend=backend)
    assert m.device.type == "meta" and m.shape == (7,)
    _exact(backend, device, *_plain(x, w, y), reduction="none")


# --------------------------------------------------------------------------- the module and its conversions

def _module(backend, **kw):
    torch.manual_seed(0)
    return st.SoftTripleLoss(4, 8, 2, tau=0.2, backend=backend, **kw)


def _module_vs_oracle(m, x, y, device, tol):
    m = m.to(device)
    a = _leaf(x, device)
    loss = m(a, y.to(device))
    loss.backward()
    a64, w64 = _leaf(x, dtype=torch.float64), _leaf(m.fc, dtype=torch.float64)
    ref = _oracle(a64, w64, y, tau=0.2)
    ref.backward()
    assert _err(loss, ref) <= tol[0] and _err(a.grad, a64.grad) <= tol[1] and _err(m.fc.grad, w64.grad) <= tol[1]
    assert m.fc.grad.dtype == m.fc.dtype


CONVERSIONS = {
    "half": (lambda m: m.half(), torch.float16), "to_bf16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "double": (lambda m: m.double(), torch.float64), "deepcopy": (copy.deepcopy, torch.float32),
    "pickle": (lambda m: pickle.loads(pickle.dumps(m)), torch.float32),
    "frozen_centers": (lambda m: m.requires_grad_(False), torch.float32),
}


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("case", list(CONVERSIONS))
def test_exact_module_conversions(case, backend, device):
    convert, dt = CONVERSIONS[case]
    m = convert(_module(backend))
    x, _, y = _data(dtype=dt)
    if case == "frozen_centers":
        loss = m.to(device)(x.to(device), y.to(device))
        assert m.fc.grad is None and _err(loss, _oracle(x, m.fc.detach(), y, tau=0.2)) <= 1e-6
        return
    _module_vs_oracle(m, x, y, device, _tol(x))


@pytest.mark.parametrize("backend,device", _backends())
def test_exact_deepcopy_is_independent_and_get_logits_regularizer(backend, device):
    m = _module(backend).to(device)
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.fc.mul_(-1)
    x, _, _ = _data()
    S = m.get_logits(x.to(device))
    assert _err(S, st.reference_logits(x.double(), m.fc.detach().double().cpu(), 2, 0.1)) <= 1e-6
    assert _err(m.regularizer(), st.reference_regularizer(m.fc.detach().double().cpu(), 2)) <= 1e-6
    assert not torch.equal(m.fc, c.fc)


def test_exact_module_on_meta_then_materialised():
    m = st.SoftTripleLoss(4, 8, 2).to("meta")
    assert m(torch.empty(5, 8, device="meta"), torch.empty(5, dtype=torch.long, device="meta")).device.type == "meta"
    m = m.to_empty(device="cpu")
    torch.nn.init.normal_(m.fc)
    x, _, y = _data(N=5)
    assert _err(m(x, y), _oracle(x, m.fc.detach(), y, tau=0.2)) <= 1e-6


def test_error_state_dict_with_the_wrong_shape():
    m = st.SoftTripleLoss(4, 8, 2)
    shapes = "size mismatch for fc.*torch.Size\\(\\[8, 10\\]\\).*torch.Size\\(\\[8, 8\\]\\)"
    with pytest.raises(RuntimeError, match=shapes):
        m.load_state_dict({"fc": torch.randn(8, 10)})
    with pytest.raises(RuntimeError, match="Missing key\\(s\\) in state_dict: \"fc\""):
        m.load_state_dict({"centers": torch.randn(8, 8)})


# --------------------------------------------------------------------------- bad input: clear errors

x0, w0, y0 = _data()
with warnings.catch_warnings():  # "sparse CSR support is in beta"
    warnings.simplefilter("ignore")
    x0_csr = x0.to_sparse_csr()
BAD = {
    "la_bool": (dict(la=True), ValueError, "la must be a finite number > 0"),
    "la_tensor": (dict(la=torch.tensor(20.0)), ValueError, "la must be a finite number > 0"),
    "la_inf": (dict(la=float("inf")), ValueError, "la must be a finite number > 0"),
    "gamma_nan": (dict(gamma=float("nan")), ValueError, "gamma must be a finite number > 0"),
    "gamma_zero": (dict(gamma=0.0), ValueError, "gamma must be a finite number > 0"),
    "tau_negative": (dict(tau=-0.1), ValueError, "tau must be a finite number >= 0"),
    "margin_negative": (dict(margin=-0.01), ValueError, "margin must be a finite number >= 0"),
    "K_tensor": (dict(K=torch.tensor(2)), ValueError, "centers_per_class must be a positive integer"),
    "K_float": (dict(K=2.0), ValueError, "centers_per_class must be a positive integer, got 2.0"),
    "reduction_none_object": (dict(reduction=None), ValueError, "reduction must be one of"),
    "reduction_avg": (dict(reduction="avg"), ValueError, "reduction must be one of \\('mean', 'sum', 'none'\\)"),
    "backend_upper": (dict(backend="TRITON"), ValueError, "backend must be one of"),
    "normalize_int": (dict(normalize_embeddings=1), ValueError, "normalize_embeddings must be a bool"),
    "embeddings_list": (dict(x=x0.tolist()), TypeError, "embeddings must be a torch.Tensor, got list"),
    "embeddings_complex": (dict(x=x0.to(torch.complex64)), TypeError, "embeddings must be fp16, bf16, fp32 or fp64"),
    "embeddings_int": (dict(x=x0.long()), TypeError, "embeddings must be fp16, bf16, fp32 or fp64"),
    "embeddings_3d": (dict(x=x0[None]), ValueError, "embeddings must be 2-D \\[batch, embedding_size\\]"),
    "embeddings_sparse_csr": (dict(x=x0_csr), TypeError, "embeddings must be a dense \\(strided\\)"),
    "embeddings_empty": (dict(x=x0[:0], y=y0[:0]), ValueError, "0 rows: the loss of an empty batch is undefined"),
    "embeddings_no_columns": (dict(x=x0[:, :0], w=w0[:0]), ValueError, "embeddings has 0 columns"),
    "width_mismatch": (dict(x=x0[:, :5]), ValueError, "embeddings width 5 does not match fc height 8"),
    "fc_columns": (dict(w=w0[:, :7]), ValueError, "fc has 7 columns, which is not a positive multiple"),
    "fc_int": (dict(w=w0.int()), TypeError, "fc must be fp16, bf16, fp32 or fp64"),
    "fc_on_meta": (dict(w=w0.to("meta")), ValueError, "embeddings is on cpu but fc is on meta"),
    "labels_on_meta": (dict(y=y0.to("meta")), ValueError, "labels is on meta but embeddings is on cpu"),
    "labels_bool": (dict(y=y0.bool()), TypeError, "labels must be an integer tensor"),
    "labels_float": (dict(y=y0.float()), TypeError, "labels must be an integer tensor"),
    "labels_column": (dict(y=y0[:, None]), ValueError, "labels must have shape \\(7,\\)"),
    "labels_short": (dict(y=y0[:5]), ValueError, "labels must have shape \\(7,\\)"),
    "labels_negative_int8": (dict(y=-(y0.to(torch.int8)) - 1), ValueError, "labels must be in \\[0, 4\\)"),
    "labels_too_large": (dict(y=y0 + 4), ValueError, "labels must be in \\[0, 4\\)"),
    "labels_numpy": (dict(y=y0.numpy()), TypeError, "labels must be a torch.Tensor, got ndarray"),
}


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("case", list(BAD))
def test_error_bad_arguments(case, backend):
    kw, exc, pattern = BAD[case]
    kw = dict(kw)
    x, w, y, K = kw.pop("x", x0), kw.pop("w", w0), kw.pop("y", y0), kw.pop("K", 2)
    kw.setdefault("backend", backend)
    with pytest.raises(exc, match=pattern):
        st.softtriple_loss(x, w, y, K, **kw)
    if case.startswith(("embeddings", "width", "fc_", "K_", "gamma")) and case != "embeddings_empty":
        with pytest.raises(exc, match=pattern):
            st.softtriple_logits(x, w, K, **{k: v for k, v in kw.items() if k in ("gamma", "backend")})


@pytest.mark.parametrize("args,exc,pattern", [
    ((0, 8), ValueError, "num_classes must be a positive integer, got 0"),
    ((4, 2.5), ValueError, "embedding_size must be a positive integer, got 2.5"),
    ((4, 8, 0), ValueError, "centers_per_class must be a positive integer"),
    ((4, 8, 2, -1.0), ValueError, "la must be a finite number > 0"),
], ids=["classes0", "size2.5", "K0", "la-1"])
def test_error_module_construction(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        st.SoftTripleLoss(*args)


def test_error_module_input_mismatch_names_the_argument():
    m = st.SoftTripleLoss(4, 8, 2)
    with pytest.raises(ValueError, match="embeddings width 6 does not match fc height 8"):
        m(torch.randn(3, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be in \\[0, 4\\)"):
        m(torch.randn(3, 8), torch.tensor([0, 1, 4]))


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(chunk_bytes="64MiB"), TypeError, "chunk_bytes must be an int"),
    (dict(chunk_bytes=0), ValueError, "chunk_bytes must be >= 1 bytes, got 0"),
    (dict(cache_bytes=-1), ValueError, "cache_bytes must be >= 0"),
], ids=["chunk_str", "chunk0", "cache-1"])
def test_error_set_memory_budget(kw, exc, pattern):
    old = st.set_memory_budget()
    try:
        with pytest.raises(exc, match=pattern):
            st.set_memory_budget(**kw)
    finally:
        st.set_memory_budget(**old)


def test_exact_tiny_memory_budget_recomputes():
    old = st.set_memory_budget(chunk_bytes=1, cache_bytes=0)  # one class per chunk, backward recomputes
    try:
        _exact("torch", "cpu", *_plain(*_data(C=5)), tau=0.2)
    finally:
        st.set_memory_budget(**old)


def test_error_distributed_module_without_a_process_group():
    from softtriple_triton.distributed import ShardedSoftTripleLoss, class_split_bounds
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        ShardedSoftTripleLoss(10, 8, 2)
    with pytest.raises(ValueError, match="cannot split 3 classes over 4 ranks"):
        class_split_bounds(3, 4)


@pytest.mark.parametrize("fn", ["regularizer_sparse", "regularizer_list", "logits_gamma"])
def test_error_other_public_functions(fn):
    if fn == "regularizer_sparse":
        with pytest.raises(TypeError, match="fc must be a dense \\(strided\\) tensor"):
            st.center_regularizer(w0.to_sparse(), 2)
    elif fn == "regularizer_list":
        with pytest.raises(TypeError, match="fc must be a torch.Tensor, got list"):
            st.center_regularizer(w0.tolist(), 2)
    else:
        with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
            st.softtriple_logits(x0, w0, 2, gamma=-1.0)


# --------------------------------------------------------------------------- global torch settings

@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("setting", ["deterministic", "one_thread", "matmul_medium", "default_fp64"])
def test_exact_under_global_settings(setting, backend, device):
    if setting == "deterministic":
        prev, torch_set = torch.are_deterministic_algorithms_enabled(), torch.use_deterministic_algorithms
        arg = True
    elif setting == "one_thread":
        prev, torch_set, arg = torch.get_num_threads(), torch.set_num_threads, 1
    elif setting == "matmul_medium":
        prev, torch_set, arg = torch.get_float32_matmul_precision(), torch.set_float32_matmul_precision, "medium"
    else:
        prev, torch_set, arg = torch.get_default_dtype(), torch.set_default_dtype, torch.float64
    torch_set(arg)
    try:
        if setting == "default_fp64":
            m = st.SoftTripleLoss(4, 8, 2, backend=backend)
            assert m.fc.dtype == torch.float64
            _module_vs_oracle(m, _data(dtype=torch.float64)[0], _data()[2], device, TOL[torch.float64])
        else:
            _exact(backend, device, *_plain(*_data()), tau=0.2)
    finally:
        torch_set(prev)


# --------------------------------------------------------------------------- concurrency, environment

def test_exact_torch_backend_from_four_threads():
    cases = [_data(N=9 + i, seed=i) for i in range(4)]
    want = [_oracle(*c, tau=0.2) for c in cases]
    got, errors = {}, []

    def run(i):
        try:
            for _ in range(3):
                got[i] = st.softtriple_loss(*cases[i], 2, tau=0.2, backend="torch")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert max(_err(got[i], want[i]) for i in range(4)) <= 1e-6


def _python(code, env):
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()


@pytest.mark.skipif(HAS_CUDA, reason="CPU interpreter behaviour")
def test_error_interpret_with_spaces_and_knob_set_from_python():
    """' 1' is off for Triton: a clear error, never '0 active drivers'. Setting Triton's own knob from Python before
    the first kernel (triton imported without the interpreter) is a late setting: the message says what to do."""
    code = (
        "import torch, softtriple_triton as st\n"
        "x = torch.randn(4, 8); w = torch.randn(8, 6); y = torch.tensor([0, 1, 2, 0])\n"
        "try:\n    st.softtriple_loss(x, w, y, 2, backend='triton'); print('ran')\n"
        "except RuntimeError as e:\n    print('off' if 'TRITON_INTERPRET=1' in str(e) else repr(e))\n"
        "import triton\n"
        "triton.knobs.runtime.interpret = True\n"
        "try:\n    st.softtriple_loss(x, w, y, 2, backend='triton'); print('ran')\n"
        "except RuntimeError as e:\n    print('late' if 'set after triton was imported' in str(e) else repr(e))\n")
    assert _python(code, {"TRITON_INTERPRET": " 1"}) == ["off", "late"]


def test_exact_auto_backend_without_gpu_or_interpreter():
    code = (
        "import torch, softtriple_triton as st\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(6, 8, generator=g); w = torch.randn(8, 6, generator=g); y = torch.tensor([0, 1, 2, 0, 1, 2])\n"
        "a = st.softtriple_loss(x, w, y, 2)\n"
        "b = st.softtriple_loss(x.double(), w.double(), y, 2, backend='reference')\n"
        "print(abs(float(a) - float(b)) < 1e-5 * float(b))\n")
    assert _python(code, {"CUDA_VISIBLE_DEVICES": ""}) == ["True"]
