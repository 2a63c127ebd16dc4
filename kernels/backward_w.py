"""Two-kernel backward, centers half: dL/dwn_j = sum_i ds_ij x_i (selectable for comparison with the default).

Grid: (class tiles, row splits). A program owns one tile of columns of one split's partial gradient, walks that
split's row blocks in order and recomputes every tile from the inputs and the saved per-row log-sum-exp.
Deterministic like the embeddings half: disjoint writes, split partials summed in a fixed order.
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
def _add_product(dw_split, M, ds, x_ptr, rows64, row_mask, cols, valid, d, stride_xn, stride_xd,
                 BLOCK_D: tl.constexpr, GRAD_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    for d0 in range(0, d, BLOCK_D):
        offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        d_mask = offs_d < d
        xt = tl.load(x_ptr + offs_d[:, None] * stride_xd + rows64[None, :] * stride_xn,
                     mask=d_mask[:, None] & row_mask[None, :], other=0.0).to(GRAD_DTYPE)
        ptrs = dw_split + offs_d[:, None] * M + cols[None, :]
        msk = d_mask[:, None] & valid[None, :]
        cur = tl.load(ptrs, mask=msk, other=0.0)
        cur = tl.dot(xt, ds, cur, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        tl.store(ptrs, cur, mask=msk)


@triton.jit
def softtriple_bwd_w_kernel(
    x_ptr, w_ptr, y_ptr, g_ptr, lse_ptr, ds_ptr, hp_ptr, scale_ptr, dw_ptr,
    N, d, C, M, n_row_blocks, blocks_per_split,
    stride_xn, stride_xd, stride_wm, stride_wd, stride_dsn, stride_dsc,
    K: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    LOGITS: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    KBX: tl.constexpr = KB if KB > 0 else 1
    la, inv_gamma, margin = load_hyper(hp_ptr)
    inv_scale = tl.load(scale_ptr).to(ACC_DTYPE)

    # partial of this split: dw [n_splits, d, M], contiguous, ACC_DTYPE
    dw_split = dw_ptr + pid_s.to(tl.int64) * d * M
    c0 = pid_t * BLOCK_C
    colsA, validA = group_lanes(c0, C, K, 0, KA, BLOCK_C)
    colsB, validB = group_lanes(c0, C, K, KA, KBX, BLOCK_C)

    b_begin = pid_s * blocks_per_split
    b_end = tl.minimum(b_begin + blocks_per_split, n_row_blocks)
    for b in range(b_begin, b_end):
        rows = b * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        _, dsA3, _, dsB3 = tile_grads(
            x_ptr, w_ptr, y_ptr, g_ptr, lse_ptr, ds_ptr, rows, row_mask, c0, C, d,
            la, inv_gamma, margin, stride_xn, stride_xd, stride_wm, stride_wd, stride_dsn, stride_dsc,
            K, KA, KB, BLOCK_N, BLOCK_C, BLOCK_D, DOT_DTYPE, ACC_DTYPE, PRECISION, LOGITS)
        rows64 = rows.to(tl.int64)
        dsA = tl.reshape(dsA3, (BLOCK_N, BLOCK_C * KA))
        _add_product(dw_split, M, to_operand(dsA * inv_scale, GRAD_DTYPE, EMULATE_BF16), x_ptr, rows64, row_mask,
                     colsA, validA, d, stride_xn, stride_xd, BLOCK_D, GRAD_DTYPE, ACC_DTYPE, PRECISION)
        if KB > 0:
            dsB = tl.reshape(dsB3, (BLOCK_N, BLOCK_C * KB))
            _add_product(dw_split, M, to_operand(dsB * inv_scale, GRAD_DTYPE, EMULATE_BF16), x_ptr, rows64, row_mask,
                         colsB, validB, d, stride_xn, stride_xd, BLOCK_D, GRAD_DTYPE, ACC_DTYPE, PRECISION)


def softtriple_backward_w(x, wt, labels, g, lse, dS, p: LossParams, inv_scale: torch.Tensor,
                          splits: int | None = None, lanes: int | None = None):
    """dL/dwn * inv_scale [d, C*K] in the accumulation dtype, the gradient with respect to the normalised centers
    (column j = center j); same modes as softtriple_backward_x."""
    K = p.K
    check_operands(x, wt, K)
    N, d = x.shape
    M = wt.shape[0]
    C = M // K
    acc = acc_dtype(x.dtype)
    y, g, lse, ds_arg, sdn, sdc, logits = upstream_args(labels, g, lse, dS, N, C, acc, x.device)
    hp = hyper_tensor((p.la, 1.0 / p.gamma, p.margin), acc, x.device)
    target = target_of(x.device)

    def run(cfg):
        plan = plan_launch(N, C, cfg, target, splits, loop_over_rows=True)
        dw = torch.zeros((plan.n_splits, d, M), dtype=acc, device=x.device)
        if N > 0 and M > 0:
            launch(softtriple_bwd_w_kernel, (plan.n_tiles, plan.n_splits),
                   x, wt, y, g, lse, ds_arg, hp, inv_scale, dw,
                   N, d, C, M, plan.n_row_blocks, plan.per_split,
                   x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), sdn, sdc,
                   LOGITS=logits, **kernel_meta(cfg, x.dtype, K, grad=True))
        return dw[0] if plan.n_splits == 1 else dw.sum(dim=0)

    return run(choose_tiles("backward_w", x, wt.shape[0], K, lanes, run))
