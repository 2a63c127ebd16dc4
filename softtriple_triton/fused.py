"""Host side of the fused (Triton) backend: what each torch.library op of ops.py does (layer 2).

Forward: the inverse column norms rw of the centers and the prepared centers wt = (fc * rw).T in the product
dtype (one kernel, kernels/prepare.py), then the forward kernel (one GEMM-equivalent). rw and wt are outputs of
the op, saved for the backward. When gradients are wanted and the cache fits its budget, the forward also stores
the gradient factor a = p (1 + (s - S) / gamma) per lane and the class logits z (kernels/forward.py, CACHE).

Backward, three paths (docs/design.md has the cost model that chose them):
  "cached"     (default when the forward cached; 2 GEMM-equivalents, 3 per step): dL/ds = dL/dS * a in one
               memory-bound pass over the cache (kernels/grad_cached.py), then the two library products
               dx = ds @ wt and dL/dwn = x^T @ ds.
  "chunked"    (default otherwise; 3 GEMM-equivalents, 4 per step): for each chunk of whole class tiles, the dL/ds
               kernel recomputes the tiles once and writes dL/ds for the chunk [N, chunk] (bounded by
               ``chunk_bytes``); the two library products follow, dx accumulated in fp32 across chunks and
               dL/dwn[:, chunk] written to disjoint columns.
  "two_kernel" (selectable for comparison; 4 GEMM-equivalents, 5 per step): the embeddings' and the centers'
               gradient kernels each recompute every tile.
All are deterministic (no atomics, fixed reduction orders) and end with the column normalisation's backward
(kernels/center_grad.py, dfc = rw (V - wn (wn . V)) with V = dL/dwn): no normalised fp32 copy of the centers and
no autograd through the normalisation.

Products run in the dtype of x (the product dtype chosen by the API, see functional.product_dtype) with fp32
accumulation (fp64 for fp64). fp16 gradients are pre-scaled by a power of two into fp16's range: |dL/ds| <=
|g| la (1 + 2 max|s| / gamma) can exceed 65504.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ._common import LossParams, acc_dtype, interpreter_serialised

BACKWARDS = ("auto", "chunked", "two_kernel")
DEFAULT_CHUNK_BYTES = 256 << 20
INTERPRETER_CACHE_BYTES = 1 << 30

_options: dict[str, Any] = {"backward": os.environ.get("SOFTTRIPLE_TRITON_BACKWARD", "auto"),
                                         "chunk_bytes": DEFAULT_CHUNK_BYTES, "cache_bytes": None}
class _Unset:
    def __repr__(self):
        return "<unchanged>"


_UNSET = _Unset()


def set_triton_options(backward: str | None = None, chunk_bytes: int | None = None,
                       cache_bytes=_UNSET) -> dict:
    """Configure the Triton backend's backward; returns the previous values.

    backward: "auto" (default: the cached path when the forward's cache fits ``cache_bytes``, else "chunked"),
        "chunked" (always recompute, memory O(N + chunk_bytes)) or "two_kernel" (the previous two-kernel backward,
        for comparison). SOFTTRIPLE_TRITON_BACKWARD sets it at import.
    chunk_bytes: bound of the chunked backward's dL/ds buffer (default 256 MiB).
    cache_bytes: bound of the forward's cache and of dL/ds made from it, N * C*K * (factor size + product size)
        + N * C * 4 bytes; None (the default) is 1/32 of the GPU's memory (4.4 GB on an H200, 2.5 GB on an 80 GB
        card; 1 GiB under the interpreter); 0 disables the cache.
    """
    old = dict(_options)
    if backward is not None:
        if backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
        _options["backward"] = backward
    if chunk_bytes is not None:
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be an int >= 1 (bytes), got {chunk_bytes!r}")
        _options["chunk_bytes"] = chunk_bytes
    if cache_bytes is not _UNSET:
        if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int)
                                        or cache_bytes < 0):
            raise ValueError(f"cache_bytes must be None (1/32 of the GPU's memory) or an int >= 0 (bytes), got "
                             f"{cache_bytes!r}")
        _options["cache_bytes"] = cache_bytes
    return old


def _mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b accumulated and returned in the accumulation dtype: on CUDA a 16-bit product with an fp32 output
    (torch.mm's out_dtype; tensor cores), fp32 following torch's matmul precision, fp64 exact. On the CPU
    (interpreter tests) 16-bit operands are upcast: their products are exact in fp32."""
    acc = acc_dtype(a.dtype)
    if a.dtype == acc:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=acc, out=out) if out is not None else torch.mm(a, b, out_dtype=acc)
    return torch.mm(a.to(acc), b.to(acc), out=out)


