"""backend="torch": memory-bounded PyTorch implementation with a hand-written backward (any device).

The N x (C*K) similarities are processed in chunks of whole classes, at most ``chunk_bytes`` per
temporary. The forward keeps an online log-sum-exp across chunks. The backward needs, per chunk,
dL/ds = g * la * (q - onehot) * p * (1 + (s - S) / gamma): when the whole factor
a = p * (1 + (s - S) / gamma) (N x C*K) plus the logits (N x C) fit in ``cache_bytes`` they are kept
from the forward, so forward + backward cost exactly three matrix products; otherwise the backward
recomputes each chunk from the inputs (four matrix products, memory O(N * chunk)).

The column normalisation of the centers is folded in: s = (x @ w) * rw with rw = 1 / ||w_j||, and
its backward dw = V - w * rw^2 * (w . V) with V = x^T @ (ds * rw) is done here, not by autograd, so no
normalised copy of the centers is made. Embedding normalisation (N x d, cheap) is left to autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_BYTES = 64 << 20   # largest N x chunk temporary
DEFAULT_CACHE_BYTES = 512 << 20  # largest forward cache kept for the backward

_config = {"chunk_bytes": DEFAULT_CHUNK_BYTES, "cache_bytes": DEFAULT_CACHE_BYTES}


def set_memory_budget(chunk_bytes: int | None = None, cache_bytes: int | None = None) -> dict:
    """Change the torch backend's memory budget; returns the previous values.

    chunk_bytes bounds each N x chunk temporary; cache_bytes bounds what the forward keeps for the
    backward (0 = always recompute in the backward).
    """
    old = dict(_config)
    if chunk_bytes is not None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        _config["chunk_bytes"] = int(chunk_bytes)
    if cache_bytes is not None:
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        _config["cache_bytes"] = int(cache_bytes)
    return old


def _inverse_norms(w: Tensor) -> Tensor:
    # F.normalize semantics: w / max(||w||, 1e-12)
    return torch.linalg.vector_norm(w, dim=0).clamp_min(1e-12).reciprocal()


def _chunk_classes(N: int, C: int, K: int, itemsize: int) -> int:
    per_class = max(1, N * K * itemsize)
    return max(1, min(C, _config["chunk_bytes"] // per_class))


def _chunk_similarity(x: Tensor, w: Tensor, rw: Tensor, c0: int, c1: int, K: int, inv_gamma: float):
    """s [N, m, K], p [N, m, K], S [N, m] for classes c0..c1."""
    cols = slice(c0 * K, c1 * K)
    s = torch.mm(x, w[:, cols]).mul_(rw[cols]).view(x.shape[0], c1 - c0, K)
    p = torch.softmax(s * inv_gamma, dim=2)
    S = torch.linalg.vecdot(p, s, dim=2)
    return s, p, S


def _chunk_logits(S: Tensor, labels: Tensor, c0: int, la: float, margin: float) -> Tensor:
    z = S * la
    rel = labels - c0
    own = (rel >= 0) & (rel < S.shape[1])
    z.view(-1)[torch.arange(S.shape[0], device=S.device) * S.shape[1] + rel.clamp(0, S.shape[1] - 1)] -= \
        la * margin * own.to(z.dtype)
    return z


def _grad_factor(s: Tensor, p: Tensor, S: Tensor, inv_gamma: float) -> Tensor:
    """a = p * (1 + (s - S) / gamma), computed in place on a copy of s."""
    a = s - S.unsqueeze(2)
    a.mul_(inv_gamma).add_(1.0).mul_(p)
    return a


class _TorchLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, labels, K, la, gamma, margin):
        acc = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
        xa, wa = x.to(acc), w.to(acc)
        N, M = x.shape[0], w.shape[1]
        C = M // K
        inv_gamma = 1.0 / gamma
        rw = _inverse_norms(wa)
        need_grad = any(ctx.needs_input_grad[:2])
        itemsize = xa.element_size()
        cache = need_grad and N * (M + C) * itemsize <= _config["cache_bytes"]
        step = _chunk_classes(N, C, K, itemsize)
        m_run = torch.full((N,), float("-inf"), dtype=acc, device=x.device)
        l_run = torch.zeros((N,), dtype=acc, device=x.device)
        zt = torch.zeros((N,), dtype=acc, device=x.device)
        cached = []
        for c0 in range(0, C, step):
            c1 = min(C, c0 + step)
            s, p, S = _chunk_similarity(xa, wa, rw, c0, c1, K, inv_gamma)
            z = _chunk_logits(S, labels, c0, la, margin)
            rel = labels - c0
            own = (rel >= 0) & (rel < c1 - c0)
            zt += torch.where(own, z.gather(1, rel.clamp(0, c1 - c0 - 1).unsqueeze(1)).squeeze(1), 0.0)
            m_new = torch.maximum(m_run, z.amax(dim=1))
            l_run = l_run * torch.exp(m_run - m_new) + torch.exp(z - m_new.unsqueeze(1)).sum(dim=1)
            m_run = m_new
            if cache:
                cached.append((z, _grad_factor(s, p, S, inv_gamma)))
            del s, p, S
        lse = m_run + torch.log(l_run)
        ctx.save_for_backward(xa, wa, rw, labels, lse)
        ctx.hyper = (K, la, inv_gamma, margin, step, x.dtype, w.dtype)
        ctx.cached = cached if cache else None
        return lse - zt

    @staticmethod
    def backward(ctx, g):
        xa, wa, rw, labels, lse = ctx.saved_tensors
        K, la, inv_gamma, margin, step, x_dtype, w_dtype = ctx.hyper
        N, M = xa.shape[0], wa.shape[1]
        C = M // K
        gla = (g.to(lse.dtype) * la).unsqueeze(1)
        dx = torch.zeros_like(xa)
        V = torch.empty_like(wa)
        for i, c0 in enumerate(range(0, C, step)):
            c1 = min(C, c0 + step)
            if ctx.cached is not None:
                z, a = ctx.cached[i]
            else:
                s, p, S = _chunk_similarity(xa, wa, rw, c0, c1, K, inv_gamma)
                z = _chunk_logits(S, labels, c0, la, margin)
                a = _grad_factor(s, p, S, inv_gamma)
                del s, p, S
            gS = torch.exp(z - lse.unsqueeze(1))
            rel = labels - c0
            own = (rel >= 0) & (rel < c1 - c0)
            gS.view(-1)[torch.arange(N, device=gS.device) * (c1 - c0) + rel.clamp(0, c1 - c0 - 1)] -= own.to(gS.dtype)
            gS.mul_(gla)
            cols = slice(c0 * K, c1 * K)
            ds = a.mul_(gS.unsqueeze(2)).view(N, -1).mul_(rw[cols])  # dL/du, in place of the cache
            dx.addmm_(ds, wa[:, cols].t())
            torch.mm(xa.t(), ds, out=V[:, cols])
            del z, a, gS, ds
        ctx.cached = None
        # through the column normalisation rw = 1/||w||: dw = V - w * rw^2 * (w . V), V = x^T @ (ds * rw)
        dw = V.sub_(wa * (rw * rw * torch.linalg.vecdot(wa, V, dim=0)))
        return dx.to(x_dtype), dw.to(w_dtype), None, None, None, None, None


class _TorchLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, K, gamma):
        acc = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
        xa, wa = x.to(acc), w.to(acc)
        N, M = x.shape[0], w.shape[1]
        C = M // K
        rw = _inverse_norms(wa)
        step = _chunk_classes(N, C, K, xa.element_size())
        out = torch.empty((N, C), dtype=acc, device=x.device)
        for c0 in range(0, C, step):
            c1 = min(C, c0 + step)
            out[:, c0:c1] = _chunk_similarity(xa, wa, rw, c0, c1, K, 1.0 / gamma)[2]
        ctx.save_for_backward(xa, wa, rw)
        ctx.hyper = (K, 1.0 / gamma, step, x.dtype, w.dtype)
        return out

    @staticmethod
    def backward(ctx, dS):
        xa, wa, rw = ctx.saved_tensors
        K, inv_gamma, step, x_dtype, w_dtype = ctx.hyper
        N, M = xa.shape[0], wa.shape[1]
        C = M // K
        dS = dS.to(xa.dtype)
        dx = torch.zeros_like(xa)
        V = torch.empty_like(wa)
        for c0 in range(0, C, step):
            c1 = min(C, c0 + step)
            s, p, S = _chunk_similarity(xa, wa, rw, c0, c1, K, inv_gamma)
            cols = slice(c0 * K, c1 * K)
            ds = _grad_factor(s, p, S, inv_gamma).mul_(dS[:, c0:c1].unsqueeze(2)).view(N, -1).mul_(rw[cols])
            dx.addmm_(ds, wa[:, cols].t())
            torch.mm(xa.t(), ds, out=V[:, cols])
        dw = V.sub_(wa * (rw * rw * torch.linalg.vecdot(wa, V, dim=0)))
        return dx.to(x_dtype), dw.to(w_dtype), None, None


def torch_loss_rows(x: Tensor, w: Tensor, labels: Tensor, K: int, la: float, gamma: float,
                    margin: float) -> Tensor:
    """Per-row classification loss [N] (accumulation dtype); x already normalised if wanted, w raw."""
    return _TorchLoss.apply(x, w, labels, K, la, gamma, margin)


def torch_logits(x: Tensor, w: Tensor, K: int, gamma: float) -> Tensor:
    """S [N, C] (accumulation dtype)."""
    return _TorchLogits.apply(x, w, K, gamma)
