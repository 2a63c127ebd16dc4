"""The product-dtype policy of the fused (Triton) backend, each configuration against an fp64 oracle.

Policy (functional.product_dtype): bf16/fp16 embeddings, and any call under torch.autocast, multiply in the
16-bit dtype with fp32 accumulation (tensor cores on a GPU); fp32 with fp32 follows torch's matmul precision;
fp64 is exact. The oracle sees exactly the operands the products see: the normalised embeddings and the
normalised centers rounded once to the product dtype (values), with gradients taken through the unrounded
normalisations (straight-through), in fp64. What is left is the rounding of dL/ds to the product dtype before
the two gradient products, fp32 accumulation order, and the rounding of the returned gradients to the inputs'
dtypes. Measured (N=64, d=48, C=30, K=10, interpreter): see TOL_POLICY; README "Guarantees" quotes them.
"""

import pytest
import torch
import torch.nn.functional as F

import softtriple_triton as st
from conftest import TRITON_DEVICE, make_inputs, rel_err, rows_from_similarities
from softtriple_triton import fused
from softtriple_triton.functional import product_dtype

KW = dict(la=20.0, gamma=0.1, tau=0.0, margin=0.01)

# (loss, d embeddings, d fc) max errors relative to the oracle's max-abs value, per product dtype
# measured over the three backward paths (interpreter): bf16 <= 9.1e-8 / 5.0e-3 / 5.5e-3 (the cached path rounds
# the factor and then dL/ds), fp16 <= 3.5e-8 / 5.6e-4 / 4.7e-4, fp32 (IEEE) <= 2.5e-8 / 7.1e-7 / 5.4e-7
TOL_POLICY = {
    torch.bfloat16: (1e-6, 8e-3, 8e-3),
    torch.float16: (1e-6, 1.5e-3, 1.5e-3),
    torch.float32: (1e-6, 5e-6, 5e-6),
}


def rounded_oracle(emb, fc, y, K, prod, la, gamma, margin, g=None, ds_out=None, **_):
    """fp64 loss and gradients of the formula on the operands rounded to ``prod`` (values), differentiated
    through the unrounded normalisations."""
    e = emb.detach().double().requires_grad_(True)
    w = fc.detach().double().requires_grad_(True)
    xn = F.normalize(e, dim=1)
    wn = F.normalize(w, dim=0)
    xr = xn + (F.normalize(emb.detach().float(), dim=1).to(prod).double() - xn).detach()
    wr = wn + ((fc.detach().double() / fc.detach().double().norm(dim=0)).to(prod).double() - wn).detach()
    s = xr @ wr
    s.retain_grad()
    rows, _ = rows_from_similarities(s, y, K, la, gamma, margin)
    (rows * (g if g is not None else 1.0 / s.shape[0])).sum().backward()
    if ds_out is not None:
        ds_out.append(s.grad)
    return rows.mean().detach(), e.grad, w.grad


def fused_loss(emb, fc, y, K, autocast=None):
    e = emb.detach().clone().requires_grad_(True)
    w = fc.detach().clone().requires_grad_(True)
    if autocast is None:
        loss = st.softtriple_loss(e, w, y, K, backend="triton", **KW)
    else:
        with torch.autocast(device_type=e.device.type, dtype=autocast):
            loss = st.softtriple_loss(e, w, y, K, backend="triton", **KW)
    loss.backward()
    return loss.detach(), e.grad, w.grad


CONFIGS = [  # (embeddings dtype, centers dtype, autocast dtype) -> product dtype
    (torch.bfloat16, torch.float32, None),
    (torch.float16, torch.float32, None),
    (torch.bfloat16, torch.bfloat16, None),
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.float32, torch.float32, torch.float16),
    (torch.float32, torch.float32, None),
]


