"""Eager-mode autograd of the triton backend: torch.func transforms, forward mode, double backward.

torch.compile traces the custom ops of ops.py with their own registered autograd. In eager mode they are called
through the autograd.Functions below instead, because in torch 2.13 a custom op's registered autograd cannot take
part in torch.func transforms (the autograd.Function it generates has no setup_context: "must override the
setup_context staticmethod") and has no forward-mode rule (a dual tensor's tangent was silently dropped). With
these, on the same kernels:

- reverse mode: backward, torch.func.grad / vjp / jacrev, and vmap of all of them (vmap rules registered on the ops:
  with shared centers a batch of row sets is one launch on the stacked rows, otherwise one launch per element);
- forward mode (torch.func.jvp / jacfwd, torch.autograd.forward_ad) of the loss w.r.t. the embeddings, exactly:
  the rows are independent, so the tangent of row i is <dL_i/dx_i, t_i>, one backward pass with g = 1.
  W.r.t. the centers, and for the logits, there is no such rule: a NotImplementedError names backend="reference";
- a second derivative (double backward, hessian): a NotImplementedError names backend="reference" (the gradient
  itself, also with create_graph=True, is computed as usual).

Dynamo rejects an autograd.Function with a custom jvp, hence the split between compiled and eager calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from ._common import LossParams

_FORWARD_MODE_HINT = ("use backend='reference' for forward-mode AD (torch.func.jvp / jacfwd / hessian, "
                      "torch.autograd.forward_ad), or reverse mode (backward, torch.func.grad / vjp / jacrev), "
                      "which every backend supports")
_SECOND_ORDER = ("softtriple_loss / softtriple_logits with backend='triton' compute first derivatives only: "
                 "differentiating their gradient (a double backward after create_graph=True, torch.func.hessian, "
                 "grad of grad) is not supported; use backend='reference' for higher derivatives")


class _FirstOrderOnly(torch.autograd.Function):
    """Passes the gradients of a fused backward through, tied to its inputs, so that differentiating them again
    raises a clear error (instead of a silent zero or torch's "no autograd formula was registered")."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dx, dw, *anchors):
        return dx.clone(), dw.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_SECOND_ORDER)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_SECOND_ORDER)


def _first_order(backward_op, args, anchors):
    """backward_op(*args); when the gradient is being recorded (create_graph=True, torch.func), tied to the
    anchors through _FirstOrderOnly."""
    if not torch.is_grad_enabled():
        return backward_op(*args)
    with torch.no_grad():
        grads = backward_op(*args)
    return _FirstOrderOnly.apply(*grads, *anchors)


class _TritonLoss(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, fc, labels, K, la, gamma, margin, dtype, keep):
        return ops.loss_op(x, fc, labels, K, la, gamma, margin, dtype, keep)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, fc, labels, K, la, gamma, margin, dtype, keep = inputs
        _, lse, xp, wt, rw, factor, z = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero tensors for missing tangents / output grads
        saved = (x, xp, fc, wt, rw, labels, lse, factor, z)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.hyper = (K, la, gamma, margin)

    @staticmethod
    def _backward_args(ctx, g_rows):
        x, xp, fc, wt, rw, labels, lse, factor, z = ctx.saved_tensors
        from .fused import product_operand
        return (g_rows, product_operand(x, xp), fc, wt, rw, labels, lse, factor, z, *ctx.hyper), (x, fc)

    @staticmethod
    def backward(ctx, g_rows, *_):
        if g_rows is None:
            return (None,) * 9
        args, anchors = _TritonLoss._backward_args(ctx, g_rows)
        dx, dfc = _first_order(ops.loss_backward_op, args, anchors)
        return dx, dfc, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, t_x, t_fc, *_):
        if t_fc is not None:
            raise NotImplementedError("softtriple_loss(backend='triton') has a forward-mode rule w.r.t. the embeddings "
                                      "only, but fc has a tangent; " + _FORWARD_MODE_HINT)
        lse = ctx.saved_tensors[6]
        args, _ = _TritonLoss._backward_args(ctx, torch.ones_like(lse))
        dx = ops.loss_backward_op(*args)[0]
        return ((dx * t_x.to(dx.dtype)).sum(dim=1),) + (None,) * 6


