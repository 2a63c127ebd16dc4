"""dL/ds from the forward's cache: ds_ij = g_i la (exp(z_ic - lse_i) - [c == y_i]) a_ij (c = j // K).

The default backward when the cache fits its budget: no tile is recomputed, so a training step does three matrix
products (the forward's, then dx = ds @ wt and dL/dwn = x^T @ ds in the library). A memory-bound pass: it reads
the factor a (bf16 for 16-bit products) and the class logits z, and writes dL/ds in the product dtype (times
inv_scale, see ops layer) to a new buffer: the cache stays valid for a second backward (retain_graph).
Grid: (row blocks, column blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import LossParams
from .config import acc_dtype, emulate_bf16, hyper_tensor, launch, target_of, tl_dtype
from .tiles import load_hyper, to_operand


@triton.jit
def softtriple_grad_cached_kernel(fac_ptr, z_ptr, y_ptr, g_ptr, lse_ptr, hp_ptr, scale_ptr, out_ptr, N, C,
                                  K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                                  ACC_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    M = C * K
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < M)[None, :]
    la, _, _ = load_hyper(hp_ptr)
    inv_scale = tl.load(scale_ptr).to(ACC_DTYPE)
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=float("inf")).to(ACC_DTYPE)
    rows64 = rows.to(tl.int64)
    cls = cols // K
    z = tl.load(z_ptr + rows64[:, None] * C + cls[None, :], mask=mask, other=float("-inf")).to(ACC_DTYPE)
    a = tl.load(fac_ptr + rows64[:, None] * M + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    gS = (g * la * inv_scale)[:, None] * (tl.exp(z - lse[:, None]) - tl.where(cls[None, :] == y[:, None], 1.0, 0.0))
    tl.store(out_ptr + rows64[:, None] * M + cols[None, :], to_operand(gS * a, OUT_DTYPE, EMULATE_BF16), mask=mask)


def softtriple_grad_cached(fac: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, g: torch.Tensor,
                           lse: torch.Tensor, p: LossParams, inv_scale: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:
    """dL/ds * inv_scale [N, C*K] in ``dtype`` (the product dtype)."""
    N, M = fac.shape
    C = M // p.K
    acc = acc_dtype(dtype)
    if z.shape != (N, C) or not fac.is_contiguous() or not z.is_contiguous():
        raise ValueError(f"expected contiguous factor [{N}, {C}*{p.K}] and logits [{N}, {C}]; got {tuple(fac.shape)} "
                         f"and {tuple(z.shape)}")
    out = torch.empty((N, M), dtype=dtype, device=fac.device)
    hp = hyper_tensor((p.la, 1.0 / p.gamma, p.margin), acc, fac.device)
    if N and M:
        # fp64: half the columns (an fp64 exp and gather per element; 16 x 256 spilled 20 bytes on sm_90)
        if target_of(fac.device).backend == "interpreter":
            bn, bm = 64, 256
        else:
            bn, bm = 16, (128 if acc == torch.float64 else 256)
        launch(softtriple_grad_cached_kernel, (triton.cdiv(N, bn), triton.cdiv(M, bm)),
               fac, z, labels, g, lse, hp, inv_scale, out, N, C, K=p.K, BLOCK_N=bn, BLOCK_M=bm,
               ACC_DTYPE=tl_dtype(acc), OUT_DTYPE=tl_dtype(dtype), EMULATE_BF16=emulate_bf16(dtype))
    return out
