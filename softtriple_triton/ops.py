"""torch.library registration of the fused Triton backend (layer 2: op schemas, fake implementations, autograd).

Four opaque custom ops, each with a fake (meta) implementation so ``torch.compile(fullgraph=True)`` traces through
them without graph breaks, and autograd formulas that call the backward ops:

    softtriple_triton::loss(x, fc, labels, K, la, gamma, margin, dtype, keep)
        -> (loss_rows [N], lse [N], xp, wt, rw, factor, z)
    softtriple_triton::loss_backward(g, xp, fc, wt, rw, labels, lse, factor, z, K, la, gamma, margin) -> (dx, dfc)
    softtriple_triton::logits(x, fc, K, gamma, dtype) -> (S [N, C], xp, wt, rw)
    softtriple_triton::logits_backward(dS, xp, fc, wt, rw, K, gamma) -> (dx, dfc)

x is the (already normalised) embedding matrix in the accumulation dtype (fp32, fp64 for fp64 inputs), fc the
user's raw centers [d, C*K], dtype the product dtype (functional.product_dtype). xp (x in the product dtype), wt
(the column-normalised centers stored row-wise, in the product dtype) and rw (inverse column norms) are internal
outputs kept for the backward, as are the forward's cache (factor, z: the gradient factor and the class logits,
empty unless keep and the cache fits its budget; see fused.py). dx comes back in the accumulation dtype: the
embeddings' own dtype is applied by autograd after the normalisation's backward, so a large gradient of fp16
embeddings is scaled by 1/||e|| before it is rounded to fp16. What each op computes is in fused.py.
Implementations are registered for CUDA (compiled kernels) and CPU (the same kernels through Triton's interpreter,
TRITON_INTERPRET=1, launches serialised across threads; an explicit error otherwise). In eager mode the API calls
these ops through triton_autograd.py (torch.func support); torch.compile calls them directly.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from . import fused
from ._common import LossParams, acc_dtype


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


def _capturing() -> bool:
    """bench/gpu_static.py runs the real implementations on fake tensors to record the kernel launches."""
    if not TRITON_AVAILABLE:
        return False
    from .kernels.target import capturing
    return capturing()


# ----------------------------------------------------------------------------------------------------- loss
@torch.library.custom_op("softtriple_triton::loss", mutates_args=(), device_types=_DEVICES)
def loss_op(x: Tensor, fc: Tensor, labels: Tensor, K: int, la: float, gamma: float, margin: float,
            dtype: torch.dtype, keep: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _require_triton()
    return fused.loss_forward(x, fc, labels, LossParams(K, la, gamma, margin), dtype, keep)


@loss_op.register_fake
def _(x, fc, labels, K, la, gamma, margin, dtype, keep):
    p = LossParams(K, la, gamma, margin)
    if _capturing():
        return fused.loss_forward(x, fc, labels, p, dtype, keep)
    n, C = x.shape[0], fc.shape[1] // K
    if keep and fused.cache_fits(n, C, K, dtype, x.device):
        from .kernels.forward import factor_dtype
        cache = (x.new_empty((n, C * K), dtype=factor_dtype(dtype)), x.new_empty((n, C)))
    else:
        cache = (x.new_empty((0,)), x.new_empty((0,)))
    return (x.new_empty((n,)), x.new_empty((n,))) + _fake_prepared(x, fc, dtype) + cache


def _fake_prepared(x, fc, dtype):
    M = fc.shape[1]
    xp = x.new_empty(x.shape if dtype != x.dtype else (0,), dtype=dtype)
    return xp, x.new_empty((M, x.shape[1]), dtype=dtype), x.new_empty((M,))


@torch.library.custom_op("softtriple_triton::loss_backward", mutates_args=(), device_types=_DEVICES)
def loss_backward_op(g: Tensor, xp: Tensor, fc: Tensor, wt: Tensor, rw: Tensor, labels: Tensor, lse: Tensor,
                     factor: Tensor, z: Tensor, K: int, la: float, gamma: float,
                     margin: float) -> tuple[Tensor, Tensor]:
    _require_triton()
    return fused.backward(xp, fc, wt, rw, labels, g, lse, None, LossParams(K, la, gamma, margin), factor, z)


@loss_backward_op.register_fake
def _(g, xp, fc, wt, rw, labels, lse, factor, z, K, la, gamma, margin):
    if _capturing():
        return fused.backward(xp, fc, wt, rw, labels, g, lse, None, LossParams(K, la, gamma, margin), factor, z)
    return xp.new_empty(xp.shape, dtype=acc_dtype(xp.dtype)), torch.empty_like(fc)


def _loss_setup(ctx, inputs, output):
    x, fc, labels, K, la, gamma, margin, dtype, keep = inputs
    _, lse, xp, wt, rw, factor, z = output
    ctx.save_for_backward(fused.product_operand(x, xp), fc, wt, rw, labels, lse, factor, z)
    ctx.hyper = (K, la, gamma, margin)


def _loss_backward(ctx, g_rows, g_lse, g_xp, g_wt, g_rw, g_factor, g_z):
    # lse, xp, wt, rw, factor and z are internal outputs (saved for the backward); no public function exposes them.
    xp, fc, wt, rw, labels, lse, factor, z = ctx.saved_tensors
    if g_rows is None:
        g_rows = torch.zeros_like(lse)
    dx, dfc = loss_backward_op(g_rows, xp, fc, wt, rw, labels, lse, factor, z, *ctx.hyper)
    return dx, dfc, None, None, None, None, None, None, None


loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


# --------------------------------------------------------------------------------------------------- logits
@torch.library.custom_op("softtriple_triton::logits", mutates_args=(), device_types=_DEVICES)
def logits_op(x: Tensor, fc: Tensor, K: int, gamma: float,
              dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _require_triton()
    return fused.logits_forward(x, fc, LossParams(K, 1.0, gamma, 0.0), dtype)


@logits_op.register_fake
def _(x, fc, K, gamma, dtype):
    if _capturing():
        return fused.logits_forward(x, fc, LossParams(K, 1.0, gamma, 0.0), dtype)
    return (x.new_empty((x.shape[0], fc.shape[1] // K)),) + _fake_prepared(x, fc, dtype)


@torch.library.custom_op("softtriple_triton::logits_backward", mutates_args=(), device_types=_DEVICES)
def logits_backward_op(dS: Tensor, xp: Tensor, fc: Tensor, wt: Tensor, rw: Tensor, K: int,
                       gamma: float) -> tuple[Tensor, Tensor]:
    _require_triton()
    return fused.backward(xp, fc, wt, rw, None, None, None, dS, LossParams(K, 1.0, gamma, 0.0))


@logits_backward_op.register_fake
def _(dS, xp, fc, wt, rw, K, gamma):
    if _capturing():
        return fused.backward(xp, fc, wt, rw, None, None, None, dS, LossParams(K, 1.0, gamma, 0.0))
    return xp.new_empty(xp.shape, dtype=acc_dtype(xp.dtype)), torch.empty_like(fc)


def _logits_setup(ctx, inputs, output):
    x, fc, K, gamma, dtype = inputs
    _, xp, wt, rw = output
    ctx.save_for_backward(fused.product_operand(x, xp), fc, wt, rw)
    ctx.hyper = (K, gamma)


def _logits_backward(ctx, dS, g_xp, g_wt, g_rw):
    xp, fc, wt, rw = ctx.saved_tensors
    if dS is None:
        return None, None, None, None, None
    dx, dfc = logits_backward_op(dS.contiguous(), xp, fc, wt, rw, *ctx.hyper)
    return dx, dfc, None, None, None


logits_op.register_autograd(_logits_backward, setup_context=_logits_setup)
