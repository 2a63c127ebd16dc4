"""Backward kernel for the embeddings: dL/dx = sum_j ds_ij * rw_j * w_j, recomputing tiles.

Grid: (row blocks, class splits). A program owns BLOCK_N rows of one split's partial gradient, walks
that split's class tiles in order, recomputes the similarity tile and the inner softmax from the inputs
and the saved per-row log-sum-exp (nothing of size N x (C*K) is stored), forms dL/ds in registers and
adds ds @ w_tile^T into its rows. No two programs write the same address and the split partials are
summed in a fixed order: results are bitwise reproducible run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import acc_dtype, check_operands, choose_tiles, hyper_tensor, kernel_meta, plan_launch, upstream_args
from .tiles import class_tile, grad_similarity, load_hyper, upstream_grad


@triton.jit
def softtriple_bwd_x_kernel(
    x_ptr, w_ptr, rw_ptr, y_ptr, g_ptr, lse_ptr, ds_ptr, hp_ptr, dx_ptr,
    N, d, C, K, n_tiles, tiles_per_split,
    stride_xn, stride_xd, stride_wd, stride_wm, stride_dsn, stride_dsc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    LOGITS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    BLOCK_M: tl.constexpr = BLOCK_C * KP
    la, inv_gamma, margin = load_hyper(hp_ptr)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # dx partial of this split: [n_splits, N, d] contiguous, accumulated in ACC_DTYPE
    dx_rows = dx_ptr + pid_s.to(tl.int64) * N * d + rows.to(tl.int64)[:, None] * d

    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        cols, col_mask, cls, cls_valid, _, rw, p3, s3, S = class_tile(
            x_ptr, w_ptr, rw_ptr, rows, row_mask, t * BLOCK_C, C, K, d, inv_gamma,
            stride_xn, stride_xd, stride_wd, stride_wm, BLOCK_N, BLOCK_C, KP, BLOCK_D, DOT_DTYPE, ACC_DTYPE, PRECISION)
        gS = upstream_grad(y_ptr, g_ptr, lse_ptr, ds_ptr, rows, row_mask, cls, cls_valid, S,
                           stride_dsn, stride_dsc, la, margin, LOGITS)
        ds = grad_similarity(gS, p3, s3, S, inv_gamma, BLOCK_N, BLOCK_M)
        ds = (ds * rw[None, :]).to(GRAD_DTYPE)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < d
            offs_d64 = offs_d.to(tl.int64)
            wt = tl.load(w_ptr + cols[:, None] * stride_wm + offs_d64[None, :] * stride_wd,
                         mask=col_mask[:, None] & d_mask[None, :], other=0.0).to(GRAD_DTYPE)
            ptrs = dx_rows + offs_d64[None, :]
            msk = row_mask[:, None] & d_mask[None, :]
            cur = tl.load(ptrs, mask=msk, other=0.0)
            cur = tl.dot(ds, wt, cur, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            tl.store(ptrs, cur, mask=msk)


def softtriple_backward_x(x, w, rw, labels, g, lse, dS, K: int, la: float, gamma: float, margin: float,
                          splits: int | None = None, block_m: int | None = None) -> torch.Tensor:
    """dL/dx [N, d] in the accumulation dtype.

    Loss mode (dS is None): upstream gradient g [N] per row and the forward's lse [N].
    Logits mode (dS [N, C] given): backward of S = get_logits(x).
    """
    check_operands(x, w, rw, K)
    N, d = x.shape
    C = w.shape[1] // K
    acc = acc_dtype(x.dtype, w.dtype)
    y, g, lse, ds_arg, sdn, sdc, logits = upstream_args(labels, g, lse, dS, N, C, acc, x.device)
    hp = hyper_tensor((la, 1.0 / gamma, margin), acc, x.device)

    def run(cfg):
        plan = plan_launch(N, C, cfg, x.device, splits, loop_over_rows=False)
        dx = torch.zeros((plan.n_splits, N, d), dtype=acc, device=x.device)
        if N > 0 and d > 0:
            softtriple_bwd_x_kernel[(plan.n_row_blocks, plan.n_splits)](
                x, w, rw, y, g, lse, ds_arg, hp, dx,
                N, d, C, K, plan.n_tiles, plan.per_split,
                x.stride(0), x.stride(1), w.stride(0), w.stride(1), sdn, sdc,
                LOGITS=logits, **kernel_meta(cfg, x.dtype, w.dtype, grad=True),
            )
        return dx[0] if plan.n_splits == 1 else dx.sum(dim=0)

    return run(choose_tiles("backward_x", x, w, K, block_m, run))