class _TritonLogits(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, fc, K, gamma, dtype):
        return ops.logits_op(x, fc, K, gamma, dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, fc, K, gamma, dtype = inputs
        _, xp, wt, rw = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(x, xp, fc, wt, rw)
        ctx.hyper = (K, gamma)

    @staticmethod
    def backward(ctx, dS, *_):
        x, xp, fc, wt, rw = ctx.saved_tensors
        from .fused import product_operand
        dx, dfc = _first_order(ops.logits_backward_op,
                               (dS.contiguous(), product_operand(x, xp), fc, wt, rw, *ctx.hyper), (x, fc))
        return dx, dfc, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError("softtriple_logits(backend='triton') has no forward-mode rule; " + _FORWARD_MODE_HINT)


# --------------------------------------------------------------------------- vmap rules of the custom ops

def _pick(arg, dim, b):
    return arg.select(dim, b) if isinstance(arg, Tensor) and dim is not None else arg


def _per_element(op):
    """vmap rule: one call per batch element, outputs stacked along dim 0."""
    def rule(info, in_dims, *args):
        outs = [op(*(_pick(a, d, b) for a, d in zip(args, in_dims))) for b in range(info.batch_size)]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0
    return rule


def _stacked_rows(op, row_args, row_outputs):
    """vmap rule of a forward op whose rows are independent: with the centers unbatched, the batch's row sets
    (arguments at positions ``row_args``) are stacked into one call; outputs at ``row_outputs`` are per row (the
    others, the prepared centers, are shared: unbatched, or empty placeholders). Otherwise one call per element."""
    looped = _per_element(op)

    def rule(info, in_dims, *args):
        if any(d is not None for i, d in enumerate(in_dims) if i not in row_args):
            return looped(info, in_dims, *args)
        B = info.batch_size
        flat = list(args)
        n = 0
        for i in row_args:
            a, d = flat[i], in_dims[i]
            a = a.movedim(d, 0) if d is not None else a.expand(B, *a.shape)
            n = a.shape[1]
            flat[i] = a.reshape(B * n, *a.shape[2:])
        out = op(*flat)
        outs: list = []
        dims: list = []
        for j, o in enumerate(out):
            if j in row_outputs and o.numel():
                outs.append(o.reshape(B, n, *o.shape[1:]))
                dims.append(0)
            else:
                outs.append(o)
                dims.append(None)
        return tuple(outs), tuple(dims)
    return rule


ops.loss_op.register_vmap(_stacked_rows(ops.loss_op, row_args=(0, 2), row_outputs=(0, 1, 2, 5, 6)))
ops.logits_op.register_vmap(_stacked_rows(ops.logits_op, row_args=(0,), row_outputs=(0, 1)))
ops.loss_backward_op.register_vmap(_per_element(ops.loss_backward_op))
ops.logits_backward_op.register_vmap(_per_element(ops.logits_backward_op))


def triton_loss_rows(x: Tensor, fc: Tensor, labels: Tensor, p: LossParams, dtype: torch.dtype,
                     keep: bool) -> Tensor:
    """Per-row losses [N] from the fused kernels (x normalised, in the accumulation dtype; fc raw; products in
    ``dtype``; keep: gradients will be wanted, the forward may cache for the backward)."""
    if torch.compiler.is_compiling():
        return ops.loss_op(x, fc, labels, *p.astuple(), dtype, keep)[0]
    return _TritonLoss.apply(x, fc, labels, *p.astuple(), dtype, keep)[0]


def triton_logits(x: Tensor, fc: Tensor, p: LossParams, dtype: torch.dtype) -> Tensor:
    """S [N, C] from the fused kernels (uses p.K and p.gamma)."""
    if torch.compiler.is_compiling():
        return ops.logits_op(x, fc, p.K, p.gamma, dtype)[0]
    return _TritonLogits.apply(x, fc, p.K, p.gamma, dtype)[0]
