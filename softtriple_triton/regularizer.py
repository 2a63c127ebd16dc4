"""The center regulariser in O(C*K^2*d) by per-class blocks (never the (C*K) x (C*K) Gram matrix).

reg = sum_c sum_{k<k'} sqrt(2 + 1e-5 - 2 <w_ck, w_ck'>) / (C*K*(K-1)), centers column-normalised.

Computed in fp32 (fp64 for fp64 centers) whatever the parameter dtype: in fp16, 2 + 1e-5 rounds to 2
and the square root of a rounding error would give NaN gradients.

Hand-written backward (any device): with D_kk' = sqrt(2 + 1e-5 - 2 G_kk') for the class's Gram block G,
d reg / d wn_c = wn_c B_c with B_c = -(U + U^T) / (C K (K-1)), U_kk' = 1 / D_kk' for k < k' (else 0), then
through the column normalisation dw = rw (dwn - wn (wn . dwn)). The class blocks are strided [d, K] views of
the centers' own layout (bmm reads them in place; transposed copies of the centers cost more than the products),
and the column dots are done in blocks of rows. Memory: the [C, K, K] blocks (and, for low-precision centers, one
fp32 copy).

Centers with entries above ~1e19 (fp32) would overflow the squares: on CPU a check of the column sums of squares
(free there) sends them to the same computation on columns divided by a power of two (exact, and the regulariser
is invariant to the scale of each column); elsewhere (CUDA, torch.compile), where that check would cost a
host sync or a graph break, the columns are always scaled (one extra pass over the centers).

Under torch.func transforms the same value is computed by plain differentiable torch ops (autograd-native:
grad, vmap, jvp, hessian all work); forward-mode AD in eager mode uses the exact rule of a scalar function,
jvp = <d reg / d fc, tangent>, and a double backward differentiates the plain formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import acc_dtype, inverse_column_norms, pow2_scale
from ._validation import check_centers
from .reference import REG_EPS


def column_dots(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """sum_d a[d, j] * b[d, j] for every column j, in ``dtype``, in blocks of rows.

    torch.linalg.vecdot(a, b, dim=0) materialises a * b: a fresh d x M temporary whose page faults cost more
    than the arithmetic on CPU (~9 ms at [512, 10000], one thread); blocks of about 2^20 elements stay small
    and are reused by the allocator.
    """
    rows = max(8, (1 << 20) // max(1, a.shape[1]))
    out = torch.zeros(a.shape[1], dtype=dtype, device=a.device)
    for r in range(0, a.shape[0], rows):
        out += torch.linalg.vecdot(a[r:r + rows].to(dtype), b[r:r + rows].to(dtype), dim=0)
    return out


def needs_pow2_scale(f: Tensor, sumsq: Tensor) -> bool:
    """Whether the columns must be scaled before the Gram blocks: on CPU (eager), only if a column's sum of squares
    is not finite or so large that rw^2 would leave the normal range; elsewhere always (no host sync)."""
    if f.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    return not bool(sumsq.max() < _SAFE_SUMSQ[f.dtype])


# below these, rw^2 = 1 / sumsq stays a normal number and the Gram entries (<= sumsq) are finite
_SAFE_SUMSQ = {torch.float32: 2.0 ** 96, torch.float64: 2.0 ** 768}


class _CenterRegularizer(torch.autograd.Function):
    """Hand-written forward and backward (what torch.compile traces: dynamo takes no custom jvp)."""

    @staticmethod
    def forward(ctx, fc: Tensor, K: int) -> Tensor:
        d, M = fc.shape
        C = M // K
        acc = acc_dtype(fc.dtype)
        f = fc if fc.dtype == acc else fc.to(acc)  # low-precision centers: one fp32 copy
        sumsq = column_dots(f, f, acc)
        s = None
        if needs_pow2_scale(f, sumsq):  # huge centers: exact power-of-two column scales, reg(f / s) = reg(f)
            s = pow2_scale(f, 0)
            f = f / s
            sumsq = column_dots(f, f, acc)
        rw = sumsq.sqrt_().clamp_min_(1e-12).reciprocal_()
        blocks = f.view(d, C, K).permute(1, 0, 2)  # [C, d, K] strided views: no copy of the centers
        rwb = rw.view(C, K)
        gram = torch.bmm(blocks.transpose(1, 2), blocks).mul_(rwb.unsqueeze(2)).mul_(rwb.unsqueeze(1))  # [C, K, K]
        iu0, iu1 = torch.triu_indices(K, K, offset=1, device=fc.device)
        dist = torch.sqrt(2.0 + REG_EPS - 2.0 * gram[:, iu0, iu1])  # [C, K(K-1)/2]
        scale = 1.0 / (C * K * (K - 1.0))
        ctx.save_for_backward(fc, f, rw, dist, s)
        ctx.save_for_forward(fc, f, rw, dist, s)
        ctx.meta = (K, scale, fc.dtype)
        return dist.sum() * scale

    @staticmethod
    def backward(ctx, g: Tensor):
        fc, f, rw, dist, s = ctx.saved_tensors
        K = ctx.meta[0]
        if torch.is_grad_enabled():  # create_graph=True: a gradient that can itself be differentiated
            with torch.enable_grad():
                (dfc,) = torch.autograd.grad(_plain_regularizer(fc, K), fc, g, create_graph=True)
            return dfc, None
        return _gradient(ctx, f, rw, dist, s, g), None


def _gradient(ctx, f: Tensor, rw: Tensor, dist: Tensor, s: Tensor | None, g: Tensor) -> Tensor:
    K, scale, fc_dtype = ctx.meta
    d, M = f.shape
    C = M // K
    rwb = rw.view(C, K)
    iu0, iu1 = torch.triu_indices(K, K, offset=1, device=f.device)
    B = torch.zeros((C, K, K), dtype=f.dtype, device=f.device)
    B[:, iu0, iu1] = dist.reciprocal() * (-scale * g.to(f.dtype))
    # P = f_c diag(rw) (B + B^T) diag(rw) = rw_j * d reg / d wn_j, column by column
    B = (B + B.transpose(1, 2)).mul_(rwb.unsqueeze(2)).mul_(rwb.unsqueeze(1))
    blocks = f.view(d, C, K).permute(1, 0, 2)
    if torch.compiler.is_compiling():  # dynamo does not trace a non-contiguous out=
        P = torch.bmm(blocks, B).permute(1, 0, 2).reshape(d, M)
    else:  # written straight into the [d, C*K] layout
        P = torch.empty_like(f)
        torch.bmm(blocks, B, out=P.view(d, C, K).permute(1, 0, 2))
    # through the column normalisation: dw_j = rw_j (dwn_j - wn_j (wn_j . dwn_j)) = P_j - rw_j^2 (f_j . P_j) f_j
    P.addcmul_(f, (rw * rw * column_dots(f, P, f.dtype)).unsqueeze(0), value=-1.0)
    if s is not None:  # f = fc / s: d reg / d fc = (d reg / d f) / s
        P.div_(s)
    return P.to(fc_dtype)


class _EagerCenterRegularizer(_CenterRegularizer):
    """Eager mode: adds forward-mode AD. reg is a scalar, so its jvp is <d reg / d fc, tangent>: exact."""

    @staticmethod
    def jvp(ctx, t_fc: Tensor, _t_K):
        fc, f, rw, dist, s = ctx.saved_tensors
        grad = _gradient(ctx, f, rw, dist, s, torch.ones((), dtype=f.dtype, device=f.device))
        return (grad.to(f.dtype) * t_fc.to(f.dtype)).sum()


def _plain_regularizer(fc: Tensor, K: int) -> Tensor:
    """The same value by plain differentiable ops on normalised columns (under torch.func transforms, and for a
    double backward). Memory: one normalised [d, C*K] copy and the [C, K, K] blocks."""
    d, M = fc.shape
    C = M // K
    f = fc.to(acc_dtype(fc.dtype))
    wn = f * inverse_column_norms(f)
    blocks = wn.reshape(d, C, K).permute(1, 0, 2)
    gram = torch.matmul(blocks.transpose(1, 2), blocks)
    iu0, iu1 = torch.triu_indices(K, K, offset=1, device=fc.device)
    return torch.sqrt(2.0 + REG_EPS - 2.0 * gram[:, iu0, iu1]).sum() / (C * K * (K - 1.0))


def center_regularizer(fc: Tensor, centers_per_class: int) -> Tensor:
    """sum_c sum_{k<k'} sqrt(2 + 1e-5 - 2 <w_ck, w_ck'>) / (C*K*(K-1)) over the classes of ``fc`` [d, C*K].

    Differentiable (also under torch.func transforms, forward mode and double backward); returns 0 when K == 1.
    The result is fp32 (fp64 for fp64 centers). ``fc`` and ``centers_per_class`` are checked as by the loss.
    """
    K = check_centers(fc, centers_per_class)
    if K == 1:
        return fc.new_zeros((), dtype=acc_dtype(fc.dtype))
    if torch.compiler.is_compiling():
        return _CenterRegularizer.apply(fc, K)
    if torch._C._are_functorch_transforms_active() or fc.device.type == "meta":
        return _plain_regularizer(fc, K)
    return _EagerCenterRegularizer.apply(fc, K)
