"""The torch backend on CPU: its fused C kernels and its pure-torch fallback both give the oracle's numbers, in
every autograd mode (inference, double backward, torch.func), at extreme scale, and fail clearly on bad budgets."""

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import softtriple_triton as st
from conftest import TOL, loss_and_grads, make_inputs, rel_err
from softtriple_triton import _common, cpu, cpu_native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["native", "native-torch-mm", "torch-ops"])
def impl(request, monkeypatch):
    """The per-chunk implementations: the C kernels with the products called from C (BLAS gemm), the C kernels with
    torch.mm's products (where torch links no ILP64 gemm), and the torch-operation fallback."""
    if request.param == "torch-ops":
        monkeypatch.setattr(cpu_native, "library", lambda: None)
    else:
        assert cpu_native.library() is not None, cpu_native.status()
        if request.param == "native-torch-mm":
            monkeypatch.setattr(cpu_native, "blas_gemm", lambda lib, dtype: None)
    return request.param


@pytest.fixture
def budget():
    old = st.set_memory_budget()
    yield st.set_memory_budget
    st.set_memory_budget(**old)


def _loss(be, y, K, **kw):
    kw = dict(dict(la=20.0, gamma=0.1, tau=0.0, margin=0.05), **kw)
    return lambda a, b: st.softtriple_loss(a, b, y, K, backend=be, **kw)


def _logits(be, K, gamma=0.1):
    return lambda a, b: st.softtriple_logits(a, b, K, gamma=gamma, backend=be)


# ----------------------------------------------------------------------------------------- the native kernels
def test_native_kernels_are_built_here():
    """This machine has a C compiler, so the fast path must be on (a silent fallback would hide a slowdown)."""
    if cpu_native._compiler() is None:
        pytest.fail("no C compiler on this machine: the fused CPU kernels cannot be tested")
    s = cpu_native.status()
    assert s["available"], s
    lib = cpu_native.library()
    for dtype in (torch.float32, torch.float64):  # this torch links MKL: the products are called from C
        assert cpu_native.blas_gemm(lib, dtype) is not None, dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_from_c_are_used_and_checked(dtype, monkeypatch):
    """The fused C calls (product + pass) run the step when the gemm is found, and a gemm that disagrees with torch
    on the probe product is refused (here: the probe run with the arguments of another shape)."""
    lib = cpu_native.library()
    addr = cpu_native.blas_gemm(lib, dtype)
    assert addr is not None and cpu_native._gemm_agrees(lib, addr, dtype)
    calls = []
    for name in ("forward_fused", "backward_fused"):
        orig = getattr(cpu_native, name)
        monkeypatch.setattr(cpu_native, name, lambda *a, _o=orig, _n=name: (calls.append(_n), _o(*a))[1])
    x, w, y = make_inputs(40, 8, 9, 3, seed=3)
    x, w = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    st.softtriple_loss(x, w, y, 3, tau=0.0, backend="torch").backward()
    assert calls == ["forward_fused", "backward_fused"]
    fn = getattr(lib, f"st_gemm_tt_{'f64' if dtype == torch.float64 else 'f32'}")
    real = fn

    def shifted(f, m, n, k, *rest):  # what a gemm with another argument convention would compute
        return real(f, m, n, k - 1, *rest)
    monkeypatch.setattr(lib, f"st_gemm_tt_{'f64' if dtype == torch.float64 else 'f32'}", shifted)
    assert not cpu_native._gemm_agrees(lib, addr, dtype)


