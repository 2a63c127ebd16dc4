"""torch.library registration of the fused Triton kernels (layer 2: forward/backward wiring).

Four opaque custom ops, each with a fake (meta) implementation so ``torch.compile(fullgraph=True)``
traces through them without graph breaks, and autograd formulas that call the backward ops:

    softtriple_triton::loss(x, w, rw, labels, K, la, gamma, margin) -> (loss_rows [N], lse [N])
    softtriple_triton::loss_backward(g, x, w, rw, labels, lse, K, la, gamma, margin) -> (dx, dw, drw)
    softtriple_triton::logits(x, w, rw, K, gamma) -> S [N, C]
    softtriple_triton::logits_backward(dS, x, w, rw, K, gamma) -> (dx, dw, drw)

x is the (already normalised) embedding matrix, w the raw centers [d, C*K] and rw their inverse column
norms in the accumulation dtype; the column normalisation's backward is autograd's, through rw.
Implementations are registered per device: CUDA runs the compiled kernels, CPU runs the same kernels
through Triton's interpreter (TRITON_INTERPRET=1; an explicit error otherwise; launches serialised across threads).
In eager mode the API calls these ops through triton_autograd.py (torch.func support); torch.compile calls
them directly.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from ._common import acc_dtype, interpreter_serialised

def _triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


TRITON_AVAILABLE = _triton_available()
_DEVICES = ("cuda", "cpu")


def _require_triton():
    if not TRITON_AVAILABLE:
        raise RuntimeError("backend='triton' needs the 'triton' package (pip install 'softtriple-triton[triton]'); "
                           "backend='torch' runs without it")


@torch.library.custom_op("softtriple_triton::loss", mutates_args=(), device_types=_DEVICES)
def loss_op(x: Tensor, w: Tensor, rw: Tensor, labels: Tensor, K: int, la: float, gamma: float,
            margin: float) -> tuple[Tensor, Tensor]:
    _require_triton()
    from .kernels.forward import softtriple_forward
    with interpreter_serialised():
        return softtriple_forward(x, w, rw, labels, K, la, gamma, margin)


@loss_op.register_fake
def _(x, w, rw, labels, K, la, gamma, margin):
    n = x.shape[0]
    return x.new_empty((n,), dtype=acc_dtype(x.dtype, w.dtype)), x.new_empty((n,), dtype=acc_dtype(x.dtype, w.dtype))


@torch.library.custom_op("softtriple_triton::loss_backward", mutates_args=(), device_types=_DEVICES)
def loss_backward_op(g: Tensor, x: Tensor, w: Tensor, rw: Tensor, labels: Tensor, lse: Tensor, K: int,
                     la: float, gamma: float, margin: float) -> tuple[Tensor, Tensor, Tensor]:
    _require_triton()
    from .kernels.backward_w import softtriple_backward_w
    from .kernels.backward_x import softtriple_backward_x
    g = g.to(lse.dtype).contiguous()
    with interpreter_serialised():
        dx = softtriple_backward_x(x, w, rw, labels, g, lse, None, K, la, gamma, margin)
        dw, drw = softtriple_backward_w(x, w, rw, labels, g, lse, None, K, la, gamma, margin)
    return dx.to(x.dtype), dw.to(w.dtype), drw


@loss_backward_op.register_fake
def _(g, x, w, rw, labels, lse, K, la, gamma, margin):
    return torch.empty_like(x), torch.empty_like(w), torch.empty_like(rw)


def _loss_setup(ctx, inputs, output):
    x, w, rw, labels, K, la, gamma, margin = inputs
    ctx.save_for_backward(x, w, rw, labels, output[1])
    ctx.hyper = (K, la, gamma, margin)


def _loss_backward(ctx, g_loss, g_lse):
    # lse is an internal output (saved for the backward); no public function exposes it.
    x, w, rw, labels, lse = ctx.saved_tensors
    if g_loss is None:
        g_loss = torch.zeros_like(lse)
    dx, dw, drw = loss_backward_op(g_loss, x, w, rw, labels, lse, *ctx.hyper)
    return dx, dw, drw, None, None, None, None, None


loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


@torch.library.custom_op("softtriple_triton::logits", mutates_args=(), device_types=_DEVICES)
def logits_op(x: Tensor, w: Tensor, rw: Tensor, K: int, gamma: float) -> Tensor:
    _require_triton()
    from .kernels.forward import softtriple_logits_forward
    with interpreter_serialised():
        return softtriple_logits_forward(x, w, rw, K, gamma)


@logits_op.register_fake
def _(x, w, rw, K, gamma):
    return x.new_empty((x.shape[0], w.shape[1] // K), dtype=acc_dtype(x.dtype, w.dtype))


@torch.library.custom_op("softtriple_triton::logits_backward", mutates_args=(), device_types=_DEVICES)
def logits_backward_op(dS: Tensor, x: Tensor, w: Tensor, rw: Tensor, K: int,
                       gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    _require_triton()
    from .kernels.backward_w import softtriple_backward_w
    from .kernels.backward_x import softtriple_backward_x
    dS = dS.to(rw.dtype)
    with interpreter_serialised():
        dx = softtriple_backward_x(x, w, rw, None, None, None, dS, K, 1.0, gamma, 0.0)
        dw, drw = softtriple_backward_w(x, w, rw, None, None, None, dS, K, 1.0, gamma, 0.0)
    return dx.to(x.dtype), dw.to(w.dtype), drw


@logits_backward_op.register_fake
def _(dS, x, w, rw, K, gamma):
    return torch.empty_like(x), torch.empty_like(w), torch.empty_like(rw)


def _logits_setup(ctx, inputs, output):
    x, w, rw, K, gamma = inputs
    ctx.save_for_backward(x, w, rw)
    ctx.hyper = (K, gamma)


def _logits_backward(ctx, dS):
    x, w, rw = ctx.saved_tensors
    dx, dw, drw = logits_backward_op(dS.contiguous(), x, w, rw, *ctx.hyper)
    return dx, dw, drw, None, None


logits_op.register_autograd(_logits_backward, setup_context=_logits_setup)
