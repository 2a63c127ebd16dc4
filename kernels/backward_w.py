"""Backward kernel for the centers: dL/dw_j = rw_j * sum_i ds_ij x_i and dL/drw_j = sum_i ds_ij u_ij.

s_ij = u_ij * rw_j with u = x @ w (raw) and rw the inverse column norms, so the column normalisation's
own backward is left to autograd on rw (outside the kernel). Grid: (class tiles, row splits). A program
owns one tile of columns of one split's partial gradient, walks that split's row blocks in order and
recomputes every tile from the inputs and the saved per-row log-sum-exp. Deterministic like the
embedding backward: disjoint writes, split partials summed in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import acc_dtype, check_operands, choose_tiles, hyper_tensor, kernel_meta, plan_launch, upstream_args
from .tiles import class_tile, grad_similarity, load_hyper, tile_lanes, upstream_grad


@triton.jit
def softtriple_bwd_w_kernel(
    x_ptr, w_ptr, rw_ptr, y_ptr, g_ptr, lse_ptr, ds_ptr, hp_ptr, dw_ptr, drw_ptr,
    N, d, C, K, M, n_row_blocks, blocks_per_split,
    stride_xn, stride_xd, stride_wd, stride_wm, stride_dsn, stride_dsc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    LOGITS: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    BLOCK_M: tl.constexpr = BLOCK_C * KP
    la, inv_gamma, margin = load_hyper(hp_ptr)

    cols, col_mask, _ = tile_lanes(pid_t * BLOCK_C, C, K, BLOCK_C, KP)  # this program's columns
    # partials of this split: dw [n_splits, d, M] and drw [n_splits, M], contiguous, ACC_DTYPE
    dw_split = dw_ptr + pid_s.to(tl.int64) * d * M
    drw_acc = tl.zeros((BLOCK_M,), ACC_DTYPE)

    b_begin = pid_s * blocks_per_split
    b_end = tl.minimum(b_begin + blocks_per_split, n_row_blocks)
    for b in range(b_begin, b_end):
        rows = b * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        _, _, cls, cls_valid, u, rw, p3, s3, S = class_tile(
            x_ptr, w_ptr, rw_ptr, rows, row_mask, pid_t * BLOCK_C, C, K, d, inv_gamma,
            stride_xn, stride_xd, stride_wd, stride_wm, BLOCK_N, BLOCK_C, KP, BLOCK_D, DOT_DTYPE, ACC_DTYPE, PRECISION)
        gS = upstream_grad(y_ptr, g_ptr, lse_ptr, ds_ptr, rows, row_mask, cls, cls_valid, S,
                           stride_dsn, stride_dsc, la, margin, LOGITS)
        ds = grad_similarity(gS, p3, s3, S, inv_gamma, BLOCK_N, BLOCK_M)
        drw_acc += tl.sum(ds * u, axis=0)
        ds = (ds * rw[None, :]).to(GRAD_DTYPE)
        rows64 = rows.to(tl.int64)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < d
            offs_d64 = offs_d.to(tl.int64)
            xt = tl.load(x_ptr + offs_d64[:, None] * stride_xd + rows64[None, :] * stride_xn,
                         mask=d_mask[:, None] & row_mask[None, :], other=0.0).to(GRAD_DTYPE)
            ptrs = dw_split + offs_d64[:, None] * M + cols[None, :]
            msk = d_mask[:, None] & col_mask[None, :]
            cur = tl.load(ptrs, mask=msk, other=0.0)
            cur = tl.dot(xt, ds, cur, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            tl.store(ptrs, cur, mask=msk)

    tl.store(drw_ptr + pid_s.to(tl.int64) * M + cols, drw_acc, mask=col_mask)


def softtriple_backward_w(x, w, rw, labels, g, lse, dS, K: int, la: float, gamma: float, margin: float,
                          splits: int | None = None, block_m: int | None = None):
    """(dL/dw [d, C*K], dL/drw [C*K]) in the accumulation dtype; same modes as softtriple_backward_x."""
    check_operands(x, w, rw, K)
    N, d = x.shape
    M = w.shape[1]
    C = M // K
    acc = acc_dtype(x.dtype, w.dtype)
    y, g, lse, ds_arg, sdn, sdc, logits = upstream_args(labels, g, lse, dS, N, C, acc, x.device)
    hp = hyper_tensor((la, 1.0 / gamma, margin), acc, x.device)

    def run(cfg):
        plan = plan_launch(N, C, cfg, x.device, splits, loop_over_rows=True)
        dw = torch.zeros((plan.n_splits, d, M), dtype=acc, device=x.device)
        drw = torch.zeros((plan.n_splits, M), dtype=acc, device=x.device)
        if N > 0 and M > 0:
            softtriple_bwd_w_kernel[(plan.n_tiles, plan.n_splits)](
                x, w, rw, y, g, lse, ds_arg, hp, dw, drw,
                N, d, C, K, M, plan.n_row_blocks, plan.per_split,
                x.stride(0), x.stride(1), w.stride(0), w.stride(1), sdn, sdc,
                LOGITS=logits, **kernel_meta(cfg, x.dtype, w.dtype, grad=True),
            )
        if plan.n_splits == 1:
            return dw[0], drw[0]
        return dw.sum(dim=0), drw.sum(dim=0)

    return run(choose_tiles("backward_w", x, w, K, block_m, run))