@pytest.mark.parametrize("loaded", [True, False], ids=["C-check", "torch-check"])
def test_label_range_check_both_ways(loaded, monkeypatch):
    """check_labels uses one C loop once the kernels are loaded, torch operations before: same errors."""
    from softtriple_triton._validation import check_labels
    assert cpu_native.library() is not None
    if not loaded:
        monkeypatch.setattr(cpu_native, "loaded", lambda: None)
    good = torch.tensor([0, 4, 2, 4])
    assert torch.equal(check_labels(good, 4, 5, good.device), good)
    for bad, val in ((torch.tensor([0, 5, 1, 2]), 5), (torch.tensor([0, 1, -1, 2]), -1),
                     (torch.tensor([3, 2, 1, 7], dtype=torch.int32), 7)):
        with pytest.raises(ValueError, match=rf"labels must be in \[0, 5\).*found {val}"):
            check_labels(bad, 4, 5, bad.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_exp_within_one_ulp(dtype):
    lib = cpu_native.library()
    lo, hi = (-110.0, 89.0) if dtype == torch.float32 else (-750.0, 710.0)
    x = torch.cat([torch.linspace(lo, hi, 400_001, dtype=torch.float64).to(dtype),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("nan"), float("inf"), -float("inf")], dtype=dtype)])
    y = torch.empty_like(x)
    getattr(lib, "st_exp_%s_array" % ("f32" if dtype == torch.float32 else "f64"))(x.numel(), x.data_ptr(),
                                                                                   y.data_ptr())
    ref = torch.exp(x.double())
    fi = torch.finfo(dtype)
    normal = (ref >= fi.tiny) & (ref <= fi.max)
    assert (((y.double() - ref).abs() / ref)[normal].max() <= fi.eps).item()          # <= 1 ulp (2 half-ulps)
    sub = ref < fi.tiny                                                              # gradual underflow
    assert (((y.double() - ref).abs())[sub].max() <= fi.tiny * fi.eps).item()
    assert bool((y[ref > fi.max] == float("inf")).all())
    assert torch.isnan(y[-3]) and y[-2] == float("inf") and y[-1] == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bounded_exp_is_the_exp_on_its_range(dtype):
    """st_expb (the inner softmax's exp under the constant shift: no clamps, 2^n as one factor) equals st_exp bit for
    bit on the arguments the shift allows, t - 1/gamma in [-2/gamma, 0] at the smallest gamma (cpu._bounded), a little
    beyond for rounding, and propagates NaN."""
    lib = cpu_native.library()
    sfx = "f32" if dtype == torch.float32 else "f64"
    lo = -2.0 / cpu._MIN_GAMMA_FOR_CONSTANT_SHIFT[dtype] * (1 + 1e-3)
    x = torch.cat([torch.linspace(lo, 1e-3, 400_001, dtype=torch.float64).to(dtype),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("nan")], dtype=dtype)])
    y, yb = torch.empty_like(x), torch.empty_like(x)
    getattr(lib, f"st_exp_{sfx}_array")(x.numel(), x.data_ptr(), y.data_ptr())
    getattr(lib, f"st_expb_{sfx}_array")(x.numel(), x.data_ptr(), yb.data_ptr())
    assert torch.isnan(yb[-1])
    assert torch.equal(y[:-1], yb[:-1])
    assert bool((yb[:-1] >= torch.finfo(dtype).tiny).all())  # normal numbers, as the single 2^n factor needs


@pytest.mark.parametrize("chunk_bytes", [1, 3000, 1 << 30], ids=["one-class-chunks", "few-class-chunks", "one-chunk"])
@pytest.mark.parametrize("cache_bytes", [0, 200_000, 1 << 30], ids=["recompute", "cache-u-only", "cache"])
def test_both_implementations_match_oracle(impl, budget, chunk_bytes, cache_bytes):
    """N=300 d=11 C=17 K=3 fp64: 200 kB holds u and z (native: the backward redoes only the element-wise pass),
    not u, a and z."""
    budget(chunk_bytes=chunk_bytes, cache_bytes=cache_bytes)
    x, w, y = make_inputs(300, 11, 17, 3, seed=9)  # N > 256: several batch tiles in the C kernels
    g = torch.rand(300, dtype=torch.float64)
    for kw in (dict(gamma=0.05), dict(gamma=0.01, normalize_embeddings=False), dict(gamma=0.003)):
        want = loss_and_grads(_loss("reference", y, 3, reduction="none", **kw), x, w, g)
        got = loss_and_grads(_loss("torch", y, 3, reduction="none", **kw), x, w, g)
        for a, b in zip(got, want):
            assert rel_err(a, b) <= 1e-12, kw
    dS = torch.randn(300, 17, dtype=torch.float64)
    fn = lambda be: (lambda a, b: _logits(be, 3)(a, b) * dS)  # noqa: E731
    for a, b in zip(loss_and_grads(fn("torch"), x, w), loss_and_grads(fn("reference"), x, w)):
        assert rel_err(a, b) <= 1e-12


