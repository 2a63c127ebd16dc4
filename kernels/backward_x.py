"""Two-kernel backward, embeddings half: dL/dx = sum_j ds_ij wn_j, recomputing tiles (selectable for comparison).

Grid: (row blocks, class splits). A program owns BLOCK_N rows of one split's partial gradient, walks that split's
class tiles in order, recomputes the cosines and the inner softmax from the inputs and the saved per-row
log-sum-exp (nothing of size N x (C*K) is stored), forms dL/ds in registers and adds ds @ wt[tile] into its rows.
No two programs write the same address and the split partials are summed in a fixed order: bitwise
reproducible. Two GEMM-equivalents (recompute + product), against one for the chunked default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import LossParams
from .config import (
    acc_dtype,
    check_operands,
    choose_tiles,
    hyper_tensor,
    kernel_meta,
    launch,
    plan_launch,
    target_of,
    upstream_args,
)
from .tiles import group_lanes, load_hyper, tile_grads, to_operand


@triton.jit
def _add_product(dx_rows, ds, w_ptr, cols, valid, row_mask, d, stride_wm, stride_wd,
                 BLOCK_D: tl.constexpr, GRAD_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    for d0 in range(0, d, BLOCK_D):
        offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        d_mask = offs_d < d
        wt = tl.load(w_ptr + cols[:, None] * stride_wm + offs_d[None, :] * stride_wd,
                     mask=valid[:, None] & d_mask[None, :], other=0.0).to(GRAD_DTYPE)
        ptrs = dx_rows + offs_d[None, :]
        msk = row_mask[:, None] & d_mask[None, :]
        cur = tl.load(ptrs, mask=msk, other=0.0)
        cur = tl.dot(ds, wt, cur, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        tl.store(ptrs, cur, mask=msk)


@triton.jit
def softtriple_bwd_x_kernel(
    x_ptr, w_ptr, y_ptr, g_ptr, lse_ptr, ds_ptr, hp_ptr, scale_ptr, dx_ptr,
    N, d, C, n_tiles, tiles_per_split,
    stride_xn, stride_xd, stride_wm, stride_wd, stride_dsn, stride_dsc,
    K: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    LOGITS: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    la, inv_gamma, margin = load_hyper(hp_ptr)
    inv_scale = tl.load(scale_ptr).to(ACC_DTYPE)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # dx partial of this split: [n_splits, N, d] contiguous, accumulated in ACC_DTYPE
    dx_rows = dx_ptr + pid_s.to(tl.int64) * N * d + rows.to(tl.int64)[:, None] * d

    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        c0 = t * BLOCK_C
        _, dsA3, _, dsB3 = tile_grads(
            x_ptr, w_ptr, y_ptr, g_ptr, lse_ptr, ds_ptr, rows, row_mask, c0, C, d,
            la, inv_gamma, margin, stride_xn, stride_xd, stride_wm, stride_wd, stride_dsn, stride_dsc,
            K, KA, KB, BLOCK_N, BLOCK_C, BLOCK_D, DOT_DTYPE, ACC_DTYPE, PRECISION, LOGITS)
        colsA, validA = group_lanes(c0, C, K, 0, KA, BLOCK_C)
        dsA = tl.reshape(dsA3, (BLOCK_N, BLOCK_C * KA))
        _add_product(dx_rows, to_operand(dsA * inv_scale, GRAD_DTYPE, EMULATE_BF16), w_ptr, colsA, validA,
                     row_mask, d, stride_wm, stride_wd, BLOCK_D, GRAD_DTYPE, ACC_DTYPE, PRECISION)
        if KB > 0:
            colsB, validB = group_lanes(c0, C, K, KA, KB, BLOCK_C)
            dsB = tl.reshape(dsB3, (BLOCK_N, BLOCK_C * KB))
            _add_product(dx_rows, to_operand(dsB * inv_scale, GRAD_DTYPE, EMULATE_BF16), w_ptr, colsB, validB,
                         row_mask, d, stride_wm, stride_wd, BLOCK_D, GRAD_DTYPE, ACC_DTYPE, PRECISION)


def softtriple_backward_x(x, wt, labels, g, lse, dS, p: LossParams, inv_scale: torch.Tensor,
                          splits: int | None = None, lanes: int | None = None) -> torch.Tensor:
    """dL/dx * inv_scale, [N, d] in the accumulation dtype.

    Loss mode (dS is None): upstream gradient g [N] per row and the forward's lse [N].
    Logits mode (dS [N, C] given): backward of S = get_logits(x).
    """
    K = p.K
    check_operands(x, wt, K)
    N, d = x.shape
    C = wt.shape[0] // K
    acc = acc_dtype(x.dtype)
    y, g, lse, ds_arg, sdn, sdc, logits = upstream_args(labels, g, lse, dS, N, C, acc, x.device)
    hp = hyper_tensor((p.la, 1.0 / p.gamma, p.margin), acc, x.device)
    target = target_of(x.device)

    def run(cfg):
        plan = plan_launch(N, C, cfg, target, splits, loop_over_rows=False)
        dx = torch.zeros((plan.n_splits, N, d), dtype=acc, device=x.device)
        if N > 0 and d > 0:
            launch(softtriple_bwd_x_kernel, (plan.n_row_blocks, plan.n_splits),
                   x, wt, y, g, lse, ds_arg, hp, inv_scale, dx,
                   N, d, C, plan.n_tiles, plan.per_split,
                   x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), sdn, sdc,
                   LOGITS=logits, **kernel_meta(cfg, x.dtype, K, grad=True))
        return dx[0] if plan.n_splits == 1 else dx.sum(dim=0)

    return run(choose_tiles("backward_x", x, wt.shape[0], K, lanes, run))