PATHS = {"cached": dict(backward="auto"), "chunked": dict(backward="auto", cache_bytes=0),
         "two_kernel": dict(backward="two_kernel")}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("emb_dtype,fc_dtype,autocast", CONFIGS, ids=lambda v: str(v).replace("torch.", ""))
def test_each_configuration_against_the_rounded_fp64_oracle(emb_dtype, fc_dtype, autocast, path):
    N, d, C, K = 64, 48, 30, 10
    x, w, y = make_inputs(N, d, C, K, dtype=torch.float32, device=TRITON_DEVICE, seed=3)
    x, w = x.to(emb_dtype), w.to(fc_dtype)
    old = fused.set_triton_options(**PATHS[path])
    try:
        got = fused_loss(x, w, y, K, autocast)
    finally:
        fused.set_triton_options(**old)
    prod = autocast or product_dtype(emb_dtype, fc_dtype, x.device.type)
    want = rounded_oracle(x, w, y, K, prod, **KW)
    assert got[0].dtype == torch.float32 and got[1].dtype == emb_dtype and got[2].dtype == fc_dtype
    tol = TOL_POLICY[prod]
    for name, a, b, t in zip(("loss", "d_embeddings", "d_fc"), got, want, tol):
        assert rel_err(a, b) <= t, (name, rel_err(a, b), t)


def test_policy_picks_the_product_dtype():
    assert product_dtype(torch.bfloat16, torch.float32, "cpu") == torch.bfloat16
    assert product_dtype(torch.float16, torch.float32, "cpu") == torch.float16
    assert product_dtype(torch.float32, torch.float32, "cpu") == torch.float32
    assert product_dtype(torch.float32, torch.bfloat16, "cpu") == torch.float32
    assert product_dtype(torch.float16, torch.bfloat16, "cpu") == torch.float32
    assert product_dtype(torch.bfloat16, torch.float64, "cpu") == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert product_dtype(torch.float32, torch.float32, "cpu") == torch.bfloat16
        assert product_dtype(torch.float64, torch.float32, "cpu") == torch.float64


def test_fp16_gradients_are_scaled_into_range():
    """la * (1 + 2 / gamma) * g far above fp16's 65504: unscaled fp16 dL/ds would overflow to inf. (Embeddings of
    norm ~1000 keep their own gradient, dx / ||e||, inside fp16's range.)"""
    N, d, C, K = 40, 24, 12, 3
    x, w, y = make_inputs(N, d, C, K, dtype=torch.float32, device=TRITON_DEVICE, seed=8, scale=200.0)
    kw = dict(la=5000.0, gamma=0.02, tau=0.0, margin=0.0)
    e = x.half().requires_grad_(True)
    f = w.clone().requires_grad_(True)
    loss = st.softtriple_loss(e, f, y, K, backend="triton", reduction="sum", **kw)
    (loss * 64.0).backward()  # a GradScaler-like upstream factor on top
    ds = []
    want = rounded_oracle(x.half(), w, y, K, torch.float16, g=torch.full((N,), 64.0, dtype=torch.float64),
                          ds_out=ds, **kw)
    assert torch.isfinite(e.grad).all() and torch.isfinite(f.grad).all()
    assert ds[0].abs().max() > 65504 * 4  # dL/ds itself in fp16 would overflow
    assert rel_err(f.grad, want[2]) <= 2e-3
    assert rel_err(e.grad.float(), want[1].float()) <= 2e-3


def test_the_centers_keep_their_dtype_and_no_low_precision_copy_persists():
    m = st.SoftTripleLoss(6, 16, 4, backend="triton").to(TRITON_DEVICE)
    emb = torch.randn(9, 16, device=TRITON_DEVICE).to(torch.bfloat16)
    y = torch.randint(0, 6, (9,), device=TRITON_DEVICE)
    m(emb, y).backward()
    assert m.fc.dtype == torch.float32 and m.fc.grad.dtype == torch.float32
    assert set(dict(m.named_buffers())) == set() and set(dict(m.named_parameters())) == {"fc"}
