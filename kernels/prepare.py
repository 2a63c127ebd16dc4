"""Prepared centers: rw = 1 / max(||fc_j||, 1e-12) and wt = (fc * rw).T in the product dtype, in one kernel.

fc [d, C*K] is the user's parameter (any float dtype and strides, column j = center j, never modified). Each
program owns a block of columns and walks d twice: the column norms, then the scaled, transposed, rounded copy
(the second read of the block comes from L2). The similarity kernels read wt [C*K, d]: column-normalised centers
stored row-wise, so a tile's operand is contiguous along d (K-major, as wgmma needs for TF32) and half the bytes
of fp32 centers for bf16 products. A transient buffer of one step (autocast casts the centers for every matmul in
the same way).

No overflow for any finite fc: squares are summed in fp64 for fp32 and narrower centers; fp64 centers are scaled
by their column's largest magnitude first (a third walk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import emulate_bf16, launch, tl_dtype
from .tiles import to_operand


@triton.jit
def softtriple_prepare_kernel(fc_ptr, rw_ptr, wt_ptr, d, M, stride_fd, stride_fm,
                              BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, RW_DTYPE: tl.constexpr,
                              OUT_DTYPE: tl.constexpr, SCALED: tl.constexpr, EMULATE_BF16: tl.constexpr):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = offs_m < M
    big = tl.full((BLOCK_M,), 1.0, tl.float64)
    if SCALED:  # fp64 centers: the largest magnitude of each column, so that the squares cannot overflow
        amax = tl.zeros((BLOCK_M,), tl.float64)
        for d0 in range(0, d, BLOCK_D):
            offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            mask = (offs_d[:, None] < d) & m_mask[None, :]
            w = tl.load(fc_ptr + offs_d[:, None] * stride_fd + offs_m[None, :] * stride_fm, mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(w.to(tl.float64)), axis=0))
        big = tl.where(amax > 0, amax, 1.0)
    ss = tl.zeros((BLOCK_M,), tl.float64)
    for d0 in range(0, d, BLOCK_D):
        offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = (offs_d[:, None] < d) & m_mask[None, :]
        w = tl.load(fc_ptr + offs_d[:, None] * stride_fd + offs_m[None, :] * stride_fm, mask=mask, other=0.0)
        u = w.to(tl.float64) / big[None, :]
        ss += tl.sum(u * u, axis=0)
    norm = tl.sqrt(ss) * big
    rw = 1.0 / tl.maximum(norm.to(RW_DTYPE), tl.full((BLOCK_M,), 1e-12, RW_DTYPE))  # eps in RW_DTYPE, not fp32
    tl.store(rw_ptr + offs_m, rw, mask=m_mask)
    for d0 in range(0, d, BLOCK_D):
        offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = (offs_d[:, None] < d) & m_mask[None, :]
        w = tl.load(fc_ptr + offs_d[:, None] * stride_fd + offs_m[None, :] * stride_fm, mask=mask, other=0.0)
        wn = to_operand(w.to(RW_DTYPE) * rw[None, :], OUT_DTYPE, EMULATE_BF16)
        tl.store(wt_ptr + offs_m[None, :] * d + offs_d[:, None], wn, mask=mask)


def prepare_centers(fc: torch.Tensor, dtype: torch.dtype, rw_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(wt [C*K, d] contiguous in ``dtype``, rw [C*K] in ``rw_dtype``): row j of wt = fc[:, j] * rw[j], computed in
    rw's dtype and rounded once. rw = 1 / max(||fc_j||, 1e-12), F.normalize's semantics."""
    if fc.dim() != 2:
        raise ValueError(f"expected fc [d, M]; got {tuple(fc.shape)}")
    d, M = fc.shape
    wt = torch.empty((M, d), dtype=dtype, device=fc.device)
    rw = torch.empty((M,), dtype=rw_dtype, device=fc.device)
    if M:
        launch(softtriple_prepare_kernel, (triton.cdiv(M, 64),), fc, rw, wt, d, M, fc.stride(0), fc.stride(1),
               BLOCK_D=32, BLOCK_M=64, RW_DTYPE=tl_dtype(rw_dtype), OUT_DTYPE=tl_dtype(dtype),
               SCALED=fc.dtype == torch.float64, EMULATE_BF16=emulate_bf16(dtype))
    return wt, rw
