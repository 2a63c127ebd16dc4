"""Numerical extremes, non-finite inputs and property-based agreement of all backends with the fp64 oracle."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import softtriple_triton as st
from conftest import HAS_CUDA, TOL, TORCH_DEVICES, TRITON_DEVICE, loss_and_grads, make_inputs, rel_err

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


# --------------------------------------------------------------------------- issue 11: every use exact or a clear error

ALL = [("reference", "cpu")] + FUSED


def _ref64(x, w, y, K, **kw):
    """The fp64 oracle on exactly the rounded inputs."""
    return st.softtriple_loss(x.double().cpu(), w.double().cpu(), y.cpu(), K, backend="reference",
                              **kw)


# item 2: torch.func on the triton backend (forward mode: exact w.r.t. the embeddings, a clear error otherwise)

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_forward_mode_wrt_embeddings_is_exact(reduction):
    x, w, y = make_inputs(9, 8, 5, 3, seed=21)
    t = torch.randn_like(x)
    f = lambda be: (lambda a: st.softtriple_loss(a, w.to(TRITON_DEVICE) if be == "triton" else w,  # noqa: E731
                                                 y.to(a.device), 3, tau=0.3, reduction=reduction, backend=be))
    _, want = torch.func.jvp(f("reference"), (x,), (t,))
    _, got = torch.func.jvp(f("triton"), (x.to(TRITON_DEVICE),), (t.to(TRITON_DEVICE),))
    assert rel_err(got, want) <= 1e-12
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.to(TRITON_DEVICE), t.to(TRITON_DEVICE))
        tangent = fwAD.unpack_dual(f("triton")(dual)).tangent
    assert tangent is not None and rel_err(tangent, want) <= 1e-12


def test_triton_forward_mode_wrt_centers_and_logits_raise_naming_the_reference():
    x, w, y = (a.to(TRITON_DEVICE) for a in make_inputs(6, 8, 3, 2, seed=22))
    with pytest.raises(NotImplementedError, match="w.r.t. the embeddings only, but fc has a tangent.*backend='reference'"):
        torch.func.jvp(lambda b: st.softtriple_loss(x, b, y, 2, backend="triton"), (w,), (torch.ones_like(w),))
    with pytest.raises(NotImplementedError, match="softtriple_logits\\(backend='triton'\\) has no forward-mode.*reference"):
        torch.func.jvp(lambda a: st.softtriple_logits(a, w, 2, backend="triton"), (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match="backend='reference'"):
        torch.func.hessian(lambda a: st.softtriple_loss(a, w, y, 2, backend="triton"))(x)


def test_triton_func_grad_vmap_jacrev_match_the_oracle():
    x, w, y = make_inputs(6, 8, 4, 2, seed=23)
    xb, yb = torch.randn(3, 6, 8, dtype=torch.float64), torch.randint(0, 4, (3, 6))
    dev = TRITON_DEVICE
    for argnums in (0, 1, (0, 1)):
        want = torch.func.grad(lambda a, b: _ref64(a, b, y, 2), argnums=argnums)(x, w)
        got = torch.func.grad(lambda a, b: st.softtriple_loss(a, b, y.to(dev), 2, backend="triton"),
                              argnums=argnums)(x.to(dev), w.to(dev))
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert rel_err(a, b) <= 1e-12
    per_batch = lambda be, wd: (lambda a, lab: st.softtriple_loss(a, wd, lab, 2, backend=be))  # noqa: E731
    want = torch.func.vmap(per_batch("reference", w))(xb, yb)
    assert rel_err(torch.func.vmap(per_batch("triton", w.to(dev)))(xb.to(dev), yb.to(dev)), want) <= 1e-12
    want = torch.func.vmap(torch.func.grad(per_batch("reference", w)))(xb, yb)
    got = torch.func.vmap(torch.func.grad(per_batch("triton", w.to(dev))))(xb.to(dev), yb.to(dev))
    assert rel_err(got, want) <= 1e-12
    want = torch.func.jacrev(lambda a: st.softtriple_loss(a, w, y, 2, reduction="none", backend="reference"))(x)
    got = torch.func.jacrev(lambda a: st.softtriple_loss(a, w.to(dev), y.to(dev), 2, reduction="none",
                                                         backend="triton"))(x.to(dev))
    assert rel_err(got, want) <= 1e-12
    lw = lambda be, wd: (lambda a: st.softtriple_logits(a, wd, 2, backend=be))  # noqa: E731
    assert rel_err(torch.func.vmap(lw("triton", w.to(dev)))(xb.to(dev)), torch.func.vmap(lw("reference", w))(xb)) <= 1e-12


# item 4: triton double backward: first-order gradients with create_graph=True work; a second derivative raises

def test_triton_double_backward_raises_one_clear_error():
    x, w, y = (a.to(TRITON_DEVICE) for a in make_inputs(6, 8, 3, 2, seed=24))
    x.requires_grad_(True)
    w.requires_grad_(True)
    (gx,) = torch.autograd.grad(st.softtriple_loss(x, w, y, 2, backend="triton"), x, create_graph=True)
    (want,) = torch.autograd.grad(_ref64(x, w, y, 2), x)
    assert rel_err(gx, want) <= 1e-12
    with pytest.raises(NotImplementedError, match="first derivatives only.*backend='reference'"):
        gx.pow(2).sum().backward()
    S = st.softtriple_logits(x, w, 2, backend="triton")
    (gw,) = torch.autograd.grad(S.sum(), w, create_graph=True)
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        gw.sum().backward()


# item 5: meta tensors give meta results of the right shape and dtype, forward and backward, on every backend

@pytest.mark.parametrize("backend", ["reference", "torch", "triton", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_meta_tensors(backend, dtype):
    x = torch.empty(5, 8, device="meta", dtype=dtype, requires_grad=True)
    w = torch.empty(8, 6, device="meta", dtype=dtype, requires_grad=True)
    y = torch.empty(5, dtype=torch.long, device="meta")
    out = torch.float64 if dtype == torch.float64 else torch.float32
    loss = st.softtriple_loss(x, w, y, 2, backend=backend)
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == out
    loss.backward()
    assert x.grad.shape == x.shape and x.grad.dtype == dtype and w.grad.shape == w.shape and w.grad.dtype == dtype
    rows = st.softtriple_loss(x, w, y, 2, reduction="none", backend=backend)
    assert rows.device.type == "meta" and rows.shape == (5,) and rows.dtype == out
    S = st.softtriple_logits(x, w, 2, backend=backend)
    assert S.device.type == "meta" and S.shape == (5, 3) and S.dtype == out


# item 6: center_regularizer validates like the loss

@pytest.mark.parametrize("fc,K,exc,pattern", [
    (torch.randn(8, 6), 0, ValueError, "centers_per_class must be a positive integer, got 0"),
    (torch.randn(8, 6), 2.5, ValueError, "centers_per_class must be a positive integer, got 2.5"),
    (torch.randn(8, 6), True, ValueError, "centers_per_class must be a positive integer"),
    (torch.randn(8, 7), 2, ValueError, "fc has 7 columns, which is not a positive multiple of centers_per_class=2"),
    (torch.randn(8), 2, ValueError, "fc must be 2-D"),
    (torch.ones(8, 6, dtype=torch.long), 2, TypeError, "fc must be fp16, bf16, fp32 or fp64"),
    ([[1.0, 2.0]], 2, TypeError, "fc must be a torch.Tensor"),
    (torch.randn(8, 6).to_sparse(), 2, TypeError, "fc must be a dense \\(strided\\) tensor"),
], ids=["K0", "K2.5", "Kbool", "columns", "1-D", "int", "list", "sparse"])
def test_center_regularizer_validates(fc, K, exc, pattern):
    with pytest.raises(exc, match=pattern):
        st.center_regularizer(fc, K)


# item 7: TRITON_INTERPRET read as Triton reads it; a late change is detected with what to do

def test_interpret_parsing_follows_triton():
    from triton import knobs

    from softtriple_triton._common import parse_interpret
    old = os.environ.get("TRITON_INTERPRET")
    try:
        for value in ["1", "0", "true", "True", "TRUE", "false", "False", "off", "OFF", "on", "yes", "no", "y", "n",
                      "", "2", " 1", "1 ", "junk"]:
            os.environ["TRITON_INTERPRET"] = value
            assert parse_interpret(value) == knobs.runtime.interpret, value
    finally:
        os.environ["TRITON_INTERPRET"] = old
    assert parse_interpret(None) is False


def _subprocess(code, env_extra, drop=("TRITON_INTERPRET",)):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


_PRELUDE = ("import os, torch, softtriple_triton as st\n"
            "x = torch.randn(6, 8); w = torch.randn(8, 6); y = torch.randint(0, 3, (6,))\n")


@pytest.mark.skipif(HAS_CUDA, reason="CPU interpreter behaviour")
def test_interpret_false_is_off_and_late_setting_is_detected():
    code = _PRELUDE + (
        "try:\n    st.softtriple_loss(x, w, y, 2, backend='triton'); print('ran')\n"
        "except RuntimeError as e:\n    assert 'TRITON_INTERPRET=1' in str(e) and 'active drivers' not in str(e), e\n"
        "import triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n    st.softtriple_loss(x, w, y, 2, backend='triton'); print('ran late')\n"
        "except RuntimeError as e:\n    assert 'set after triton was imported' in str(e) and 'before' in str(e), e\n"
        "print('ok', float(st.softtriple_loss(x, w, y, 2, backend='torch')) > 0)\n")
    for value in ("false", "False", "off", "no"):
        assert _subprocess(code, {"TRITON_INTERPRET": value}).split() == ["ok", "True"]


@pytest.mark.skipif(HAS_CUDA, reason="CPU interpreter behaviour")
def test_interpret_words_triton_accepts_turn_it_on():
    code = _PRELUDE + (
        "a = st.softtriple_loss(x.double(), w.double(), y, 2, backend='triton')\n"
        "b = st.softtriple_loss(x.double(), w.double(), y, 2, backend='reference')\n"
        "print(abs(float(a - b)) < 1e-12)\n")
    assert _subprocess(code, {"TRITON_INTERPRET": "yes"}).split() == ["True"]


def test_interpreter_turned_off_after_import_is_detected(monkeypatch):
    if HAS_CUDA:
        pytest.skip("CPU interpreter behaviour")
    x, w, y = make_inputs(4, 8, 3, 2, dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "off")
    with pytest.raises(RuntimeError, match="imported with the interpreter on.*backend='torch'"):
        st.softtriple_loss(x, w, y, 2, backend="triton")


# item 8: two threads on the triton backend under the interpreter

@pytest.mark.skipif(HAS_CUDA, reason="CPU interpreter behaviour")
def test_two_threads_under_the_interpreter():
    code = (
        "import threading, torch, softtriple_triton as st\n"
        "g = torch.Generator().manual_seed(0)\n"
        "cases = [(torch.randn(20, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g))"
        " for _ in range(3)]\n"
        "w = torch.randn(8, 6, generator=g, dtype=torch.float64)\n"
        "want = [st.softtriple_loss(x, w, y, 2, backend='reference') for x, y in cases]\n"
        "got, errors = {}, []\n"
        "def run(i):\n"
        "    try:\n"
        "        for _ in range(4):\n"
        "            x = cases[i][0].clone().requires_grad_(True)\n"
        "            loss = st.softtriple_loss(x, w, cases[i][1], 2, backend='triton'); loss.backward()\n"
        "            got[i] = loss.detach()\n"
        "    except Exception as e:\n"
        "        errors.append(repr(e))\n"
        "threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "assert not errors, errors\n"
        "print(all(abs(float(got[i] - want[i])) < 1e-12 for i in range(3)))\n")
    assert _subprocess(code, {"TRITON_INTERPRET": "1"}).split() == ["True"]


# item 9: sparse inputs say what to do; the logits of an empty batch are [0, C]

@pytest.mark.parametrize("backend,device", ALL)
def test_sparse_inputs_raise_and_empty_logits(backend, device):
    x, w, y = (a.to(device) for a in make_inputs(6, 8, 3, 2))
    for args, name in (((x.to_sparse(), w, y), "embeddings"), ((x, w.to_sparse(), y), "fc"),
                       ((x, w, y.to_sparse()), "labels")):
        with pytest.raises(TypeError, match=f"{name} must be a dense \\(strided\\) tensor.*to_dense"):
            st.softtriple_loss(*args, 2, backend=backend)
    e = torch.zeros(0, 8, dtype=torch.float64, device=device, requires_grad=True)
    S = st.softtriple_logits(e, w, 2, backend=backend)
    assert S.shape == (0, 3) and S.dtype == torch.float64
    S.sum().backward()
    assert e.grad.shape == (0, 8)
    with pytest.raises(ValueError, match="0 rows: the loss of an empty batch is undefined"):
        st.softtriple_loss(e, w, y[:0], 2, backend=backend)


# item 10: huge but finite entries normalise correctly (no overflow of the sum of squares)

def _huge_case(backend, device, dtype, rows, cols):
    x, w, y = make_inputs(8, 8, 4, 2, seed=25)
    x[rows] *= torch.tensor([1e25, 3e37], dtype=torch.float64)[: len(rows), None]
    w[:, cols] *= 1e30
    x, w = x.to(dtype), w.to(dtype)
    got = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y.to(device), 2, tau=0.3, reduction="none",
                                                         backend=backend), x.to(device), w.to(device))
    want = loss_and_grads(lambda a, b: _ref64(a, b, y, 2, tau=0.3, reduction="none"), x.double(), w.double())
    rtol, gtol = TOL[dtype]
    # bf16: the normalised rows are stored in bf16 (one rounding) and la = 20 scales it: 2x the table's rtol; the
    # triton backend multiplies 16-bit inputs in their dtype, which rounds the normalised centers too: 3x
    k = 3 if backend == "triton" and dtype in (torch.float16, torch.bfloat16) else 2
    assert rel_err(got[0], want[0]) <= k * rtol
    for dim, g, h in ((1, got[1], want[1]), (0, got[2], want[2])):  # per row / column: scales differ by 1e25
        scale = h.abs().amax(dim=dim, keepdim=True).clamp_min(1e-300)
        assert ((g.double().cpu() - h) / scale).abs().max() <= 2 * gtol
    return x, w


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_finite_embeddings(backend, device, dtype):
    """Rows of ~1e25 and ~3e37 (sum of squares ~1e75 overflows fp32) were treated as zero vectors."""
    _huge_case(backend, device, dtype, rows=[1, 2], cols=[])


@pytest.mark.parametrize("backend,device", [
    ("reference", "cpu"), ("triton", TRITON_DEVICE), *[("torch", d) for d in TORCH_DEVICES]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_finite_centers(backend, device, dtype):
    """A center column of ~1e30: its inverse norm (functional.py, triton backend) and the regulariser overflowed."""
    x, w = _huge_case(backend, device, dtype, rows=[], cols=[3])
    reg = loss_and_grads(lambda a, b: st.center_regularizer(b, 2) + 0 * a.sum(), x[:1, :1].to(device), w.to(device))
    ref = loss_and_grads(lambda a, b: st.reference_regularizer(b, 2) + 0 * a.sum(), x[:1, :1].double(), w.double())
    assert rel_err(reg[0], ref[0]) <= 1e-5
    scale = ref[2].abs().amax(dim=0, keepdim=True).clamp_min(1e-300)
    assert ((reg[2].double().cpu() - ref[2]) / scale).abs().max() <= 2 * TOL[dtype][1]


def test_regularizer_scaled_path_everywhere_and_func():
    """The always-scaled path (CUDA / torch.compile) equals the oracle on CPU; torch.func, forward mode and the
    double backward of the regulariser are exact."""
    from softtriple_triton import regularizer
    _, w, _ = make_inputs(1, 12, 5, 3, seed=26)
    want = loss_and_grads(lambda a, b: st.reference_regularizer(b, 3) + 0 * a.sum(), w[:1, :1], w)
    orig = regularizer.needs_pow2_scale
    regularizer.needs_pow2_scale = lambda f, s: True
    try:
        got = loss_and_grads(lambda a, b: st.center_regularizer(b, 3) + 0 * a.sum(), w[:1, :1], w)
    finally:
        regularizer.needs_pow2_scale = orig
    assert rel_err(got[0], want[0]) <= 1e-13 and rel_err(got[2], want[2]) <= 1e-13
    g = torch.func.grad(lambda b: st.center_regularizer(b, 3))(w)
    assert rel_err(g, want[2]) <= 1e-13
    t = torch.randn_like(w)
    _, jv = torch.func.jvp(lambda b: st.center_regularizer(b, 3), (w,), (t,))
    assert rel_err(jv, (want[2] * t).sum()) <= 1e-12
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(st.center_regularizer(fwAD.make_dual(w, t), 3)).tangent
    assert rel_err(tangent, (want[2] * t).sum()) <= 1e-12
    wb = torch.stack([w, 2 * w.flip(1)])
    vm = torch.func.vmap(lambda b: st.center_regularizer(b, 3))(wb)
    assert rel_err(vm, torch.stack([st.reference_regularizer(b, 3) for b in wb])) <= 1e-13

    def hvp(fn):
        b = w.clone().requires_grad_(True)
        (gb,) = torch.autograd.grad(fn(b), b, create_graph=True)
        return torch.autograd.grad((gb * t).sum(), b)[0]
    assert rel_err(hvp(lambda b: st.center_regularizer(b, 3)), hvp(lambda b: st.reference_regularizer(b, 3))) <= 1e-11
