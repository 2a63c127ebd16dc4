"""The centers' gradient through their column normalisation: dfc = scale * rw * (V - wn (wn . V)), wn = fc * rw.

V [d, C*K] is dL/dwn (times 1/scale: fp16 gradients are pre-scaled) in the accumulation dtype, fc the user's
centers (any float dtype, any strides), rw their inverse column norms. Grid: column blocks; each program reads its
columns of fc and V twice (the column dots, then the update; the second read comes from L2) and writes dfc in
fc's dtype. One pass over HBM instead of autograd's chain through F.normalize, and the projection uses the exact
normalised centers, not their rounded product-dtype copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import acc_dtype, emulate_bf16, launch, tl_dtype
from .tiles import to_operand


@triton.jit
def softtriple_center_grad_kernel(fc_ptr, v_ptr, rw_ptr, scale_ptr, out_ptr, d, M, stride_fd, stride_fm,
                                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ACC_DTYPE: tl.constexpr,
                                  OUT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    cols = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cmask = cols < M
    rw = tl.load(rw_ptr + cols, mask=cmask, other=0.0).to(ACC_DTYPE)
    scale = tl.load(scale_ptr).to(ACC_DTYPE)
    dots = tl.zeros((BLOCK_M,), ACC_DTYPE)
    for d0 in range(0, d, BLOCK_D):
        rows = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = (rows < d)[:, None] & cmask[None, :]
        f = tl.load(fc_ptr + rows[:, None] * stride_fd + cols[None, :] * stride_fm, mask=mask, other=0.0)
        v = tl.load(v_ptr + rows[:, None] * M + cols[None, :], mask=mask, other=0.0)
        dots += tl.sum(f.to(ACC_DTYPE) * v, axis=0)
    # dfc = scale rw (V - wn proj), wn = fc rw, proj = wn . V = rw (fc . V): every factor is O(|V|) until the last
    # multiplication by rw (rw^2 alone underflows fp32 for column norms above 1e19)
    proj = rw * dots
    a = scale * rw
    for d0 in range(0, d, BLOCK_D):
        rows = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = (rows < d)[:, None] & cmask[None, :]
        f = tl.load(fc_ptr + rows[:, None] * stride_fd + cols[None, :] * stride_fm, mask=mask, other=0.0)
        v = tl.load(v_ptr + rows[:, None] * M + cols[None, :], mask=mask, other=0.0)
        g = a[None, :] * (v - (f.to(ACC_DTYPE) * rw[None, :]) * proj[None, :])
        tl.store(out_ptr + rows[:, None] * M + cols[None, :], to_operand(g, OUT_DTYPE, EMULATE_BF16), mask=mask)


def center_grad(fc: torch.Tensor, V: torch.Tensor, rw: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dL/dfc [d, C*K] contiguous in fc's dtype from V = dL/dwn / scale (contiguous, accumulation dtype)."""
    d, M = fc.shape
    acc = acc_dtype(fc.dtype, V.dtype)
    if V.shape != (d, M) or not V.is_contiguous() or V.dtype != acc:
        raise ValueError(f"V must be a contiguous {acc} [{d}, {M}] tensor, got {V.dtype} {tuple(V.shape)}")
    if rw.shape != (M,) or scale.numel() != 1:
        raise ValueError(f"rw must be [{M}] and scale one element; got {tuple(rw.shape)} and {scale.numel()}")
    out = torch.empty((d, M), dtype=fc.dtype, device=fc.device)
    if d and M:
        bd, bm = 32, 64
        launch(softtriple_center_grad_kernel, (triton.cdiv(M, bm),), fc, V, rw, scale, out, d, M,
               fc.stride(0), fc.stride(1), BLOCK_D=bd, BLOCK_M=bm, ACC_DTYPE=tl_dtype(acc),
               OUT_DTYPE=tl_dtype(fc.dtype), EMULATE_BF16=emulate_bf16(fc.dtype))
    return out
