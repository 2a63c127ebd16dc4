"""Prepared centers: wt = (fc * rw).T in the product dtype, in one pass over fc.

fc [d, C*K] is the user's parameter (any float dtype, column j = center j, never modified); rw [C*K] its inverse
column norms. The similarity kernels read wt [C*K, d]: column-normalised centers stored row-wise, so a tile's
operand is contiguous along d (K-major, as wgmma needs for TF32) and half the bytes of fp32 centers for bf16
products. A transient buffer of one step (autocast casts the centers for every matmul in the same way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import emulate_bf16, launch, tl_dtype
from .tiles import to_operand


@triton.jit
def softtriple_prepare_kernel(fc_ptr, rw_ptr, wt_ptr, d, M, stride_fd, stride_fm,
                              BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, OUT_DTYPE: tl.constexpr,
                              EMULATE_BF16: tl.constexpr):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    m_mask = offs_m < M
    mask = (offs_d[:, None] < d) & m_mask[None, :]
    w = tl.load(fc_ptr + offs_d[:, None] * stride_fd + offs_m[None, :] * stride_fm, mask=mask, other=0.0)
    rw = tl.load(rw_ptr + offs_m, mask=m_mask, other=0.0)
    wn = to_operand(w.to(rw.dtype) * rw[None, :], OUT_DTYPE, EMULATE_BF16)
    tl.store(wt_ptr + offs_m[None, :] * d + offs_d[:, None], wn, mask=mask)


def prepare_centers(fc: torch.Tensor, rw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """wt [C*K, d] contiguous in ``dtype``: row j = fc[:, j] * rw[j] (computed in rw's dtype, rounded once)."""
    if fc.dim() != 2 or rw.shape != (fc.shape[1],):
        raise ValueError(f"expected fc [d, M] and rw [M]; got {tuple(fc.shape)} and {tuple(rw.shape)}")
    if fc.device != rw.device:
        raise ValueError(f"fc and rw on different devices: {fc.device}, {rw.device}")
    d, M = fc.shape
    wt = torch.empty((M, d), dtype=dtype, device=fc.device)
    if d and M:
        bd, bm = 64, 64
        launch(softtriple_prepare_kernel, (triton.cdiv(M, bm), triton.cdiv(d, bd)),
               fc, rw, wt, d, M, fc.stride(0), fc.stride(1), BLOCK_D=bd, BLOCK_M=bm, OUT_DTYPE=tl_dtype(dtype),
               EMULATE_BF16=emulate_bf16(dtype))
    return wt
