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

import threading

import torch
from torch import Tensor

from ._common import acc_dtype
from .regularizer import column_dots

DEFAULT_CHUNK_BYTES = 64 << 20   # largest N x chunk temporary
DEFAULT_CACHE_BYTES = 512 << 20  # largest forward cache kept for the backward

_config = {"chunk_bytes": DEFAULT_CHUNK_BYTES, "cache_bytes": DEFAULT_CACHE_BYTES}


def set_memory_budget(chunk_bytes: int | None = None, cache_bytes: int | None = None) -> dict:
    """Change the torch backend's memory budget; returns the previous values.

    chunk_bytes bounds each N x chunk temporary (and the pool of freed chunk buffers kept for reuse to twice
    that); cache_bytes bounds what the forward keeps for the backward (0 = always recompute in the backward).
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
    if chunk_bytes is not None or cache_bytes is not None:
        with _pool_lock:
            _pool.clear()
    return old


# Freed CPU chunk buffers, kept for the next chunk or the next training step. A fresh multi-megabyte CPU
# allocation is page-faulted in on first touch (~2.5 ms per 10 MB here), as much as the arithmetic on it.
# Bounded by 2 * chunk_bytes; CUDA tensors never enter it (the caching allocator already does this), nor do
# torch.compile'd graphs (inductor plans its own buffers).
_pool: list = []
_pool_lock = threading.Lock()


def _take(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if device.type == "cpu" and not torch.compiler.is_compiling():
        with _pool_lock:
            for i, buf in enumerate(_pool):
                if buf.numel() == numel and buf.dtype == dtype:
                    return _pool.pop(i)
    return torch.empty(numel, dtype=dtype, device=device)


def _give(buf: Tensor) -> None:
    """Return a flat buffer from _take once nothing reads it any more (CPU ops are synchronous)."""
    if buf.device.type != "cpu" or torch.compiler.is_compiling():  # traced graphs get no side effects
        return
    with _pool_lock:
        held = sum(b.numel() * b.element_size() for b in _pool)
        if held + buf.numel() * buf.element_size() <= 2 * _config["chunk_bytes"]:
            _pool.append(buf)


def _inverse_norms(w: Tensor) -> Tensor:
    # F.normalize semantics: w / max(||w||, 1e-12); torch.linalg.vector_norm over dim 0 is ~3x slower on CPU
    return column_dots(w, w, w.dtype).sqrt_().clamp_min_(1e-12).reciprocal_()


def _chunk_classes(N: int, C: int, K: int, itemsize: int) -> int:
    per_class = max(1, N * K * itemsize)
    return max(1, min(C, _config["chunk_bytes"] // per_class))


# Below this temperature exp((s - 1) / gamma) can underflow to 0 for every center of a class (|s| <= 1),
# so the per-class maximum is subtracted instead of the constant bound 1 / gamma.
_MIN_GAMMA_FOR_CONSTANT_SHIFT = {torch.float32: 2.0 / 80.0, torch.float64: 2.0 / 700.0}


def _chunk_similarity(x: Tensor, w: Tensor, rw_g: Tensor, c0: int, c1: int, K: int, inv_gamma: float,
                      bounded: bool, need_factor: bool):
    """Classes c0..c1: the relaxed similarity S [N, m], den = sum_k e [N, m] with e = exp(t - shift), t = s / gamma,
    and (if need_factor) the gradient factor a = den * dS/ds = e * (t + 1 - S / gamma) as a flat buffer of N*m*K
    (from _take: hand it back with _give when done), else None.

    p = e / den is never formed: S = gamma * sum_k e t / den, and den is folded into the backward.
    ``bounded`` (unit-norm embeddings, gamma not tiny): |s| <= 1, so the shift is the constant 1 / gamma
    and no per-class maximum is needed. rw_g = rw / gamma (inverse column norms over the temperature).
    """
    cols = slice(c0 * K, c1 * K)
    N, m = x.shape[0], c1 - c0
    t_buf = _take(N * m * K, x.dtype, x.device)
    e_buf = _take(N * m * K, x.dtype, x.device)
    t = torch.mm(x, w[:, cols], out=t_buf.view(N, m * K)).mul_(rw_g[cols]).view(N, m, K)
    e = e_buf.view(N, m, K)
    torch.sub(t, inv_gamma if bounded else t.amax(dim=2, keepdim=True), out=e)
    e.exp_()
    # sums over the K centers as matrix-vector products with ones: ~2.7x faster than .sum(dim=2) over a short
    # innermost axis on CPU (0.32 ms vs 0.86 ms for [256, 1000, 10], one thread)
    ones = torch.ones(K, dtype=x.dtype, device=x.device)
    den = torch.mv(e.view(-1, K), ones).view(N, m)
    et = t.mul_(e)  # e * t, in place of t
    S = torch.mv(et.view(-1, K), ones).view(N, m).div_(den).div_(inv_gamma)
    if need_factor:  # a = e * t + e * (1 - S / gamma), in place of e * t
        et.addcmul_(e, (1.0 - S * inv_gamma).unsqueeze(2))
    else:
        _give(t_buf)
        t_buf = None
    _give(e_buf)
    return S, den, t_buf


def _label_index(labels: Tensor, c0: int, c1: int):
    """Flat index of (row, label - c0) in an [N, c1 - c0] chunk, and whether the chunk owns the label."""
    m = c1 - c0
    rel = labels - c0
    own = (rel >= 0) & (rel < m)
    return torch.arange(labels.shape[0], device=labels.device) * m + rel.clamp(0, m - 1), own


def _chunk_logits(S: Tensor, labels: Tensor, c0: int, la: float, margin: float):
    """z = la * (S - margin * onehot) for classes c0.., the in-chunk label index and its ownership mask."""
    idx, own = _label_index(labels, c0, c0 + S.shape[1])
    z = S * la
    z.view(-1)[idx] -= (la * margin) * own.to(z.dtype)
    return z, idx, own


def _centers_grad(wa: Tensor, rw: Tensor, V: Tensor) -> Tensor:
    """Through the column normalisation rw = 1/||w||: dw = V - w * rw^2 * (w . V), V = x^T @ (ds * rw)."""
    return V.addcmul_(wa, (rw * rw * column_dots(wa, V, wa.dtype)).unsqueeze(0), value=-1.0)


def _bounded(x_normalized: bool, gamma: float, dtype: torch.dtype) -> bool:
    return x_normalized and gamma >= _MIN_GAMMA_FOR_CONSTANT_SHIFT[dtype]


def _setup(x: Tensor, w: Tensor, gamma: float, x_normalized: bool):
    acc = acc_dtype(x.dtype, w.dtype)
    xa, wa = x.to(acc), w.to(acc)
    rw = _inverse_norms(wa)
    return xa, wa, rw, rw / gamma, _bounded(x_normalized, gamma, acc)


class _TorchLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, labels, K, la, gamma, margin, x_normalized):
        xa, wa, rw, rw_g, bounded = _setup(x, w, gamma, x_normalized)
        N, M = x.shape[0], w.shape[1]
        C = M // K
        inv_gamma = 1.0 / gamma
        itemsize = xa.element_size()
        cache = any(ctx.needs_input_grad[:2]) and N * (M + 2 * C) * itemsize <= _config["cache_bytes"]
        step = _chunk_classes(N, C, K, itemsize)
        m_run = torch.full((N,), float("-inf"), dtype=xa.dtype, device=x.device)
        l_run = torch.zeros((N,), dtype=xa.dtype, device=x.device)
        zt = torch.zeros((N,), dtype=xa.dtype, device=x.device)
        cached = []
        for c0 in range(0, C, step):
            c1 = min(C, c0 + step)
            S, den, a = _chunk_similarity(xa, wa, rw_g, c0, c1, K, inv_gamma, bounded, cache)
            z, idx, own = _chunk_logits(S, labels, c0, la, margin)
            zt += torch.where(own, z.view(-1)[idx], 0.0)
            m_new = torch.maximum(m_run, z.amax(dim=1))
            l_run = l_run * torch.exp(m_run - m_new) + torch.exp(z - m_new.unsqueeze(1)).sum(dim=1)
            m_run = m_new
            if cache:
                cached.append((z, den, a))
            del S, den, a
        log_l = torch.log(l_run)
        ctx.save_for_backward(xa, wa, rw, labels, m_run + log_l)
        ctx.hyper = (K, la, gamma, margin, bounded, step, x.dtype, w.dtype)
        ctx.cached = cached if cache else None
        # (max - z_target) + log(sum): a loss near 0 keeps its relative precision
        return (m_run - zt) + log_l

    @staticmethod
    def backward(ctx, g):
        xa, wa, rw, labels, lse = ctx.saved_tensors
        K, la, gamma, margin, bounded, step, x_dtype, w_dtype = ctx.hyper
        N, M = xa.shape[0], wa.shape[1]
        C = M // K
        inv_gamma = 1.0 / gamma
        rw_g = rw / gamma
        gla = (g.to(lse.dtype) * la).unsqueeze(1)
        dx = torch.zeros_like(xa)
        V = torch.empty_like(wa)
        for i, c0 in enumerate(range(0, C, step)):
            c1 = min(C, c0 + step)
            if ctx.cached is not None:
                z, den, a = ctx.cached[i]
            else:
                S, den, a = _chunk_similarity(xa, wa, rw_g, c0, c1, K, inv_gamma, bounded, True)
                z = _chunk_logits(S, labels, c0, la, margin)[0]
                del S
            # dL/dS = g * la * (softmax(z) - onehot); dL/ds = dL/dS / den * a
            gS = torch.exp(z - lse.unsqueeze(1))
            idx, own = _label_index(labels, c0, c1)
            gS.view(-1)[idx] -= own.to(gS.dtype)
            gS.mul_(gla).div_(den)
            cols = slice(c0 * K, c1 * K)
            # dL/du with u = x @ w, in place of the gradient factor
            ds = a.view(N, c1 - c0, K).mul_(gS.unsqueeze(2)).view(N, -1).mul_(rw[cols])
            dx.addmm_(ds, wa[:, cols].t())
            torch.mm(xa.t(), ds, out=V[:, cols])
            _give(a)
            del z, den, a, gS, ds
        ctx.cached = None
        return dx.to(x_dtype), _centers_grad(wa, rw, V).to(w_dtype), None, None, None, None, None, None


class _TorchLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, K, gamma, x_normalized):
        xa, wa, rw, rw_g, bounded = _setup(x, w, gamma, x_normalized)
        N, M = x.shape[0], w.shape[1]
        C = M // K
        step = _chunk_classes(N, C, K, xa.element_size())
        out = torch.empty((N, C), dtype=xa.dtype, device=x.device)
        for c0 in range(0, C, step):
            c1 = min(C, c0 + step)
            out[:, c0:c1] = _chunk_similarity(xa, wa, rw_g, c0, c1, K, 1.0 / gamma, bounded, False)[0]
        ctx.save_for_backward(xa, wa, rw)
        ctx.hyper = (K, gamma, bounded, step, x.dtype, w.dtype)
        return out

    @staticmethod
    def backward(ctx, dS):
        xa, wa, rw = ctx.saved_tensors
        K, gamma, bounded, step, x_dtype, w_dtype = ctx.hyper
        N, M = xa.shape[0], wa.shape[1]
        C = M // K
        rw_g = rw / gamma
        dS = dS.to(xa.dtype)
        dx = torch.zeros_like(xa)
        V = torch.empty_like(wa)
        for c0 in range(0, C, step):
            c1 = min(C, c0 + step)
            _, den, a = _chunk_similarity(xa, wa, rw_g, c0, c1, K, 1.0 / gamma, bounded, True)
            cols = slice(c0 * K, c1 * K)
            ds = a.view(N, c1 - c0, K).mul_((dS[:, c0:c1] / den).unsqueeze(2)).view(N, -1).mul_(rw[cols])
            dx.addmm_(ds, wa[:, cols].t())
            torch.mm(xa.t(), ds, out=V[:, cols])
            _give(a)
        return dx.to(x_dtype), _centers_grad(wa, rw, V).to(w_dtype), None, None, None


def torch_loss_rows(x: Tensor, w: Tensor, labels: Tensor, K: int, la: float, gamma: float, margin: float,
                    x_normalized: bool) -> Tensor:
    """Per-row classification loss [N] (accumulation dtype); x already normalised if x_normalized, w raw."""
    return _TorchLoss.apply(x, w, labels, K, la, gamma, margin, x_normalized)


def torch_logits(x: Tensor, w: Tensor, K: int, gamma: float, x_normalized: bool) -> Tensor:
    """S [N, C] (accumulation dtype)."""
    return _TorchLogits.apply(x, w, K, gamma, x_normalized)