def test_fp32_and_strided_inputs_match_oracle(impl):
    """fp32 arithmetic (vs the fp64 formula on the same rounded inputs), centers given as a transposed view,
    embeddings as a strided view, bf16 embeddings with fp32 centers."""
    x, w, y = make_inputs(40, 16, 12, 4, dtype=torch.float32, seed=2)
    wt = w.t().contiguous().t()           # [d, M] with column stride d: not unit-stride rows
    xs = torch.cat([x, x], dim=1)[:, ::2]  # strided rows
    for xi, wi in ((x, w), (xs, wt), (x.bfloat16(), w)):
        want = loss_and_grads(_loss("reference", y, 4), xi.double(), wi.double())
        got = loss_and_grads(_loss("torch", y, 4), xi, wi)
        tol_loss, tol_grad = TOL[xi.dtype]  # the gradient of bf16 embeddings is returned in bf16
        assert rel_err(got[0], want[0]) <= tol_loss
        assert rel_err(got[1], want[1]) <= tol_grad and rel_err(got[2], want[2]) <= TOL[torch.float32][1]


def test_native_is_bitwise_reproducible_and_thread_independent():
    x, w, y = make_inputs(64, 32, 40, 5, dtype=torch.float32, seed=5)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (threads, threads, 1):
            torch.set_num_threads(t)
            runs.append(loss_and_grads(_loss("torch", y, 5), x, w))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_fallback_when_the_compiler_fails(tmp_path):
    """A broken compiler: one warning, then the pure-torch path with the oracle's numbers."""
    code = (
        "import warnings, torch, softtriple_triton as st\n"
        "from softtriple_triton import cpu_native\n"
        "x = torch.randn(9, 5, dtype=torch.float64); w = torch.randn(5, 12, dtype=torch.float64)\n"
        "y = torch.randint(0, 4, (9,))\n"
        "with warnings.catch_warnings(record=True) as rec:\n"
        "    warnings.simplefilter('always')\n"
        "    a = st.softtriple_loss(x, w, y, 3, backend='torch'); st.softtriple_loss(x, w, y, 3, backend='torch')\n"
        "b = st.softtriple_loss(x, w, y, 3, backend='reference')\n"
        "msgs = [str(r.message) for r in rec if 'fused CPU kernels' in str(r.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'failed' in msgs[0] and not cpu_native.status()['available']\n"
        "assert abs(a.item() - b.item()) <= 1e-12 * abs(b.item()), (a, b)\n"
    )
    env = dict(os.environ, CC="false", SOFTTRIPLE_TRITON_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------------------- issue 11, item 1
def test_inference_mode_call_does_not_break_later_training(impl, budget):
    """A loss and a get_logits under torch.inference_mode() must not leave inference tensors in the buffer pool."""
    budget(chunk_bytes=2000)  # several chunks: the pool is used
    x, w, y = make_inputs(20, 8, 9, 3, seed=3)
    with torch.inference_mode():
        st.softtriple_loss(x, w, y, 3, backend="torch")
        st.softtriple_logits(x, w, 3, backend="torch")
    for _ in range(2):
        want = loss_and_grads(_loss("reference", y, 3), x, w)
        got = loss_and_grads(_loss("torch", y, 3), x, w)
        for a, b in zip(got, want):
            assert rel_err(a, b) <= 1e-12
    assert not any(b.is_inference() for b in cpu._pool)


# ----------------------------------------------------------------------------------------- issue 11, item 3
@pytest.mark.parametrize("la", [1e4, 1e6])
def test_extreme_scale_at_the_constant_shift_temperature(impl, la):
    """fp32, gamma = 2/80 (the smallest temperature with the constant shift), K=1, an embedding opposite its
    class center: exp(t - 1/gamma) ~ 1e-35, and la / that overflowed to NaN gradients before."""
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])   # d=2, C=2, K=1
    x = torch.tensor([[-1.0, 0.0]])
    y = torch.tensor([0])
    kw = dict(la=la, gamma=0.025, tau=0.0, margin=0.01)
    want = loss_and_grads(_loss("reference", y, 1, **kw), x.double(), w.double())
    got = loss_and_grads(_loss("torch", y, 1, **kw), x, w)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) <= 1e-5


