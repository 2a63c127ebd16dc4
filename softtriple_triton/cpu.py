"""backend="torch": memory-bounded PyTorch implementation with a hand-written backward (any device).

The N x (C*K) similarities are processed in chunks of whole classes, at most ``chunk_bytes`` per
temporary. The forward keeps an online log-sum-exp across chunks. The backward needs, per chunk,
dL/ds = g * la * (q - onehot) * a with the factor a = dS/ds = p * (1 + (s - S) / gamma): when one N x C*K
buffer plus the logits (N x C) fit in ``cache_bytes`` they are kept from the forward, so forward + backward
cost exactly three matrix products; otherwise the backward recomputes each chunk from the inputs (four matrix
products, memory O(N * chunk)).

The column normalisation of the centers is folded in: s = (x @ w) * rw with rw = 1 / ||w_j||, and
its backward dw = V - w * rw^2 * (w . V) with V = x^T @ (ds * rw) is done here, not by autograd, so no
normalised copy of the centers is made. The embeddings' normalisation is one C pass each way on CPU
(``unit_rows_fast``; autograd through ~15 small operations elsewhere).

Two implementations of the per-chunk element-wise work, same math (``_NativeChunks``, ``_TorchChunks``):
- CPU, fp32/fp64 (the default there): the fused C kernels of ``cpu_native`` on a transposed chunk
  u^T = w_chunk^T @ x^T, one pass per chunk in the forward and one in the backward (which redoes the inner
  softmax from the cached u);
- everywhere else (CUDA tensors, while torch.compile traces, K > 4096, or when the C kernels cannot be built):
  torch operations on an [N, m, K] chunk, caching the factor a.
Both are exact to the fp64 formula (the tests compare both to backend="reference").

Autograd: ``torch.func.grad``/``vjp``/``vmap``/``jacrev``/``jacfwd``/``hessian``/``jvp`` and
``torch.autograd.forward_ad`` work: setup_context, a vmap rule that runs the samples one by one, an exact chunked
jvp rule, and a backward that computes the plain formula's gradient with out-of-place torch operations whenever
it must itself be differentiable (``create_graph=True`` with something to differentiate: double backward) or runs
under a torch.func transform (wrapped tensors); that path materialises N x C*K like backend="reference".
Under torch.compile the same math is a ctx-style Function (``_TracedLoss``; dynamo traces no jvp/vmap rules).
"""

from __future__ import annotations

import numbers
import threading

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import cpu_native
from ._common import acc_dtype, inverse_column_norms, unit_rows
from .regularizer import column_dots, needs_pow2_scale

DEFAULT_CHUNK_BYTES = 64 << 20   # largest N x chunk temporary
DEFAULT_CACHE_BYTES = 512 << 20  # largest forward cache kept for the backward

_config = {"chunk_bytes": DEFAULT_CHUNK_BYTES, "cache_bytes": DEFAULT_CACHE_BYTES}


