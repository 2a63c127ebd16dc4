"""torch.autograd.gradcheck (fp64 finite differences) through the fused backends' hand-written backwards."""

import pytest
import torch

import softtriple_triton as st
from conftest import TORCH_DEVICES, TRITON_DEVICE, make_inputs

BACKEND_DEVICES = [("triton", TRITON_DEVICE)] + [("torch", dev) for dev in TORCH_DEVICES]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("K,reduction", [(1, "mean"), (3, "none"), (4, "sum")])
def test_gradcheck_loss(backend, device, K, reduction):
    x, w, y = make_inputs(9, 7, 5, K, device=device, seed=K)
    x.requires_grad_(True)
    w.requires_grad_(True)

    def fn(a, b):
        return st.softtriple_loss(a, b, y, K, la=8.0, gamma=0.2, tau=0.3, margin=0.05, reduction=reduction,
                                  backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_gradcheck_logits(backend, device):
    x, w, _ = make_inputs(6, 5, 4, 3, device=device, seed=1)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: st.softtriple_logits(a, b, 3, gamma=0.25, backend=backend),
                                    (x, w), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_every_triton_backward(triton_path):
    x, w, y = make_inputs(9, 7, 5, 3, device=TRITON_DEVICE, seed=4)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: st.softtriple_loss(a, b, y, 3, la=8.0, gamma=0.2, tau=0.3,
                                                                    reduction="none", backend="triton"),
                                    (x, w), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_regularizer():
    _, w, _ = make_inputs(1, 6, 3, 4, seed=2)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b: st.center_regularizer(b, 4), (w,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_catches_a_wrong_backward():
    """The check above can fail: a backward off by 1% is rejected."""

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return (a * a).sum()

        @staticmethod
        def backward(ctx, g):
            (a,) = ctx.saved_tensors
            return g * 2.02 * a

    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert not torch.autograd.gradcheck(Wrong.apply, (a,), raise_exception=False)