# ----------------------------------------------------------------------------------------- issue 11, item 4
def test_double_backward_matches_oracle(impl):
    x, w, y = make_inputs(10, 6, 5, 3, seed=1)

    def second(be):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = _loss(be, y, 3)(a, b)
        ga, gb = torch.autograd.grad(loss, (a, b), create_graph=True)
        return torch.autograd.grad(ga.square().sum() + (gb * b).sum(), (a, b))

    for a, b in zip(second("torch"), second("reference")):
        assert rel_err(a, b) <= 1e-12
    # logits, only the centers requiring grad
    def second_logits(be):
        b = w.clone().requires_grad_()
        (gb,) = torch.autograd.grad(_logits(be, 3)(x, b).square().sum(), b, create_graph=True)
        return torch.autograd.grad(gb.square().sum(), b)[0]

    assert rel_err(second_logits("torch"), second_logits("reference")) <= 1e-12


# ----------------------------------------------------------------------------------------- issue 11, item 9
@pytest.mark.parametrize("kw", [dict(chunk_bytes="64MiB"), dict(cache_bytes=1.5), dict(chunk_bytes=True),
                                dict(cache_bytes=[1])])
def test_budget_rejects_non_integers_by_name(kw):
    (name, value), = kw.items()
    old = dict(cpu._config)
    with pytest.raises(TypeError, match=f"{name} must be an int"):
        st.set_memory_budget(**kw)
    assert cpu._config == old  # nothing half-applied


def test_budget_range_and_partial_update(budget):
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1"):
        st.set_memory_budget(chunk_bytes=0)
    with pytest.raises(ValueError, match="cache_bytes must be >= 0"):
        st.set_memory_budget(cache_bytes=-1)
    old = st.set_memory_budget(cache_bytes=123)
    assert st.set_memory_budget() == dict(old, cache_bytes=123)