def _grad_scale(x: Tensor, upstream: Tensor, la: float, gamma: float) -> tuple[Tensor, Tensor]:
    """(inv_scale, scale) as 1-element device tensors: 1 except for fp16 products, where scale is the power of two
    at or above the bound max|upstream| la (1 + 2 max_i ||x_i|| / gamma) of |dL/ds| (no host synchronisation)."""
    from .kernels.config import hyper_tensor

    acc = acc_dtype(x.dtype)
    if x.dtype != torch.float16:
        one = hyper_tensor((1.0,), acc, x.device)
        return one, one
    xmax = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).amax() if x.shape[0] else x.new_zeros((), dtype=acc)
    bound = upstream.abs().amax().to(acc) * la * (1.0 + 2.02 * xmax / gamma) if upstream.numel() else xmax * 0
    scale = torch.where(bound > 0, torch.exp2(torch.ceil(torch.log2(bound))), torch.ones_like(bound))
    return scale.reciprocal().reshape(1), scale.reshape(1)


def factor_scale(x: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """(fac_scale, 1 / fac_scale) for the cached factor: for fp16 products the power of two at or below
    1 / (1 + 2 max_i ||x_i|| / gamma), the bound of |a| = p |1 + (s - S) / gamma|; 1 otherwise."""
    from .kernels.config import hyper_tensor

    acc = acc_dtype(x.dtype)
    if x.dtype != torch.float16:
        one = hyper_tensor((1.0,), acc, x.device)
        return one, one
    xmax = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).amax() if x.shape[0] else x.new_zeros((), dtype=acc)
    scale = torch.exp2(torch.ceil(torch.log2(1.0 + 2.02 * xmax / gamma))).reshape(1)
    return scale.reciprocal(), scale


def _serialised(fn):
    """Triton's interpreter patches triton.language module-wide while a kernel runs: two threads interpreting at
    once break each other, so launches are serialised there (_common.interpreter_serialised; a no-op on GPUs)."""
    def wrapper(*args, **kwargs):
        with interpreter_serialised():
            return fn(*args, **kwargs)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def cache_budget(device: torch.device) -> int:
    """The cache budget in bytes for a device under the current options."""
    from .kernels.target import target_of

    if _options["cache_bytes"] is not None:
        return int(_options["cache_bytes"])
    memory = target_of(device).memory
    return memory // 32 if memory else INTERPRETER_CACHE_BYTES


