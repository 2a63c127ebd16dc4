"""Every fused backend against the plain formula (the oracle), values and gradients."""

import pytest
import torch

import softtriple_triton as st
from conftest import TOL, TORCH_DEVICES, TRITON_DEVICE, loss_and_grads, make_inputs, rel_err

BACKEND_DEVICES = [("triton", TRITON_DEVICE)] + [("torch", dev) for dev in TORCH_DEVICES]

# ragged shapes: none of N, d, C, C*K is a multiple of a tile size
SHAPES = [(1, 16, 3), (37, 20, 13), (70, 33, 40), (130, 72, 9)]
KS = [1, 2, 3, 10]
HYPER = [
    dict(la=20.0, gamma=0.1, tau=0.2, margin=0.01),   # the paper's defaults
    dict(la=64.0, gamma=0.02, tau=0.5, margin=0.1),   # extreme scale and temperature
]


def oracle(x, w, y, K, g=None, **kw):
    return loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, K, backend="reference", **kw), x, w, g)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("K", KS)
def test_fp64_parity_mean(backend, device, shape, K):
    N, d, C = shape
    x, w, y = make_inputs(N, d, C, K, device=device, seed=N + K)
    hyper = HYPER[(N + K) % 2]
    want = oracle(x, w, y, K, **hyper)
    got = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, K, backend=backend, **hyper), x, w)
    for name, a, b in zip(("loss", "d_embeddings", "d_fc"), got, want):
        assert rel_err(a, b) <= 1e-9, (name, rel_err(a, b))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("hyper", HYPER, ids=["paper", "extreme"])
def test_fp64_parity_reductions_with_random_grad_output(backend, device, reduction, hyper):
    N, d, C, K = 45, 24, 17, 3
    x, w, y = make_inputs(N, d, C, K, device=device, seed=7)
    # a non-uniform per-row grad_output must be folded in exactly (reduction='none'); for the scalar
    # reductions a random scalar grad_output
    g = torch.rand(N if reduction == "none" else (), dtype=torch.float64, device=device) + 0.5
    want = oracle(x, w, y, K, g, reduction=reduction, **hyper)
    got = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, K, reduction=reduction, backend=backend, **hyper),
                         x, w, g)
    assert got[0].shape == want[0].shape
    for name, a, b in zip(("loss", "d_embeddings", "d_fc"), got, want):
        assert rel_err(a, b) <= 1e-9, (name, rel_err(a, b))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("K", [1, 4])
def test_fp64_parity_unnormalized_embeddings(backend, device, K):
    x, w, y = make_inputs(33, 18, 10, K, device=device, seed=3, scale=0.2)
    kw = dict(la=10.0, gamma=0.05, tau=0.2, margin=0.02, normalize_embeddings=False)
    want = oracle(x, w, y, K, **kw)
    got = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, K, backend=backend, **kw), x, w)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-9


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("K", [1, 3, 10])
def test_fp64_parity_logits(backend, device, K):
    x, w, _ = make_inputs(29, 40, 21, K, device=device, seed=K)
    dS = torch.randn(29, 21, dtype=torch.float64, device=device)

    def fn(be):
        return lambda a, b: st.softtriple_logits(a, b, K, gamma=0.07, backend=be) * dS

    want = loss_and_grads(fn("reference"), x, w)
    got = loss_and_grads(fn(backend), x, w)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-9


@pytest.mark.parametrize("backend,device", [("torch", dev) for dev in TORCH_DEVICES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_against_fp64_oracle(backend, device, dtype):
    """The torch backend computes in fp32 from whatever dtypes arrive. (The Triton backend's 16-bit products are
    tested against an oracle on the same rounded operands in test_dtype_policy.py.)"""
    N, d, C, K = 64, 48, 30, 4
    x, w, y = make_inputs(N, d, C, K, dtype=dtype, device=device, seed=11)
    kw = dict(la=20.0, gamma=0.1, tau=0.2, margin=0.01)
    # the oracle sees exactly the rounded inputs, in fp64
    want = oracle(x.double(), w.double(), y, K, **kw)
    got = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, K, backend=backend, **kw), x, w)
    assert got[0].dtype == (torch.float32 if dtype != torch.float64 else torch.float64)
    assert got[1].dtype == dtype and got[2].dtype == dtype  # gradients in the parameters' own dtype
    rtol_loss, rtol_grad = TOL[dtype]
    assert rel_err(got[0], want[0]) <= rtol_loss
    assert rel_err(got[1], want[1]) <= rtol_grad
    assert rel_err(got[2], want[2]) <= rtol_grad


@pytest.mark.parametrize("backend,device", [("torch", dev) for dev in TORCH_DEVICES])
def test_mixed_dtypes_low_precision_embeddings_fp32_centers(backend, device):
    """torch backend, bf16 embeddings (e.g. from an autocast model) with fp32 centers: fp32 math, fc grad stays
    fp32. (Triton backend: bf16 products, test_dtype_policy.py.)"""
    x, w, y = make_inputs(40, 32, 12, 3, device=device, seed=5)
    xb = x.to(torch.bfloat16)
    want = oracle(xb.double(), w, y, 3)
    got = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, 3, backend=backend), xb, w.float())
    assert got[2].dtype == torch.float32
    assert rel_err(got[0], want[0]) <= 1e-5
    assert rel_err(got[2], want[2]) <= 1e-3  # the dot is done in fp32 on exactly-rounded bf16 embeddings


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("K", [3, 10])
def test_fp64_parity_of_every_triton_backward(triton_path, reduction, K):
    """cached / chunked (several chunks) / two-kernel: the same fp64 numbers, with a random per-row grad_output."""
    from softtriple_triton import fused

    x, w, y = make_inputs(45, 24, 17, K, device=TRITON_DEVICE, seed=K + 70)
    g = torch.rand(45 if reduction == "none" else (), dtype=torch.float64, device=TRITON_DEVICE) + 0.5
    kw = dict(la=32.0, gamma=0.05, tau=0.2, margin=0.05, reduction=reduction)
    old = fused.set_triton_options(chunk_bytes=45 * 16 * K * 8 * 2)  # two tiles a chunk: several chunks
    try:
        got = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, K, backend="triton", **kw), x, w, g)
    finally:
        fused.set_triton_options(**old)
    want = oracle(x, w, y, K, g, **kw)
    for name, a, b in zip(("loss", "d_embeddings", "d_fc"), got, want):
        assert rel_err(a, b) <= 1e-9, (triton_path, name, rel_err(a, b))