# ----------------------------------------------------------------------------------------- issue 11, item 2
TRANSFORMS = {
    "grad": lambda f, x, w: torch.func.grad(f, argnums=(0, 1))(x, w),
    "vjp": lambda f, x, w: torch.func.vjp(f, x, w)[1](torch.ones(())),
    "vmap-embeddings": lambda f, x, w: torch.func.vmap(lambda e: f(e, w))(torch.stack([x, x.flip(0), 2 * x])),
    "vmap-centers": lambda f, x, w: torch.func.vmap(lambda c: f(x, c), in_dims=1)(torch.stack([w, w.flip(1)], 1)),
    "vmap(grad)": lambda f, x, w: torch.func.vmap(torch.func.grad(lambda e: f(e, w)))(torch.stack([x, 3 * x])),
    "jacrev": lambda f, x, w: torch.func.jacrev(f, argnums=(0, 1))(x, w),
    "jacfwd": lambda f, x, w: torch.func.jacfwd(f, argnums=(0, 1))(x, w),
    "hessian": lambda f, x, w: torch.func.hessian(lambda e: f(e, w))(x),
    "jvp": lambda f, x, w: torch.func.jvp(f, (x, w), (torch.ones_like(x), torch.linspace(-1, 1, w.numel(),
                                                                                          dtype=w.dtype).view_as(w))),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_torch_func_transforms_match_oracle(impl, name):
    x, w, y = make_inputs(7, 4, 3, 2, seed=8)
    got = TRANSFORMS[name](_loss("torch", y, 2), x, w)
    want = TRANSFORMS[name](_loss("reference", y, 2), x, w)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert rel_err(a, b) <= 1e-12, name


@pytest.mark.parametrize("name", ["grad", "vmap-embeddings", "jacrev", "jvp"])
def test_torch_func_transforms_of_logits_match_oracle(impl, name):
    x, w, _ = make_inputs(6, 4, 3, 3, seed=4)
    f = lambda be: (lambda a, b: _logits(be, 3)(a, b).sin().sum())  # noqa: E731
    got = TRANSFORMS[name](f("torch"), x, w)
    want = TRANSFORMS[name](f("reference"), x, w)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert rel_err(a, b) <= 1e-12, name


def test_vmap_over_labels_matches_oracle(impl):
    """Per-sample gradients with the labels batched too (one_hot reads the labels' range: no .item() under vmap)."""
    _, w, _ = make_inputs(4, 6, 3, 2, seed=3)
    xb = torch.randn(3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    yb = torch.tensor([[0, 2, 1, 1], [2, 2, 0, 1], [1, 0, 0, 2]])
    f = lambda be: (lambda a, lab: st.softtriple_loss(a, w, lab, 2, backend=be))  # noqa: E731
    got = torch.func.vmap(torch.func.grad(f("torch")))(xb, yb)
    assert rel_err(got, torch.func.vmap(torch.func.grad(f("reference")))(xb, yb)) <= 1e-12


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_center_norms_match_oracle(impl, scale):
    """Center columns of norm ~1e30 / ~1e-30 in fp32: their squared norms and rw^2 leave fp32's range."""
    x, w, y = make_inputs(8, 8, 4, 2, seed=25)
    w[:, 3] *= scale
    got = loss_and_grads(_loss("torch", y, 2, reduction="none"), x.float(), w.float())
    want = loss_and_grads(_loss("reference", y, 2, reduction="none"), x.float().double(), w.float().double())
    rtol, gtol = TOL[torch.float32]
    assert rel_err(got[0], want[0]) <= 2 * rtol
    for dim, g, h in ((1, got[1], want[1]), (0, got[2], want[2])):  # per row / column: the column's scale differs
        scale_h = h.abs().amax(dim=dim, keepdim=True).clamp_min(1e-300)
        assert ((g.double() - h) / scale_h).abs().max() <= 2 * gtol


def test_forward_ad_matches_oracle(impl):
    x, w, y = make_inputs(9, 5, 4, 3, seed=6)
    tx, tw = torch.randn_like(x), torch.randn_like(w)

    def tangent(f):
        with fwAD.dual_level():
            return fwAD.unpack_dual(f(fwAD.make_dual(x, tx), fwAD.make_dual(w, tw))).tangent

    for f in (lambda be: _loss(be, y, 3, reduction="none"), lambda be: _logits(be, 3)):
        got, want = tangent(f("torch")), tangent(f("reference"))
        assert got is not None and rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("mode", ["checkpoint", "checkpoint-reentrant", "anomaly", "retain-graph-twice"])
def test_autograd_modes_match_oracle(impl, mode):
    from torch.utils.checkpoint import checkpoint

    x, w, y = make_inputs(12, 8, 5, 3, seed=3)

    def grads(be):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        f = _loss(be, y, 3)
        if mode.startswith("checkpoint"):
            checkpoint(f, a, b, use_reentrant=mode.endswith("reentrant")).backward()
        elif mode == "anomaly":
            with torch.autograd.detect_anomaly():
                f(a, b).backward()
        else:
            loss = f(a, b)
            loss.backward(retain_graph=True)
            loss.backward()
        return a.grad, b.grad

    for a, b in zip(grads("torch"), grads("reference")):
        assert rel_err(a, b) <= 1e-12


# ------------------------------------------------------------------------------------ native embedding normalisation
def _row_cases(dtype):
    """Rows of every kind: ordinary, huge (squares overflow the dtype), one huge entry, zero, clamped (norm < 1e-12)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 37, generator=g, dtype=torch.float64)
    big = 1e30 if dtype == torch.float32 else 1e300
    x[1] *= big
    x[4, 5] = 3 * big
    x[2] = 0.0
    x[3] *= 1e-14
    return x.to(dtype), [1, 4]


def _unit_rows_oracle(x, huge_rows, dtype):
    """F.normalize in fp64 of x (fp64), the huge rows of a ``dtype`` input first multiplied by a constant power of
    two that brings them to O(1) (exact; the unit vector is the same), differentiable in x."""
    scale = torch.ones(x.shape[0], 1, dtype=torch.float64)
    scale[huge_rows] = 2.0 ** -1000 if dtype == torch.float64 else 2.0 ** -100
    return torch.nn.functional.normalize(x * scale, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_unit_rows_match_the_formula(dtype):
    x, huge = _row_cases(dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    xo = x.double().requires_grad_()
    want = _unit_rows_oracle(xo, huge, dtype)
    (want_dx,) = torch.autograd.grad(want, xo, g)
    xn = x.clone().requires_grad_()
    got = cpu.unit_rows_fast(xn)
    assert type(got.grad_fn).__name__ == "_UnitRowsNativeBackward"
    (got_dx,) = torch.autograd.grad(got, xn, g.to(dtype))
    tol = 1e-15 if dtype == torch.float64 else 1e-7
    assert rel_err(got, want) <= tol
    for i in range(x.shape[0]):  # per row: the gradients' scales differ by 40 orders of magnitude across rows
        assert rel_err(got_dx[i], want_dx[i]) <= 10 * tol, i
    assert torch.equal(xn.detach(), x)  # the input is not modified


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_unit_rows_propagate_nan_and_inf_like_unit_rows(dtype):
    x = torch.randn(4, 9, dtype=dtype)
    x[1, 2] = float("nan")
    x[2, 3] = float("inf")
    x[3, 0] = -float("inf")
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = cpu.unit_rows_fast(a), _common.unit_rows(b)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.allclose(got[~want.isnan()], want[~want.isnan()])
    g = torch.randn_like(x)
    (ga,), (gb,) = torch.autograd.grad(got, a, g), torch.autograd.grad(want, b, g)
    assert torch.equal(ga.isnan(), gb.isnan()) and torch.allclose(ga[~gb.isnan()], gb[~gb.isnan()])


def _graph_names(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in seen:
            seen.add(type(fn).__name__)
            todo += [f for f, _ in fn.next_functions]
    return seen


def test_the_loss_normalises_embeddings_by_the_c_kernels(impl):
    x, w, y = make_inputs(6, 5, 4, 2, dtype=torch.float32)
    loss = st.softtriple_loss(x.clone().requires_grad_(), w, y, 2, backend="torch")
    assert ("_UnitRowsNativeBackward" in _graph_names(loss)) == (impl != "torch-ops")
    logits = st.softtriple_logits(x.clone().requires_grad_(), w, 2, backend="torch")
    assert ("_UnitRowsNativeBackward" in _graph_names(logits)) == (impl != "torch-ops")


# ------------------------------------------------------------------------------------ fp32 centre gradient
@pytest.mark.parametrize("shape", [(37, 13, 11, 3), (300, 70, 9, 8), (5, 6, 70, 1), (64, 96, 40, 2)],
                         ids=["odd", "N>tile", "K1", "even"])
@pytest.mark.parametrize("chunks", ["one", "many"])
def test_fp32_centre_gradient_matches_the_oracle(shape, chunks, budget):
    """fp32 against the fp64 oracle on the same rounded inputs, for tails in every dimension (batch tiles of 256,
    short classes, K = 1), one chunk or several, loss and logits."""
    N, d, C, K = shape
    if chunks == "many":
        budget(chunk_bytes=N * K * 4 * 3)  # three classes per chunk
    x, w, y = make_inputs(N, d, C, K, dtype=torch.float32, seed=7)
    got = loss_and_grads(_loss("torch", y, K), x, w)
    want = loss_and_grads(_loss("reference", y, K), x.double(), w.double())
    assert rel_err(got[0], want[0]) <= 1e-5
    assert rel_err(got[1], want[1]) <= 1e-5 and rel_err(got[2], want[2]) <= 1e-5
    g = torch.randn(N, C, generator=torch.Generator().manual_seed(8))
    got = loss_and_grads(lambda a, b: _logits("torch", K)(a, b) * g, x, w)
    want = loss_and_grads(lambda a, b: _logits("reference", K)(a, b) * g.double(), x.double(), w.double())
    assert rel_err(got[2], want[2]) <= 1e-5


def test_part_timers_of_the_fused_calls():
    """The C calls' part timers (bench/report.py's profile) see every part of a step and nothing when off."""
    x, w, y = make_inputs(64, 16, 30, 4, dtype=torch.float32, seed=2)
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    cpu_native.part_timing(True)
    t0 = time.perf_counter()
    st.softtriple_loss(x, w, y, 4, tau=0.0, backend="torch").backward()
    elapsed = time.perf_counter() - t0
    parts = cpu_native.part_timing(False)
    assert set(parts) == set(cpu_native.PARTS)
    assert all(v > 0 for v in parts.values()), parts
    assert sum(parts.values()) <= elapsed
    st.softtriple_loss(x, w, y, 4, tau=0.0, backend="torch").backward()
    assert all(v == 0 for v in cpu_native.part_timing(False).values())


@pytest.mark.parametrize("normalize", [True, False])
def test_strided_and_expanded_inputs(impl, normalize):
    """Views with any strides (expanded rows of stride 0, transposed, column slices) give the oracle's loss and
    gradients: the products from C need leading dimensions of at least a row (they get contiguous copies)."""
    g = torch.Generator().manual_seed(4)
    row = torch.randn(1, 6, generator=g, dtype=torch.float64)
    base_x = torch.randn(6, 9, generator=g, dtype=torch.float64)  # transposed: [9, 6] with strides (1, 9)
    big_w = torch.randn(6, 40, generator=g, dtype=torch.float64)  # a column slice: [6, 24] with stride 40
    w_row = torch.randn(1, 24, generator=g, dtype=torch.float64)
    y = torch.randint(0, 8, (9,), generator=g)
    w_t = torch.randn(24, 6, generator=g, dtype=torch.float64)  # transposed: [6, 24] with strides (1, 6)
    for x0, w0 in ((row.expand(9, 6), big_w[:, 8:32]), (base_x.t(), w_row.expand(6, 24)), (base_x.t(), w_t.t())):
        x, w = x0.detach().clone().requires_grad_(), w0.detach().clone().requires_grad_()
        want = loss_and_grads(_loss("reference", y, 3, normalize_embeddings=normalize), x, w)
        xv, wv = x0.detach().requires_grad_(), w0.detach().requires_grad_()
        got = st.softtriple_loss(xv, wv, y, 3, la=20.0, gamma=0.1, tau=0.0, margin=0.05, backend="torch",
                                 normalize_embeddings=normalize)
        got.backward()
        assert rel_err(got, want[0]) <= 1e-12
        assert rel_err(xv.grad, want[1]) <= 1e-10 and rel_err(wv.grad, want[2]) <= 1e-10
