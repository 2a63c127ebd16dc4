"""dL/ds for a chunk of classes: the kernel of the default backward (one recomputation, no accumulation).

Grid: (row blocks, class tiles of the chunk): every program owns one tile, recomputes its cosines and the inner
softmax from the inputs and the forward's per-row log-sum-exp, and writes

  ds [N, chunk columns]: dL/ds in the product dtype (times ``inv_scale``: fp16 gradients are pre-scaled by a power
  of two into fp16's range), the operand of the two library products that follow (dx += ds @ wt[chunk],
  dL/dwn[:, chunk] = x^T @ ds; softtriple_triton/fused.py).

No two programs write the same address: results are bitwise reproducible run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import LossParams
from .config import acc_dtype, check_operands, choose_tiles, hyper_tensor, kernel_meta, launch, upstream_args
from .tiles import group_cells, load_hyper, tile_grads, to_operand


@triton.jit(do_not_specialize=["tile0", "col0"])  # one compiled variant for every chunk
def softtriple_grad_chunk_kernel(
    x_ptr, w_ptr, y_ptr, g_ptr, lse_ptr, ds_ptr, hp_ptr, scale_ptr, out_ptr,
    N, d, C, tile0, col0,
    stride_xn, stride_xd, stride_wm, stride_wd, stride_dsn, stride_dsc, stride_on,
    K: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    LOGITS: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    la, inv_gamma, margin = load_hyper(hp_ptr)
    inv_scale = tl.load(scale_ptr).to(ACC_DTYPE)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    c0 = (tile0 + pid_t) * BLOCK_C
    _, dsA3, _, dsB3 = tile_grads(
        x_ptr, w_ptr, y_ptr, g_ptr, lse_ptr, ds_ptr, rows, row_mask, c0, C, d,
        la, inv_gamma, margin, stride_xn, stride_xd, stride_wm, stride_wd, stride_dsn, stride_dsc,
        K, KA, KB, BLOCK_N, BLOCK_C, BLOCK_D, DOT_DTYPE, ACC_DTYPE, PRECISION, LOGITS)

    out_rows = out_ptr + rows.to(tl.int64)[:, None, None] * stride_on - col0
    colsA, validA = group_cells(c0, C, K, 0, KA, BLOCK_C)
    tl.store(out_rows + colsA[None, :, :], to_operand(dsA3 * inv_scale, GRAD_DTYPE, EMULATE_BF16),
             mask=row_mask[:, None, None] & validA[None, :, :])
    if KB > 0:
        colsB, validB = group_cells(c0, C, K, KA, KB, BLOCK_C)
        tl.store(out_rows + colsB[None, :, :], to_operand(dsB3 * inv_scale, GRAD_DTYPE, EMULATE_BF16),
                 mask=row_mask[:, None, None] & validB[None, :, :])


def grad_chunk_tiles(x: torch.Tensor, wt: torch.Tensor, K: int, lanes: int | None = None, logits: bool = False):
    """The tile of the chunk kernel (loss or logits mode), so the caller can cut the classes into chunks of whole
    tiles."""
    return choose_tiles("grad_logits" if logits else "grad", x, wt.shape[0], K, lanes, None)


def softtriple_grad_chunk(x, wt, labels, g, lse, dS, p: LossParams, tile_begin: int, tile_end: int,
                          inv_scale: torch.Tensor, out: torch.Tensor, cfg) -> None:
    """Fill ``out`` [N, cols of tiles tile_begin..tile_end) with dL/ds * inv_scale.

    Loss mode (dS is None): upstream gradient g [N] per row and the forward's lse [N].
    Logits mode (dS [N, C] given): backward of S = get_logits(x).
    cfg: the tile from grad_chunk_tiles (chunks are whole tiles).
    """
    K = p.K
    check_operands(x, wt, K)
    N, d = x.shape
    M = wt.shape[0]
    C = M // K
    acc = acc_dtype(x.dtype)
    col0 = tile_begin * cfg.block_c * K
    col1 = min(M, tile_end * cfg.block_c * K)
    if out.shape != (N, col1 - col0) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"out must be a row-major {x.dtype} [{N}, {col1 - col0}] buffer, got {out.dtype} "
                         f"{tuple(out.shape)} strides {out.stride()}")
    n_row_blocks = triton.cdiv(N, cfg.block_n)
    y, g, lse, ds_arg, sdn, sdc, logits = upstream_args(labels, g, lse, dS, N, C, acc, x.device)
    hp = hyper_tensor((p.la, 1.0 / p.gamma, p.margin), acc, x.device)
    if N > 0 and tile_end > tile_begin:
        launch(softtriple_grad_chunk_kernel, (n_row_blocks, tile_end - tile_begin),
               x, wt, y, g, lse, ds_arg, hp, inv_scale, out,
               N, d, C, tile_begin, col0,
               x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), sdn, sdc, out.stride(0),
               LOGITS=logits, **kernel_meta(cfg, x.dtype, K, grad=True))
