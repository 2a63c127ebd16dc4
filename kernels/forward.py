"""Forward kernel: per-row SoftTriple loss (online log-sum-exp over class tiles) or the N x C logits S.

Grid: (row blocks, class splits). Each program walks its share of class tiles; for each tile it forms the
cosines with tl.dot (fp32 accumulation, fp64 for fp64), applies the inner softmax over the K centers in registers
and folds the class logits into a running (max, sum-exp, target) triple. Nothing of size N x (C*K) is written.
With several splits each writes its partial triple and the launcher merges them in a fixed order
(deterministic). In logits mode each split writes its own columns of S.

CACHE: the forward also keeps what the backward needs so that it does not recompute the tiles: the gradient
factor a = p (1 + (s - S) / gamma) per lane ([N, C*K] in the product dtype, fp32 for fp32 products; times
fac_scale, a power of two that keeps fp16 factors in range; dL/ds = dL/dS * a) and the class logits z [N, C];
kernels/grad_cached.py turns them into dL/ds.
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
    emulate_bf16,
    hyper_tensor,
    kernel_meta,
    launch,
    plan_launch,
    target_of,
    tl_dtype,
)
from .tiles import class_logits, group_cells, lane_grad, load_hyper, tile_similarity, to_operand


@triton.jit
def softtriple_fwd_kernel(
    x_ptr, w_ptr, y_ptr, hp_ptr,
    m_ptr, l_ptr, zt_ptr, s_ptr, fac_ptr, z_ptr, fscale_ptr,
    N, d, C, n_tiles, tiles_per_split,
    stride_xn, stride_xd, stride_wm, stride_wd, stride_sn, stride_sc,
    K: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, LOGITS: tl.constexpr,
    CACHE: tl.constexpr, FAC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    la, inv_gamma, margin = load_hyper(hp_ptr)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)

    m_i = tl.full((BLOCK_N,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_N,), ACC_DTYPE)
    zt_i = tl.zeros((BLOCK_N,), ACC_DTYPE)

    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        c0 = t * BLOCK_C
        sA3, sB3, eA3, eB3, rden, S = tile_similarity(
            x_ptr, w_ptr, rows, row_mask, c0, C, d, inv_gamma, stride_xn, stride_xd, stride_wm, stride_wd,
            K, KA, KB, BLOCK_N, BLOCK_C, BLOCK_D, DOT_DTYPE, ACC_DTYPE, PRECISION)
        cls = c0 + tl.arange(0, BLOCK_C)
        cls_valid = cls < C
        if LOGITS:
            tl.store(s_ptr + rows.to(tl.int64)[:, None] * stride_sn + cls.to(tl.int64)[None, :] * stride_sc,
                     S, mask=row_mask[:, None] & cls_valid[None, :])
        else:
            z, is_t = class_logits(S, cls, cls_valid, y, la, margin)
            if CACHE:
                fscale = tl.load(fscale_ptr).to(ACC_DTYPE)
                rows64 = rows.to(tl.int64)
                tl.store(z_ptr + rows64[:, None] * C + cls[None, :], z, mask=row_mask[:, None] & cls_valid[None, :])
                fac_rows = fac_ptr + rows64[:, None, None] * (C * K)
                colsA, validA = group_cells(c0, C, K, 0, KA, BLOCK_C)
                tl.store(fac_rows + colsA[None, :, :],
                         to_operand(lane_grad(rden * fscale, eA3, sA3, S, inv_gamma), FAC_DTYPE, EMULATE_BF16),
                         mask=row_mask[:, None, None] & validA[None, :, :])
                if KB > 0:
                    colsB, validB = group_cells(c0, C, K, KA, KB, BLOCK_C)
                    tl.store(fac_rows + colsB[None, :, :],
                             to_operand(lane_grad(rden * fscale, eB3, sB3, S, inv_gamma), FAC_DTYPE,
                                        EMULATE_BF16),
                             mask=row_mask[:, None, None] & validB[None, :, :])
            zt_i += tl.sum(tl.where(is_t, z, 0.0), axis=1)
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m_i = m_new

    if not LOGITS:
        out = pid_s.to(tl.int64) * N + rows
        tl.store(m_ptr + out, m_i, mask=row_mask)
        tl.store(l_ptr + out, l_i, mask=row_mask)
        tl.store(zt_ptr + out, zt_i, mask=row_mask)


def factor_dtype(dt: torch.dtype) -> torch.dtype:
    """Storage dtype of the cached gradient factor: the product dtype for 16-bit products (fp16 pre-scaled, see
    fused.factor_scale), else the accumulation dtype."""
    return dt if dt in (torch.float16, torch.bfloat16) else acc_dtype(dt)


def _launch(x, wt, labels, p, logits, splits, lanes, cache=None):
    K = p.K
    check_operands(x, wt, K)
    N, d = x.shape
    C = wt.shape[0] // K
    acc = acc_dtype(x.dtype)
    hp = hyper_tensor((p.la, 1.0 / p.gamma, p.margin), acc, x.device)
    y = torch.empty((1,), dtype=torch.int64, device=x.device) if logits else labels
    target = target_of(x.device)
    fdt = factor_dtype(x.dtype)
    if cache is not None:
        fac, z, fscale = cache
        if fac.shape != (N, C * K) or fac.dtype != fdt or not fac.is_contiguous():
            raise ValueError(f"the factor cache must be a contiguous {fdt} [{N}, {C * K}] buffer")
        if z.shape != (N, C) or z.dtype != acc or not z.is_contiguous():
            raise ValueError(f"the logits cache must be a contiguous {acc} [{N}, {C}] buffer")
    else:
        fac = z = fscale = torch.empty((1,), dtype=acc, device=x.device)

    def run(cfg):
        plan = plan_launch(N, C, cfg, target, splits, loop_over_rows=False)
        if logits:
            S = torch.empty((N, C), dtype=acc, device=x.device)
            m = l = zt = S  # unused
        else:
            S = torch.empty((1, 1), dtype=acc, device=x.device)
            m = torch.empty((plan.n_splits, N), dtype=acc, device=x.device)
            l = torch.empty_like(m)
            zt = torch.empty_like(m)
        if N > 0:
            launch(softtriple_fwd_kernel, (plan.n_row_blocks, plan.n_splits),
                   x, wt, y, hp, m, l, zt, S, fac, z, fscale,
                   N, d, C, plan.n_tiles, plan.per_split,
                   x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), S.stride(0), S.stride(1),
                   LOGITS=logits, CACHE=cache is not None, FAC_DTYPE=tl_dtype(fdt), EMULATE_BF16=emulate_bf16(fdt),
                   **kernel_meta(cfg, x.dtype, K))
        return S if logits else (m, l, zt)

    return run(choose_tiles("forward_cache" if cache is not None else "forward", x, wt.shape[0], K, lanes, run))


def softtriple_forward(x: torch.Tensor, wt: torch.Tensor, labels: torch.Tensor, p: LossParams,
                       splits: int | None = None, lanes: int | None = None,
                       cache: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row classification loss and log-sum-exp (saved for the backward), both [N] in the accumulation dtype.

    x [N, d] (already normalised if wanted), wt [C*K, d] column-normalised centers stored row-wise (both in the
    product dtype), labels [N] int64 in [0, C). cache: (factor [N, C*K] in factor_dtype, z [N, C], fac_scale [1])
    buffers to fill for kernels/grad_cached.py.
    """
    if labels.shape != (x.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({x.shape[0]},); got {labels.dtype} {tuple(labels.shape)}")
    m, l, zt = _launch(x, wt, labels, p, False, splits, lanes, cache)
    if m.shape[0] == 1:
        mx, log_l, zt = m[0], torch.log(l[0]), zt[0]
    else:  # merge the splits' partial log-sum-exps in a fixed order
        mx = m.amax(dim=0)
        log_l = torch.log((l * torch.exp(m - mx)).sum(dim=0))
        zt = zt.sum(dim=0)
    # (max - z_target) + log(sum): a loss near 0 keeps its relative precision (no (max + log) - z_target)
    return (mx - zt) + log_l, mx + log_l


def softtriple_logits_forward(x: torch.Tensor, wt: torch.Tensor, p: LossParams, splits: int | None = None,
                              lanes: int | None = None) -> torch.Tensor:
    """S [N, C] in the accumulation dtype: relaxed class similarities (no margin, no la; uses p.K, p.gamma)."""
    return _launch(x, wt, None, p, True, splits, lanes)
