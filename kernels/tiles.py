"""Triton building blocks shared by the forward and backward kernels.

A *tile* is BLOCK_N rows of embeddings against BLOCK_C whole classes. Each class occupies KP lanes
(K rounded up to a power of two); lanes k >= K are padding and are masked with -inf before the
inner softmax, so they get probability exactly 0. Lane ``l`` of a tile is center ``l % KP`` of class
``c0 + l // KP``, i.e. column ``(c0 + l // KP) * K + l % KP`` of the centers matrix.

All offsets that can exceed 2**31 (row * stride, column * stride) are computed in int64.
"""

import triton
import triton.language as tl


@triton.jit
def tile_lanes(c0, C, K, BLOCK_C: tl.constexpr, KP: tl.constexpr):
    """Column indices (int64) and validity masks of the BLOCK_C*KP lanes of the tile starting at class c0."""
    lanes = tl.arange(0, BLOCK_C * KP)
    lane_cls = c0 + lanes // KP
    lane_k = lanes % KP
    k_valid = lane_k < K
    col_mask = (lane_cls < C) & k_valid
    cols = lane_cls.to(tl.int64) * K + lane_k
    return cols, col_mask, k_valid


@triton.jit
def similarity_tile(x_ptr, w_ptr, rw_ptr, rows, row_mask, cols, col_mask, d,
                    stride_xn, stride_xd, stride_wd, stride_wm,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """u = x[rows] @ w[:, cols] (raw dot products) and s = u * rw[cols] (cosines), both [BLOCK_N, BLOCK_M]."""
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC_DTYPE)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d
        offs_d64 = offs_d.to(tl.int64)
        xt = tl.load(x_ptr + rows64[:, None] * stride_xn + offs_d64[None, :] * stride_xd,
                     mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_d64[:, None] * stride_wd + cols[None, :] * stride_wm,
                     mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(xt.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    rw = tl.load(rw_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    return acc, acc * rw[None, :], rw


@triton.jit
def inner_softmax(s, k_valid, inv_gamma,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr):
    """Softmax over the K centers of each class at temperature gamma.

    Returns p and s reshaped to [BLOCK_N, BLOCK_C, KP] and the relaxed similarity
    S = sum_k p * s, [BLOCK_N, BLOCK_C]. Padded lanes get p = 0.
    """
    t = tl.where(k_valid[None, :], s * inv_gamma, float("-inf"))
    t3 = tl.reshape(t, (BLOCK_N, BLOCK_C, KP))
    s3 = tl.reshape(s, (BLOCK_N, BLOCK_C, KP))
    m = tl.max(t3, axis=2)
    e = tl.exp(t3 - m[:, :, None])
    p3 = e / tl.sum(e, axis=2)[:, :, None]
    S = tl.sum(p3 * s3, axis=2)
    return p3, s3, S


@triton.jit
def class_tile(x_ptr, w_ptr, rw_ptr, rows, row_mask, c0, C, K, d, inv_gamma,
               stride_xn, stride_xd, stride_wd, stride_wm,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Everything a kernel needs about the tile (rows x classes c0 .. c0+BLOCK_C), recomputed from the inputs:
    lanes (cols, col_mask), classes (cls, cls_valid), raw dots u, cosines s, rw, and the inner softmax (p3, s3, S)."""
    cols, col_mask, k_valid = tile_lanes(c0, C, K, BLOCK_C, KP)
    u, s, rw = similarity_tile(x_ptr, w_ptr, rw_ptr, rows, row_mask, cols, col_mask, d,
                               stride_xn, stride_xd, stride_wd, stride_wm,
                               BLOCK_N, BLOCK_C * KP, BLOCK_D, DOT_DTYPE, ACC_DTYPE, PRECISION)
    p3, s3, S = inner_softmax(s, k_valid, inv_gamma, BLOCK_N, BLOCK_C, KP)
    cls = c0 + tl.arange(0, BLOCK_C)
    return cols, col_mask, cls, cls < C, u, rw, p3, s3, S


@triton.jit
def load_hyper(hp_ptr):
    """(la, 1/gamma, margin) from a 3-element tensor in the accumulation dtype (fp64-exact for fp64 inputs;
    Python float kernel arguments would be rounded to fp32)."""
    return tl.load(hp_ptr), tl.load(hp_ptr + 1), tl.load(hp_ptr + 2)


@triton.jit
def class_logits(S, cls, cls_valid, y, la, margin):
    """z = la * (S - margin * onehot(y)), -inf on padded classes; also the target mask."""
    is_t = cls[None, :] == y[:, None]
    z = la * (S - tl.where(is_t, margin, 0.0))
    z = tl.where(cls_valid[None, :], z, float("-inf"))
    return z, is_t


@triton.jit
def grad_similarity(gS, p3, s3, S, inv_gamma, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """dL/ds from dL/dS: gS * p * (1 + (s - S) / gamma), flattened back to [BLOCK_N, BLOCK_M]."""
    coef = gS[:, :, None] * p3 * (1.0 + (s3 - S[:, :, None]) * inv_gamma)
    return tl.reshape(coef, (BLOCK_N, BLOCK_M))


@triton.jit
def upstream_grad(y_ptr, g_ptr, lse_ptr, ds_ptr, rows, row_mask, cls, cls_valid, S,
                  stride_dsn, stride_dsc, la, margin, LOGITS: tl.constexpr):
    """dL/dS for a tile.

    LOGITS: dS is given (the backward of ``get_logits``).
    Otherwise (the loss): g_i * la * (softmax_c(z)_ic - [c == y_i]) with the saved per-row lse.
    Padded rows and classes get exactly 0.
    """
    if LOGITS:
        gS = tl.load(ds_ptr + rows.to(tl.int64)[:, None] * stride_dsn + cls.to(tl.int64)[None, :] * stride_dsc,
                     mask=row_mask[:, None] & cls_valid[None, :], other=0.0).to(S.dtype)
    else:
        y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0).to(S.dtype)
        # +inf for padded rows makes q exactly 0 there (no exp overflow times a zero gradient).
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=float("inf")).to(S.dtype)
        z, is_t = class_logits(S, cls, cls_valid, y, la, margin)
        q = tl.exp(z - lse[:, None])
        gS = (g * la)[:, None] * (q - tl.where(is_t, 1.0, 0.0))
    return gS
