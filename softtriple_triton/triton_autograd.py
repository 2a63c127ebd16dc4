"""Eager-mode autograd of the triton backend: torch.func transforms, forward mode, double backward.

torch.compile traces the custom ops of ops.py with their own registered autograd. In eager mode they are called
through the autograd.Functions below instead, because in torch 2.13 a custom op's registered autograd cannot take
part in torch.func transforms (the autograd.Function it generates has no setup_context: "must override the
setup_context staticmethod") and has no forward-mode rule (a dual tensor's tangent was silently dropped). With
these, on the same kernels:

- reverse mode: backward, torch.func.grad / vjp / jacrev, and vmap of all of them (vmap rules registered on the ops:
  with shared centers a batch of row sets is one launch on the stacked rows, otherwise one launch per element);
- forward mode (torch.func.jvp / jacfwd, torch.autograd.forward_ad) of the loss w.r.t. the embeddings, exactly:
  the rows are independent, so the tangent of row i is <dL_i/dx_i, t_i>, one backward-kernel pass with g = 1.
  W.r.t. the centers, and for the logits, there is no such rule: a NotImplementedError names backend="reference";
- a second derivative (double backward, hessian): a NotImplementedError names backend="reference" (the gradient
  itself, also with create_graph=True, is computed as usual).

Dynamo rejects an autograd.Function with a custom jvp, hence the split between compiled and eager calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops

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
    def forward(dx, dw, drw, *anchors):
        return dx.clone(), dw.clone(), drw.clone()

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
    def forward(x, w, rw, labels, K, la, gamma, margin):
        return ops.loss_op(x, w, rw, labels, K, la, gamma, margin)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, rw, labels, K, la, gamma, margin = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero tensors for missing tangents / output grads
        ctx.save_for_backward(x, w, rw, labels, output[1])
        ctx.save_for_forward(x, w, rw, labels, output[1])
        ctx.hyper = (K, la, gamma, margin)

    @staticmethod
    def backward(ctx, g_rows, g_lse):
        x, w, rw, labels, lse = ctx.saved_tensors
        if g_rows is None:
            g_rows = torch.zeros_like(lse)
        dx, dw, drw = _first_order(ops.loss_backward_op, (g_rows, x, w, rw, labels, lse, *ctx.hyper), (x, w, rw))
        return dx, dw, drw, None, None, None, None, None

    @staticmethod
    def jvp(ctx, t_x, t_w, t_rw, *_):
        if t_w is not None or t_rw is not None:
            raise NotImplementedError("softtriple_loss(backend='triton') has a forward-mode rule w.r.t. the embeddings "
                                      "only, but fc has a tangent; " + _FORWARD_MODE_HINT)
        x, w, rw, labels, lse = ctx.saved_tensors
        dx = ops.loss_backward_op(torch.ones_like(lse), x, w, rw, labels, lse, *ctx.hyper)[0]
        return (dx.to(lse.dtype) * t_x.to(lse.dtype)).sum(dim=1), None


class _TritonLogits(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, rw, K, gamma):
        return ops.logits_op(x, w, rw, K, gamma)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, rw, K, gamma = inputs
        ctx.save_for_backward(x, w, rw)
        ctx.hyper = (K, gamma)

    @staticmethod
    def backward(ctx, dS):
        x, w, rw = ctx.saved_tensors
        dx, dw, drw = _first_order(ops.logits_backward_op, (dS.contiguous(), x, w, rw, *ctx.hyper), (x, w, rw))
        return dx, dw, drw, None, None

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


def _stacked_rows(op, row_args):
    """vmap rule of a forward op whose rows are independent: with the centers unbatched, the batch's row sets
    (arguments at positions ``row_args``) are stacked into one call; otherwise one call per element."""
    looped = _per_element(op)

    def rule(info, in_dims, *args):
        if any(d is not None for i, d in enumerate(in_dims) if i not in row_args):
            return looped(info, in_dims, *args)
        B = info.batch_size
        args = list(args)
        n = None
        for i in row_args:
            a, d = args[i], in_dims[i]
            a = a.movedim(d, 0) if d is not None else a.expand(B, *a.shape)
            n = a.shape[1]
            args[i] = a.reshape(B * n, *a.shape[2:])
        out = op(*args)
        if isinstance(out, tuple):
            return tuple(o.reshape(B, n, *o.shape[1:]) for o in out), (0,) * len(out)
        return out.reshape(B, n, *out.shape[1:]), 0
    return rule


ops.loss_op.register_vmap(_stacked_rows(ops.loss_op, row_args=(0, 3)))
ops.logits_op.register_vmap(_stacked_rows(ops.logits_op, row_args=(0,)))
ops.loss_backward_op.register_vmap(_per_element(ops.loss_backward_op))
ops.logits_backward_op.register_vmap(_per_element(ops.logits_backward_op))


def triton_loss_rows(x: Tensor, w: Tensor, rw: Tensor, labels: Tensor, K: int, la: float, gamma: float,
                     margin: float) -> Tensor:
    """Per-row losses [N] from the fused kernels (x normalised, w raw, rw its inverse column norms)."""
    if torch.compiler.is_compiling():
        return ops.loss_op(x, w, rw, labels, K, la, gamma, margin)[0]
    return _TritonLoss.apply(x, w, rw, labels, K, la, gamma, margin)[0]


def triton_logits(x: Tensor, w: Tensor, rw: Tensor, K: int, gamma: float) -> Tensor:
    """S [N, C] from the fused kernels."""
    if torch.compiler.is_compiling():
        return ops.logits_op(x, w, rw, K, gamma)
    return _TritonLogits.apply(x, w, rw, K, gamma)
