"""Forward kernel: per-row SoftTriple loss (online log-sum-exp over class tiles) or the N x C logits S.

Grid: (row blocks, class splits). Each program walks its share of class tiles; for each tile it forms
the similarities with tl.dot (fp32/fp64 accumulation), applies the inner softmax over the K centers in
registers and folds the class logits into a running (max, sum-exp, target) triple. Nothing of size
N x (C*K) is ever written. With several splits, each writes its partial triple and the launcher merges
them in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import acc_dtype, check_operands, choose_tiles, hyper_tensor, kernel_meta, plan_launch
from .tiles import class_logits, class_tile, load_hyper


@triton.jit
def softtriple_fwd_kernel(
    x_ptr, w_ptr, rw_ptr, y_ptr, hp_ptr,
    m_ptr, l_ptr, zt_ptr, s_ptr,
    N, d, C, K, n_tiles, tiles_per_split,
    stride_xn, stride_xd, stride_wd, stride_wm, stride_sn, stride_sc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, LOGITS: tl.constexpr,
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
        _, _, cls, cls_valid, _, _, _, _, S = class_tile(
            x_ptr, w_ptr, rw_ptr, rows, row_mask, t * BLOCK_C, C, K, d, inv_gamma,
            stride_xn, stride_xd, stride_wd, stride_wm, BLOCK_N, BLOCK_C, KP, BLOCK_D, DOT_DTYPE, ACC_DTYPE, PRECISION)
        if LOGITS:
            tl.store(s_ptr + rows.to(tl.int64)[:, None] * stride_sn + cls.to(tl.int64)[None, :] * stride_sc,
                     S, mask=row_mask[:, None] & cls_valid[None, :])
        else:
            z, is_t = class_logits(S, cls, cls_valid, y, la, margin)
            zt_i += tl.sum(tl.where(is_t, z, 0.0), axis=1)
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m_i = m_new

    if not LOGITS:
        out = pid_s.to(tl.int64) * N + rows
        tl.store(m_ptr + out, m_i, mask=row_mask)
        tl.store(l_ptr + out, l_i, mask=row_mask)
        tl.store(zt_ptr + out, zt_i, mask=row_mask)


def _launch(x, w, rw, labels, K, la, gamma, margin, logits, splits, block_m):
    check_operands(x, w, rw, K)
    N, d = x.shape
    C = w.shape[1] // K
    acc = acc_dtype(x.dtype, w.dtype)
    hp = hyper_tensor((la, 1.0 / gamma, margin), acc, x.device)
    y = torch.empty((1,), dtype=torch.int64, device=x.device) if logits else labels

    def run(cfg):
        plan = plan_launch(N, C, cfg, x.device, 1 if logits else splits, loop_over_rows=False)
        if logits:
            S = torch.empty((N, C), dtype=acc, device=x.device)
            m = l = zt = S  # unused
        else:
            S = torch.empty((1, 1), dtype=acc, device=x.device)
            m = torch.empty((plan.n_splits, N), dtype=acc, device=x.device)
            l = torch.empty_like(m)
            zt = torch.empty_like(m)
        if N > 0:
            softtriple_fwd_kernel[(plan.n_row_blocks, plan.n_splits)](
                x, w, rw, y, hp, m, l, zt, S,
                N, d, C, K, plan.n_tiles, plan.per_split,
                x.stride(0), x.stride(1), w.stride(0), w.stride(1), S.stride(0), S.stride(1),
                LOGITS=logits, **kernel_meta(cfg, x.dtype, w.dtype, grad=False),
            )
        return S if logits else (m, l, zt)

    return run(choose_tiles("logits" if logits else "forward", x, w, K, block_m, run))


def softtriple_forward(x: torch.Tensor, w: torch.Tensor, rw: torch.Tensor, labels: torch.Tensor, K: int,
                       la: float, gamma: float, margin: float, splits: int | None = None,
                       block_m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row classification loss and log-sum-exp (saved for the backward), both [N] in the accumulation dtype.

    x [N, d] (already normalised if wanted), w [d, C*K] raw centers, rw [C*K] inverse column norms,
    labels [N] int64 in [0, C).
    """
    if labels.shape != (x.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({x.shape[0]},); got {labels.dtype} {tuple(labels.shape)}")
    m, l, zt = _launch(x, w, rw, labels, K, la, gamma, margin, False, splits, block_m)
    if m.shape[0] == 1:
        mx, log_l, zt = m[0], torch.log(l[0]), zt[0]
    else:  # merge the splits' partial log-sum-exps in a fixed order
        mx = m.amax(dim=0)
        log_l = torch.log((l * torch.exp(m - mx)).sum(dim=0))
        zt = zt.sum(dim=0)
    # (max - z_target) + log(sum): a loss near 0 keeps its relative precision (no (max + log) - z_target)
    return (mx - zt) + log_l, mx + log_l


def softtriple_logits_forward(x: torch.Tensor, w: torch.Tensor, rw: torch.Tensor, K: int, gamma: float,
                              block_m: int | None = None) -> torch.Tensor:
    """S [N, C] in the accumulation dtype: relaxed class similarities (no margin, no la)."""
    return _launch(x, w, rw, None, K, 1.0, gamma, 0.0, True, None, block_m)