def _check_bytes(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"set_memory_budget: {name} must be an int number of bytes (e.g. 64 << 20 for 64 MiB) "
                        f"or None, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"set_memory_budget: {name} must be >= {minimum} bytes, got {value}")
    return int(value)


def set_memory_budget(chunk_bytes: int | None = None, cache_bytes: int | None = None) -> dict:
    """Change the torch backend's memory budget; returns the previous values.

    chunk_bytes (int > 0) bounds each N x chunk temporary (and the pool of freed chunk buffers kept for reuse to
    twice that); cache_bytes (int >= 0) bounds what the forward keeps for the backward (0 = always recompute in
    the backward). None leaves a value unchanged.
    """
    new = dict(_config)
    if chunk_bytes is not None:
        new["chunk_bytes"] = _check_bytes("chunk_bytes", chunk_bytes, 1)
    if cache_bytes is not None:
        new["cache_bytes"] = _check_bytes("cache_bytes", cache_bytes, 0)
    old = dict(_config)
    _config.update(new)
    if chunk_bytes is not None or cache_bytes is not None:
        with _pool_lock:
            _pool.clear()
    return old


# Freed CPU chunk buffers, kept for the next chunk or the next training step. A fresh multi-megabyte CPU
# allocation is page-faulted in on first touch (~2.5 ms per 10 MB here), as much as the arithmetic on it.
# Bounded by 2 * chunk_bytes; CUDA tensors never enter it (the caching allocator already does this), nor do
# torch.compile'd graphs (inductor plans its own buffers), nor inference tensors (created under
# torch.inference_mode: no later training call could write into them).
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
    if buf.device.type != "cpu" or torch.compiler.is_compiling() or buf.is_inference():
        return
    with _pool_lock:
        held = sum(b.numel() * b.element_size() for b in _pool)
        if held + buf.numel() * buf.element_size() <= 2 * _config["chunk_bytes"]:
            _pool.append(buf)


def _inverse_norms(w: Tensor) -> tuple[Tensor, bool]:
    """F.normalize semantics: 1 / max(||w_j||, 1e-12), and whether rw^2 is known to be a normal number. The plain
    sum of squares (torch.linalg.vector_norm over dim 0 is ~3x slower on CPU) where it cannot have overflowed
    (then rw^2 = 1 / sumsq is in range), else the power-of-two scaled norms (any finite w)."""
    sumsq = column_dots(w, w, w.dtype)
    if needs_pow2_scale(w, sumsq):
        return inverse_column_norms(w), False
    return sumsq.sqrt_().clamp_min_(1e-12).reciprocal_(), True


def _chunk_classes(N: int, C: int, K: int, itemsize: int) -> int:
    per_class = max(1, N * K * itemsize)
    return max(1, min(C, _config["chunk_bytes"] // per_class))


def _chunks(C: int, step: int):
    for c0 in range(0, C, step):
        yield c0, min(C, c0 + step)


# Below this temperature exp((s - 1) / gamma) can underflow to 0 for every center of a class (|s| <= 1),
# so the per-class maximum is subtracted instead of the constant bound 1 / gamma.
_MIN_GAMMA_FOR_CONSTANT_SHIFT = {torch.float32: 2.0 / 80.0, torch.float64: 2.0 / 700.0}


def _bounded(x_normalized: bool, gamma: float, dtype: torch.dtype) -> bool:
    return x_normalized and gamma >= _MIN_GAMMA_FOR_CONSTANT_SHIFT[dtype]


_NATIVE_MAX_K = 4096  # the C kernels keep 2 x K x 256 entries of scratch per thread


def _native_lib(t: Tensor, K: int):
    """The fused C kernels when this call can use them (CPU fp32/fp64 tensors, K <= 4096, not while torch.compile
    traces)."""
    if (t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or K > _NATIVE_MAX_K
            or torch.compiler.is_compiling()):
        return None
    return cpu_native.library()


def _wrapped(*ts) -> bool:
    """Any tensor a torch.func transform wraps (batched / grad-tracking): no raw data pointer, no out=."""
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts)


# ----------------------------------------------------------------------------------------- torch chunk math
def _chunk_similarity(x: Tensor, w: Tensor, rw_g: Tensor, c0: int, c1: int, K: int, inv_gamma: float,
                      bounded: bool, need_factor: bool):
    """Classes c0..c1 with torch operations: the relaxed similarity S [N, m] and (if need_factor) the gradient
    factor a = dS/ds = p * (t + 1 - S / gamma) (t = s / gamma, p the inner softmax) as a flat buffer of N*m*K
    (from _take: hand it back with _give when done), else None.

    ``bounded`` (unit-norm embeddings, gamma not tiny): |s| <= 1, so the shift of the exponent is the constant
    1 / gamma and no per-class maximum is needed. rw_g = rw / gamma (inverse column norms over the temperature).
    p = e / sum_k e is formed before any product with it, so neither S nor a can overflow when the sum is tiny.
    """
    cols = slice(c0 * K, c1 * K)
    N, m = x.shape[0], c1 - c0
    t_buf = _take(N * m * K, x.dtype, x.device)
    e_buf = _take(N * m * K, x.dtype, x.device)
    t = torch.mm(x, w[:, cols], out=t_buf.view(N, m * K)).mul_(rw_g[cols]).view(N, m, K)
    p = e_buf.view(N, m, K)
    torch.sub(t, inv_gamma if bounded else t.amax(dim=2, keepdim=True), out=p)
    p.exp_()
    # sums over the K centers as matrix-vector products with ones: ~2.7x faster than .sum(dim=2) over a short
    # innermost axis on CPU (0.32 ms vs 0.86 ms for [256, 1000, 10], one thread)
    ones = torch.ones(K, dtype=x.dtype, device=x.device)
    p.div_(torch.mv(p.view(-1, K), ones).view(N, m, 1))
    pt = t.mul_(p)  # p * t, in place of t
    S = torch.mv(pt.view(-1, K), ones).view(N, m).div_(inv_gamma)
    if need_factor:  # a = p * t + p * (1 - S / gamma), in place of p * t
        pt.addcmul_(p, (1.0 - S * inv_gamma).unsqueeze(2))
    else:
        _give(t_buf)
        t_buf = None
    _give(e_buf)
    return S, t_buf


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


# ----------------------------------------------------------------------------------------- per-chunk implementations
class _TorchChunks:
    """Per-chunk work with torch operations on [N, m, K] chunks (any device; traceable by torch.compile)."""

    def __init__(self, xa: Tensor, wa: Tensor, K: int, gamma: float, bounded: bool, rw: Tensor | None = None):
        self.xa, self.wa, self.K, self.gamma, self.bounded = xa, wa, K, gamma, bounded
        self.rw, self.rw_squares_ok = _inverse_norms(wa) if rw is None else (rw, False)
        self.rw_g = self.rw / gamma
        self.step = _chunk_classes(xa.shape[0], wa.shape[1] // K, K, xa.element_size())

    def loss_state(self, N: int):
        """The running (max, sum of exp, target logit) of the rows over the chunks (from no chunk)."""
        xa = self.xa
        return (torch.full((N,), float("-inf"), dtype=xa.dtype, device=xa.device),
                torch.zeros((N,), dtype=xa.dtype, device=xa.device),
                torch.zeros((N,), dtype=xa.dtype, device=xa.device))

    def loss_rows(self, state):
        """(loss rows, log-sum-exp) from the state after the last chunk."""
        m_run, l_run, zt = state
        log_l = torch.log(l_run)
        # (max - z_target) + log(sum): a loss near 0 keeps its relative precision
        return (m_run - zt) + log_l, m_run + log_l

    def forward(self, c0, c1, keep: bool, labels=None, la=0.0, margin=0.0, state=None, S_out=None):
        """Classes c0..c1: (z [N, m] for the loss (labels given), else None; when ``keep``, what the backward needs
        of the chunk (here the factor a, an N x m*K buffer), else None). Merges z into the running (max, sum of exp,
        target logit) ``state``; writes S into S_out (logits)."""
        S, a = _chunk_similarity(self.xa, self.wa, self.rw_g, c0, c1, self.K, 1.0 / self.gamma, self.bounded, keep)
        if labels is None:
            if S_out is not None:
                S_out[:, c0:c1] = S
            return None, a
        z, idx, own = _chunk_logits(S, labels, c0, la, margin)
        if state is not None:
            m_run, l_run, zt = state
            zt += torch.where(own, z.view(-1)[idx], 0.0)
            m_new = torch.maximum(m_run, z.amax(dim=1))
            l_run.mul_(torch.exp(m_run - m_new)).add_(torch.exp(z - m_new.unsqueeze(1)).sum(dim=1))
            m_run.copy_(m_new)
        return z, a

    def grad(self, a, c0, c1, z=None, lse=None, g=None, la=0.0, labels=None, dS=None) -> Tensor:
        """dL/du [N, m*K] in place of the factor: loss mode gS = g la (softmax(z) - onehot), logits mode dS."""
        N, m = self.xa.shape[0], c1 - c0
        if dS is None:
            gS = torch.exp(z - lse.unsqueeze(1))
            idx, own = _label_index(labels, c0, c1)
            gS.view(-1)[idx] -= own.to(gS.dtype)
            gS.mul_((g * la).unsqueeze(1))
        else:
            gS = dS[:, c0:c1]
        return a.view(N, m, self.K).mul_(gS.unsqueeze(2)).view(N, -1).mul_(self.rw[c0 * self.K:c1 * self.K])

    def grad_products(self, a, c0, c1, z, lse, g, la, labels, dS, dx, V) -> None:
        """dL/du of the chunk (ops.grad), then dx (=, first chunk; +=) dL/du w_chunk^T and V[:, chunk] = x^T dL/du."""
        _products(self, self.grad(a, c0, c1, z=z, lse=lse, g=g, la=la, labels=labels, dS=dS), c0, c1, dx, V)

    def release(self, a, z) -> None:
        if a is not None:
            _give(a)

    def centers_grad(self, V: Tensor) -> Tensor:
        """Through the column normalisation rw = 1/||w||: dw = V - w rw^2 (w . V), V = x^T @ (ds * rw). When rw^2
        may leave the normal range (column norms beyond ~1e19 in fp32) w is normalised before the product instead:
        dw = V - (w rw) rw (w . V), at the cost of a d x C*K temporary."""
        dots = column_dots(self.wa, V, self.wa.dtype)
        if self.rw_squares_ok:
            return V.addcmul_(self.wa, (self.rw * self.rw * dots).unsqueeze(0), value=-1.0)
        return V.addcmul_(self.wa * self.rw, (self.rw * dots).unsqueeze(0), value=-1.0)


class _NativeChunks(_TorchChunks):
    """The same work with the fused C kernels (CPU) on transposed chunks u^T = w_chunk^T @ x^T [m*K, N]. The
    backward keeps (or recomputes by the product) u only: its kernel redoes the inner softmax from u, which costs
    less than storing and reloading the factor, and needs u anyway for the centre gradient's w . V = sum_i ds u."""

    def __init__(self, xa: Tensor, wa: Tensor, K: int, gamma: float, bounded: bool, lib):
        self.xa, self.wa, self.K, self.gamma, self.bounded, self.lib = xa, wa, K, gamma, bounded, lib
        if wa.stride(1) != 1 or wa.stride(0) < wa.shape[1]:  # rows that overlap (expanded): BLAS needs lda >= M
            self.wa = wa = wa.contiguous()
        # the products from C (BLAS gemm torch links, one call per chunk with its pass): no torch dispatch and no
        # Python between a product and its pass, each of which costs ~0.1 ms right after a large product here
        self.gemm = cpu_native.blas_gemm(lib, xa.dtype)
        if self.gemm is not None and (xa.stride(1) != 1 or xa.stride(0) < xa.shape[1]):
            self.xa = xa = xa.contiguous()
        # with the products from C, the first forward call computes the inverse norms (a backward that recomputes
        # the chunks reuses them)
        self.rw_ready = self.gemm is None
        self.rw = cpu_native.inv_norms(lib, wa) if self.rw_ready else torch.empty(wa.shape[1], dtype=wa.dtype)
        self.step = _chunk_classes(xa.shape[0], wa.shape[1] // K, K, xa.element_size())
        self.coef: Tensor | None = None

    def loss_state(self, N: int):
        """[4, N]: the running (max, sum of exp, target logit) over the chunks, started by the first chunk's kernel,
        and the log-sum-exp; and the loss rows [N]; both written by the last chunk's kernel."""
        return (torch.empty((4, N), dtype=self.xa.dtype), torch.empty(N, dtype=self.xa.dtype))

    def loss_rows(self, state):
        return state[1], state[0][3]

    def forward(self, c0, c1, keep, labels=None, la=0.0, margin=0.0, state=None, S_out=None):
        N, K, m = self.xa.shape[0], self.K, c1 - c0
        u = _take(N * m * K, self.xa.dtype, self.xa.device)
        z = _take(N * m, self.xa.dtype, self.xa.device).view(m, N) if labels is not None else None
        run, rows, lse = None, None, None
        if state is not None:
            run = state[0]
            if c1 * K == self.wa.shape[1]:  # the last chunk writes the rows and the log-sum-exp
                rows, lse = state[1], run[3]
        S_part = None if S_out is None else S_out[:, c0:]
        if self.gemm is not None:
            cpu_native.forward_fused(self.lib, self.gemm, self.xa, self.wa, self.rw, not self.rw_ready, u, m, K,
                                     self.gamma, self.bounded, c0, la, margin, labels, z, S_part, run, rows, lse)
            self.rw_ready = True
            uT = u.view(m * K, N)
        else:
            uT = torch.mm(self.wa[:, c0 * K:c1 * K].t(), self.xa.t(), out=u.view(m * K, N))
            cpu_native.forward_chunk(self.lib, uT, self.rw[c0 * K:c1 * K], m, K, self.gamma, self.bounded, c0, la=la,
                                     margin=margin, labels=labels, z=z, S_out=S_part, state=run, rows=rows, lse=lse)
        if not keep:
            _give(u)
            return z, None
        return z, u

    def _coefs(self) -> Tensor:
        """The centre-gradient coefficients of all columns (filled chunk by chunk by the backward kernel)."""
        if self.coef is None:
            self.coef = torch.empty(self.wa.shape[1], dtype=self.wa.dtype)
        return self.coef

    def grad(self, u, c0, c1, z=None, lse=None, g=None, la=0.0, labels=None, dS=None) -> Tensor:
        N, K, m = self.xa.shape[0], self.K, c1 - c0
        cols = slice(c0 * K, c1 * K)
        uT = u.view(m * K, N)
        cpu_native.backward_chunk(self.lib, uT, self.rw[cols], m, K, self.gamma, self.bounded, self._coefs()[cols], c0,
                                  z=z, lse=lse, g=g, la=la, labels=labels, dS=None if dS is None else dS[:, c0:])
        return uT.t()

    def grad_products(self, a, c0, c1, z, lse, g, la, labels, dS, dx, V) -> None:
        if self.gemm is None:
            return super().grad_products(a, c0, c1, z, lse, g, la, labels, dS, dx, V)
        cpu_native.backward_fused(self.lib, self.gemm, self.xa, self.wa, self.rw, a, c1 - c0, self.K, self.gamma,
                                  self.bounded, c0, z, lse, g, la, labels, None if dS is None else dS[:, c0:],
                                  self._coefs(), dx, V, c1 * self.K == self.wa.shape[1])

    def release(self, u, z) -> None:
        for buf in (u, z):
            if buf is not None:
                _give(buf.view(-1))

    def centers_grad(self, V: Tensor) -> Tensor:
        if self.gemm is not None:  # the last chunk's backward call has corrected V already
            return V
        assert self.coef is not None, "centers_grad after grad"
        return cpu_native.center_grad_(self.lib, V, self.wa, self.rw, self.coef)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t.to(dtype), without the call when it is already that dtype (each torch call costs ~0.1 ms here right after a
    large product: the dispatcher's code and data are out of cache)."""
    return t if t.dtype == dtype else t.to(dtype)


def _chunks_for(x: Tensor, w: Tensor, K: int, gamma: float, x_normalized: bool):
    acc = acc_dtype(x.dtype, w.dtype)
    xa, wa = _as(x, acc), _as(w, acc)
    bounded = _bounded(x_normalized, gamma, acc)
    lib = _native_lib(xa, K)
    if lib is None:
        return _TorchChunks(xa, wa, K, gamma, bounded)
    return _NativeChunks(xa, wa, K, gamma, bounded, lib)


def _products(ops, ds: Tensor, c0: int, c1: int, dx: Tensor | None, V: Tensor | None):
    """dx (=, the first chunk; += after) ds @ w_chunk^T, V[:, chunk] = x^T @ ds (each skipped when None).
    (Accumulating dx^T = w_chunk @ ds^T instead, both operands row-major as they lie, is faster with cold operands
    alone, 9.4 vs 9.8 ms at N=256 d=512 C*K=10000, but 0.4 ms slower inside a step, its transposing copy
    included.)"""
    cols = slice(c0 * ops.K, c1 * ops.K)
    if dx is not None and c0 == 0:
        torch.mm(ds, ops.wa[:, cols].t(), out=dx)
    elif dx is not None:
        dx.addmm_(ds, ops.wa[:, cols].t())
    if V is not None:
        torch.mm(ops.xa.t(), ds, out=V[:, cols])
    return dx


class _Saved:
    """What a forward leaves for its backward and jvp besides the inputs: the per-chunk implementation
    (normalised operands, inverse norms, chunk size), the log-sum-exp, the labels and the factor cache (if any)."""

    __slots__ = ("ops", "lse", "cached", "labels")

    def __init__(self):
        self.ops = self.lse = self.cached = self.labels = None


# ----------------------------------------------------------------------------------------- forward / backward
def _run_forward(ops, labels, la, margin, want_cache: bool, S_out=None):
    """All chunks. Loss mode (labels given): returns (rows, lse, cache); logits mode: fills S_out, returns
    (None, None, cache). cache = per chunk (z, what the backward needs), or None when not wanted / too big."""
    xa = ops.xa
    N, M = xa.shape[0], ops.wa.shape[1]
    C = M // ops.K
    # the cache: per chunk an N x m*K buffer (torch: the factor a; native: u) and the logits z (loss mode)
    keep = want_cache and N * (M + (C if labels is not None else 0)) * xa.element_size() <= _config["cache_bytes"]
    state = ops.loss_state(N) if labels is not None else None
    cached = []
    for c0, c1 in _chunks(C, ops.step):
        z, a = ops.forward(c0, c1, keep, labels, la, margin, state, S_out)
        if keep:
            cached.append((z, a))
        else:
            ops.release(a, z)
    cached = cached if keep else None
    if labels is None:
        return None, None, cached
    assert state is not None
    return (*ops.loss_rows(state), cached)


def _run_backward(ops, cached, need_x: bool, need_w: bool, labels=None, la=0.0, margin=0.0, lse=None, g=None,
                  dS=None):
    """dx and dw (None where not needed) from the cache (consumed in place) or recomputing every chunk."""
    M = ops.wa.shape[1]
    C = M // ops.K
    g = None if g is None else _as(g, ops.xa.dtype)
    if g is not None and g.dim() == 1 and g.stride(0) not in (0, 1):
        g = g.contiguous()
    dS = None if dS is None else _as(dS, ops.xa.dtype).contiguous()
    dx = torch.empty_like(ops.xa) if need_x else None  # the first chunk's product writes it
    V = torch.empty_like(ops.wa) if need_w else None
    for i, (c0, c1) in enumerate(_chunks(C, ops.step)):
        z, a = cached[i] if cached is not None else ops.forward(c0, c1, True, labels, la, margin)
        ops.grad_products(a, c0, c1, z, lse, g, la, labels, dS, dx, V)
        ops.release(a, z)
    return dx, None if V is None else ops.centers_grad(V)


def _needs_formula(grad: Tensor, *saved: Tensor) -> bool:
    """The backward must be differentiable itself (create_graph=True with something to differentiate: double
    backward, torch.func.hessian) or runs on tensors a torch.func transform wraps (jacrev = vmap of the backward)."""
    return _wrapped(grad) or (torch.is_grad_enabled() and any(t.requires_grad for t in (grad, *saved)))


def _grads_via_formula(x: Tensor, w: Tensor, need, K: int, gamma: float, grad: Tensor, labels=None, la=0.0,
                       margin=0.0):
    """dx, dw (None where not needed) of the plain formula written out with out-of-place torch operations, for
    grad = dL/drows (labels given) or dL/dS: differentiable again and traceable by every torch.func transform.
    Materialises N x C*K like backend="reference"."""
    acc = acc_dtype(x.dtype, w.dtype)
    xa, wa = x.to(acc), w.to(acc)
    N, M = xa.shape[0], wa.shape[1]
    nrm = torch.linalg.vector_norm(wa, dim=0)
    rw = 1.0 / nrm.clamp_min(1e-12)
    wn = wa * rw
    s = (xa @ wn).view(N, M // K, K)
    p = torch.softmax(s / gamma, dim=2)
    S = (p * s).sum(dim=2)
    if labels is None:
        gS = grad.to(acc)
    else:
        # not one_hot: it reads the labels' range (.item()), which vmap over the labels cannot do
        onehot = (labels.unsqueeze(1) == torch.arange(M // K, device=labels.device)).to(acc)
        q = torch.softmax(la * (S - margin * onehot), dim=1)
        gS = (grad.to(acc) * la).unsqueeze(1) * (q - onehot)
    ds = (gS.unsqueeze(2) * p * (1.0 + (s - S.unsqueeze(2)) / gamma)).view(N, M)
    dx = ds @ wn.t() if need[0] else None
    dw = None
    if need[1]:
        dwn = xa.t() @ ds
        # through wn = w / max(||w||, 1e-12): the projection applies where the norm was not clamped
        dw = rw * (dwn - torch.where(nrm > 1e-12, (wn * dwn).sum(dim=0), 0.0) * wn)
    return [None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(w.dtype)]


def _jvp(ops, x_t, w_t, labels=None, la=0.0, margin=0.0, lse=None) -> Tensor:
    """Forward-mode derivative along the tangents (x_t, w_t) of the loss rows (labels given) or of the logits,
    chunk by chunk with out-of-place torch operations (the tangents may be batched by torch.func.jacfwd):
    ds = rw (x_t @ w + x @ w_t) - s rw^2 (w . w_t), dS = sum_k dS/ds ds, d loss_i = la sum_c (q - onehot)_ic dS_ic."""
    xa, wa, rw, K, gamma = ops.xa, ops.wa, ops.rw, ops.K, ops.gamma
    N, M = xa.shape[0], wa.shape[1]
    x_t = None if x_t is None else x_t.to(xa.dtype)
    w_t = None if w_t is None else w_t.to(wa.dtype)
    wdw = None if w_t is None else (wa * w_t).sum(dim=0)
    parts = []
    for c0, c1 in _chunks(M // K, ops.step):
        cols = slice(c0 * K, c1 * K)
        s = (xa @ wa[:, cols]) * rw[cols]
        du = [x_t @ wa[:, cols]] if x_t is not None else []
        du += [xa @ w_t[:, cols]] if w_t is not None else []
        ds = sum(du) * rw[cols]
        if w_t is not None and wdw is not None:
            ds = ds - s * (rw[cols] * (rw[cols] * wdw[..., cols])).unsqueeze(-2)  # rw^2 alone can underflow
        s = s.view(N, c1 - c0, K)
        ds = ds.reshape(*ds.shape[:-1], c1 - c0, K)
        p = torch.softmax(s / gamma, dim=2)
        S = (p * s).sum(dim=2)
        dS = (p * (1.0 + (s - S.unsqueeze(2)) / gamma) * ds).sum(dim=-1)
        if labels is None:
            parts.append(dS)
            continue
        z, idx, own = _chunk_logits(S, labels, c0, la, margin)
        q = torch.exp(z - lse.unsqueeze(1))
        q.view(-1)[idx] -= own.to(q.dtype)
        parts.append(la * (q * dS).sum(dim=-1))
    return torch.cat(parts, dim=-1) if labels is None else sum(parts)


def _select(t, dim, b):
    return t if dim is None else t.select(dim, b)


def _out(dx, dw, x: Tensor, w: Tensor, n_none: int) -> tuple:
    return (None if dx is None else _as(dx, x.dtype), None if dw is None else _as(dw, w.dtype)) + (None,) * n_none


# ----------------------------------------------------------------------------------------- the loss
class _TorchLoss(torch.autograd.Function):
    """The loss rows, torch.func-ready: setup_context, a vmap rule, a jvp rule; ``saved`` (a _Saved) carries
    what the forward leaves for the backward."""

    @staticmethod
    def forward(x, w, labels, K, la, gamma, margin, x_normalized, want_cache, saved):
        ops = _chunks_for(x, w, K, gamma, x_normalized)
        rows, lse, cached = _run_forward(ops, labels, la, margin, want_cache)
        saved.ops, saved.lse, saved.cached, saved.labels = ops, lse, cached, labels
        return rows

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, labels, K, la, gamma, margin, x_normalized, want_cache, saved = inputs
        ctx.save_for_backward(x, w, labels)
        ctx.saved = saved
        ctx.hyper = (K, la, gamma, margin)

    @staticmethod
    def backward(ctx, g):
        K, la, gamma, margin = ctx.hyper
        x, w, labels = ctx.saved_tensors
        need = ctx.needs_input_grad[:2]
        if _needs_formula(g, x, w):
            return (*_grads_via_formula(x, w, need, K, gamma, g, labels, la, margin),) + (None,) * 8
        sv = ctx.saved
        cached, sv.cached = sv.cached, None  # consumed in place: a second backward (retain_graph) recomputes
        dx, dw = _run_backward(sv.ops, cached, need[0], need[1], labels=labels, la=la, margin=margin, lse=sv.lse, g=g)
        return _out(dx, dw, x, w, 8)

    @staticmethod
    def vmap(info, in_dims, x, w, labels, K, la, gamma, margin, x_normalized, want_cache, saved):
        rows = [_TorchLoss.apply(_select(x, in_dims[0], b), _select(w, in_dims[1], b),
                                 _select(labels, in_dims[2], b), K, la, gamma, margin, x_normalized, want_cache,
                                 _Saved()) for b in range(info.batch_size)]
        return torch.stack(rows), 0

    @staticmethod
    def jvp(ctx, x_t, w_t, *_):
        K, la, gamma, margin = ctx.hyper
        sv = ctx.saved
        return _jvp(sv.ops, x_t, w_t, sv.labels, la, margin, sv.lse)


class _TracedLoss(torch.autograd.Function):
    """The same loss as torch.compile traces it (dynamo takes neither jvp/vmap rules nor helper objects)."""

    @staticmethod
    def forward(ctx, x, w, labels, K, la, gamma, margin, x_normalized):
        ops = _chunks_for(x, w, K, gamma, x_normalized)
        rows, lse, ctx.cached = _run_forward(ops, labels, la, margin, any(ctx.needs_input_grad[:2]))
        ctx.save_for_backward(ops.xa, ops.wa, ops.rw, labels, lse)
        ctx.hyper = (K, la, gamma, margin, ops.bounded, x.dtype, w.dtype)
        return rows

    @staticmethod
    def backward(ctx, g):
        xa, wa, rw, labels, lse = ctx.saved_tensors
        K, la, gamma, margin, bounded, x_dtype, w_dtype = ctx.hyper
        ops = _TorchChunks(xa, wa, K, gamma, bounded, rw)
        cached, ctx.cached = ctx.cached, None
        need = ctx.needs_input_grad
        dx, dw = _run_backward(ops, cached, need[0], need[1], labels=labels, la=la, margin=margin,
                               lse=lse, g=g)
        return _out(dx, dw, xa.new_empty(0, dtype=x_dtype), wa.new_empty(0, dtype=w_dtype), 6)


# ----------------------------------------------------------------------------------------- the logits
def _logits_forward(ops, want_cache: bool):
    out = torch.empty((ops.xa.shape[0], ops.wa.shape[1] // ops.K), dtype=ops.xa.dtype, device=ops.xa.device)
    return out, _run_forward(ops, None, 0.0, 0.0, want_cache, S_out=out)[2]


class _TorchLogits(torch.autograd.Function):
    @staticmethod
    def forward(x, w, K, gamma, x_normalized, want_cache, saved):
        saved.ops = _chunks_for(x, w, K, gamma, x_normalized)
        out, saved.cached = _logits_forward(saved.ops, want_cache)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, K, gamma, x_normalized, want_cache, saved = inputs
        ctx.save_for_backward(x, w)
        ctx.saved = saved
        ctx.hyper = (K, gamma)

    @staticmethod
    def backward(ctx, dS):
        K, gamma = ctx.hyper
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad[:2]
        if _needs_formula(dS, x, w):
            return (*_grads_via_formula(x, w, need, K, gamma, dS),) + (None,) * 5
        sv = ctx.saved
        cached, sv.cached = sv.cached, None
        dx, dw = _run_backward(sv.ops, cached, need[0], need[1], dS=dS)
        return _out(dx, dw, x, w, 5)

    @staticmethod
    def vmap(info, in_dims, x, w, K, gamma, x_normalized, want_cache, saved):
        out = [_TorchLogits.apply(_select(x, in_dims[0], b), _select(w, in_dims[1], b), K, gamma, x_normalized,
                                  want_cache, _Saved()) for b in range(info.batch_size)]
        return torch.stack(out), 0

    @staticmethod
    def jvp(ctx, x_t, w_t, *_):
        return _jvp(ctx.saved.ops, x_t, w_t)


class _TracedLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, K, gamma, x_normalized):
        ops = _chunks_for(x, w, K, gamma, x_normalized)
        out, ctx.cached = _logits_forward(ops, any(ctx.needs_input_grad[:2]))
        ctx.save_for_backward(ops.xa, ops.wa, ops.rw)
        ctx.hyper = (K, gamma, ops.bounded, x.dtype, w.dtype)
        return out

    @staticmethod
    def backward(ctx, dS):
        xa, wa, rw = ctx.saved_tensors
        K, gamma, bounded, x_dtype, w_dtype = ctx.hyper
        cached, ctx.cached = ctx.cached, None
        dx, dw = _run_backward(_TorchChunks(xa, wa, K, gamma, bounded, rw), cached, ctx.needs_input_grad[0],
                               ctx.needs_input_grad[1], dS=dS)
        return _out(dx, dw, xa.new_empty(0, dtype=x_dtype), wa.new_empty(0, dtype=w_dtype), 3)


# ----------------------------------------------------------------------------------------- embedding normalisation
class _UnitRowsNative(torch.autograd.Function):
    """unit_rows (F.normalize of the rows without overflow) as one C pass each way: its autograd graph is ~15 small
    operations (0.15-1.2 ms forward + backward at N=32-256 d=512 here, these kernels 0.05-0.10 ms). A backward that
    must be differentiable (create_graph=True) differentiates unit_rows itself instead."""

    @staticmethod
    def forward(ctx, x, lib):
        y, ctx.nc, ctx.sc = cpu_native.unit_rows(lib, x)
        ctx.lib = lib
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: a differentiable gradient, of the same function
            with torch.enable_grad():
                return torch.autograd.grad(unit_rows(x), x, g, create_graph=True)[0], None
        return cpu_native.unit_rows_backward(ctx.lib, y, g.contiguous(), ctx.nc, ctx.sc), None


def unit_rows_fast(x: Tensor) -> Tensor:
    """unit_rows(x) with the C kernels where they apply (where the chunk kernels do, for a 2-d dense tensor under
    plain eager autograd: no torch.func transform or forward-mode level), else unit_rows itself."""
    plain = (x.dim() == 2 and not x.is_sparse and not torch._C._are_functorch_transforms_active()
             and forward_ad._current_level < 0)
    lib = _native_lib(x, 1) if plain else None
    if lib is None:
        return unit_rows(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        return _UnitRowsNative.apply(x, lib)
    return cpu_native.unit_rows(lib, x)[0]


def _want_cache(x: Tensor, w: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)


def _apply(fn, *args):
    """fn.apply(*args). Outside torch.func transforms it skips the binding of the arguments to forward's signature
    that torch.autograd.Function.apply does for functions with setup_context (inspect.signature, ~0.1 ms a call,
    a quarter of a small step's fixed cost); our forwards take every argument positionally, without defaults."""
    if torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return super(torch.autograd.Function, fn).apply(*args)


def torch_loss_rows(x: Tensor, w: Tensor, labels: Tensor, K: int, la: float, gamma: float, margin: float,
                    x_normalized: bool) -> Tensor:
    """Per-row classification loss [N] (accumulation dtype); x already normalised if x_normalized, w raw."""
    if torch.compiler.is_compiling():
        return _TracedLoss.apply(x, w, labels, K, la, gamma, margin, x_normalized)
    return _apply(_TorchLoss, x, w, labels, K, la, gamma, margin, x_normalized, _want_cache(x, w), _Saved())


def torch_logits(x: Tensor, w: Tensor, K: int, gamma: float, x_normalized: bool) -> Tensor:
    """S [N, C] (accumulation dtype)."""
    if torch.compiler.is_compiling():
        return _TracedLogits.apply(x, w, K, gamma, x_normalized)
    return _apply(_TorchLogits, x, w, K, gamma, x_normalized, _want_cache(x, w), _Saved())