def cache_fits(N: int, C: int, K: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the forward keeps the factor cache for this shape under the current options: the factor, the logits
    and, during the backward, dL/ds beside them must fit the cache budget."""
    if _options["backward"] != "auto":
        return False
    item = torch.empty((), dtype=dtype).element_size()
    z = 8 if dtype == torch.float64 else 4
    return N * C * (K * 2 * item + z) <= cache_budget(device)


def _prepare(x: Tensor, fc: Tensor, dtype: torch.dtype):
    """(x in the product dtype, the prepared centers wt, the inverse column norms rw)."""
    from .kernels.prepare import prepare_centers

    wt, rw = prepare_centers(fc, dtype, acc_dtype(dtype))
    return x.to(dtype), wt, rw


def product_operand(x: Tensor, xp: Tensor) -> Tensor:
    """The ops return xp = x in the product dtype only when it differs from x (an op output may not alias an
    input); otherwise xp is empty and x itself is the operand."""
    return xp if xp.numel() or not x.numel() else x


def _own_xp(x: Tensor, xp: Tensor) -> Tensor:
    return xp if xp.dtype != x.dtype else x.new_empty((0,))


@_serialised
def loss_forward(x: Tensor, fc: Tensor, labels: Tensor, p: LossParams, dtype: torch.dtype, keep: bool):
    """(loss rows [N], lse [N], xp, wt [C*K, d], rw [C*K], factor, z) for x in the accumulation dtype and products
    in dtype (xp: see product_operand). keep: gradients will be wanted; the factor cache [N, C*K] and the logits z
    [N, C] are filled when it fits the budget, else both are empty."""
    from .kernels.forward import factor_dtype, softtriple_forward

    xp, wt, rw = _prepare(x, fc, dtype)
    N, C = x.shape[0], fc.shape[1] // p.K
    if keep and cache_fits(N, C, p.K, dtype, x.device):
        fac = torch.empty((N, C * p.K), dtype=factor_dtype(dtype), device=x.device)
        z = torch.empty((N, C), dtype=acc_dtype(dtype), device=x.device)
        rows, lse = softtriple_forward(xp, wt, labels, p, cache=(fac, z, factor_scale(xp, p.gamma)[0]))
    else:
        fac, z = x.new_empty((0,), dtype=acc_dtype(dtype)), x.new_empty((0,), dtype=acc_dtype(dtype))
        rows, lse = softtriple_forward(xp, wt, labels, p)
    return rows, lse, _own_xp(x, xp), wt, rw, fac, z


@_serialised
def logits_forward(x: Tensor, fc: Tensor, p: LossParams, dtype: torch.dtype):
    """(S [N, C], xp, wt, rw)."""
    from .kernels.forward import softtriple_logits_forward

    xp, wt, rw = _prepare(x, fc, dtype)
    return softtriple_logits_forward(xp, wt, p), _own_xp(x, xp), wt, rw


@_serialised
def backward(x: Tensor, fc: Tensor, wt: Tensor, rw: Tensor, labels: Tensor | None, g: Tensor | None,
             lse: Tensor | None, dS: Tensor | None, p: LossParams, fac: Tensor | None = None,
             z: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dx in the accumulation dtype, dfc in fc.dtype) for x in the product dtype. Loss mode: labels, g [N]
    (upstream per row), lse, and the forward's cache (fac, z; empty when it did not fit; left unchanged). Logits
    mode: dS [N, C]."""
    from .kernels.center_grad import center_grad

    acc = acc_dtype(x.dtype)
    if dS is not None:
        dS = dS.to(acc).contiguous()
        inv_scale, scale = _grad_scale(x, dS, 1.0, p.gamma)
    else:
        assert g is not None, "loss mode needs the upstream gradient g"
        g = g.to(acc).contiguous()
        inv_scale, scale = _grad_scale(x, g, p.la, p.gamma)
    if fac is not None and fac.numel():
        from .kernels.grad_cached import softtriple_grad_cached

        ds = softtriple_grad_cached(fac, z, labels, g, lse, p, inv_scale * factor_scale(x, p.gamma)[1], x.dtype)
        dx = _mm(ds, wt)
        V = _mm(x.t(), ds)
    elif _options["backward"] == "two_kernel":
        from .kernels.backward_w import softtriple_backward_w
        from .kernels.backward_x import softtriple_backward_x

        dx = softtriple_backward_x(x, wt, labels, g, lse, dS, p, inv_scale)
        V = softtriple_backward_w(x, wt, labels, g, lse, dS, p, inv_scale)
    else:
        dx, V = _chunked_backward(x, wt, labels, g, lse, dS, p, inv_scale)
    return dx.mul_(scale), center_grad(fc, V, rw, scale)


def _chunked_backward(x, wt, labels, g, lse, dS, p: LossParams, inv_scale):
    """(dx * inv_scale [N, d], V * inv_scale [d, C*K]) in the accumulation dtype."""
    import triton

    from .kernels.grad_chunk import grad_chunk_tiles, softtriple_grad_chunk

    N, d = x.shape
    M = wt.shape[0]
    C = M // p.K
    acc = acc_dtype(x.dtype)
    cfg = grad_chunk_tiles(x, wt, p.K, logits=dS is not None)
    n_tiles = triton.cdiv(C, cfg.block_c)
    tile_cols = cfg.block_c * p.K
    per_chunk = max(1, min(n_tiles, int(_options["chunk_bytes"]) // max(1, N * tile_cols * x.element_size())))
    buf = torch.empty((N, min(M, per_chunk * tile_cols)), dtype=x.dtype, device=x.device)
    dx = torch.zeros((N, d), dtype=acc, device=x.device)
    V = torch.empty((d, M), dtype=acc, device=x.device)
    xt = x.t()
    for t0 in range(0, n_tiles, per_chunk):
        t1 = min(n_tiles, t0 + per_chunk)
        c0, c1 = t0 * tile_cols, min(M, t1 * tile_cols)
        ds = buf[:, :c1 - c0]
        softtriple_grad_chunk(x, wt, labels, g, lse, dS, p, t0, t1, inv_scale, ds, cfg)
        dx += _mm(ds, wt[c0:c1])
        _mm(xt, ds, out=V[:, c0:c1])
    return dx, V
