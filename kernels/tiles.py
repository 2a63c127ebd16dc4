"""Triton building blocks shared by the kernels.

A *tile* is BLOCK_N rows of embeddings against BLOCK_C whole classes. The K centers of a class are split into
two lane groups of power-of-two width (config.lane_groups): group A holds centers 0 .. KA-1 of every class of the
tile (BLOCK_C * KA lanes), group B centers KA .. KA+KB-1 (BLOCK_C * KB lanes; lanes with k >= K are padding,
masked with -inf before the inner softmax, so they get weight exactly 0). Lane ``l`` of group A is center
``l % KA`` of class ``c0 + l // KA``: row ``(c0 + l // KA) * K + l % KA`` of the prepared centers wt [C*K, d].

The prepared centers are column-normalised and stored row-wise (wt = normalize(fc, dim=0).T in the product
dtype), so a similarity tile is a plain tl.dot: s = x @ wt[cols].T, the cosine itself.

All offsets that can exceed 2**31 (row * stride, column * stride) are computed in int64.
"""

import triton
import triton.language as tl


@triton.jit
def group_lanes(c0, C, K: tl.constexpr, K0: tl.constexpr, KW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows of wt (int64) and validity of the BLOCK_C*KW lanes of one lane group (centers K0 .. K0+KW-1 of classes
    c0 .. c0+BLOCK_C-1), for the operand loads of the dots."""
    lanes = tl.arange(0, BLOCK_C * KW)
    cls = c0 + lanes // KW
    k = K0 + lanes % KW
    return cls.to(tl.int64) * K + k, (cls < C) & (k < K)


@triton.jit
def similarity_tiles(x_ptr, w_ptr, rows, row_mask, colsA, validA, colsB, validB, d,
                     stride_xn, stride_xd, stride_wm, stride_wd,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BMA: tl.constexpr, BMB: tl.constexpr,
                     HAS_B: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Cosines of the tile, one accumulator per lane group: sA [BLOCK_N, BMA], sB [BLOCK_N, BMB]. The embedding
    chunk is loaded once per d step and feeds both dots."""
    rows64 = rows.to(tl.int64)
    accA = tl.zeros((BLOCK_N, BMA), dtype=ACC_DTYPE)
    accB = tl.zeros((BLOCK_N, BMB), dtype=ACC_DTYPE)
    for d0 in range(0, d, BLOCK_D):
        offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        d_mask = offs_d < d
        xt = tl.load(x_ptr + rows64[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                     mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_DTYPE)
        wa = tl.load(w_ptr + colsA[None, :] * stride_wm + offs_d[:, None] * stride_wd,
                     mask=validA[None, :] & d_mask[:, None], other=0.0).to(DOT_DTYPE)
        accA = tl.dot(xt, wa, accA, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if HAS_B:
            wb = tl.load(w_ptr + colsB[None, :] * stride_wm + offs_d[:, None] * stride_wd,
                         mask=validB[None, :] & d_mask[:, None], other=0.0).to(DOT_DTYPE)
            accB = tl.dot(xt, wb, accB, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return accA, accB


@triton.jit
def group_cells(c0, C, K: tl.constexpr, K0: tl.constexpr, KW: tl.constexpr, BLOCK_C: tl.constexpr):
    """The lanes of one group as a [BLOCK_C, KW] (class, center) grid: rows of wt (int64) and validity. The
    epilogues work on [BLOCK_N, BLOCK_C, KW] views of the accumulators and address memory through this grid."""
    c = c0 + tl.arange(0, BLOCK_C)[:, None]
    k = K0 + tl.arange(0, KW)[None, :]
    valid = (c < C) & (k < K)
    return c.to(tl.int64) * K + k, valid


@triton.jit
def inner_softmax(sA, sB, inv_gamma, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                  KA: tl.constexpr, KB: tl.constexpr, HAS_B: tl.constexpr):
    """Softmax over the K centers of each class at temperature gamma, across both lane groups.

    sA [BLOCK_N, BLOCK_C * KA], sB [BLOCK_N, BLOCK_C * KB]: the cosines of the two groups. Returns their
    [BLOCK_N, BLOCK_C, K*] views sA3, sB3, the unnormalised weights eA3, eB3 = exp((s - max_k s) / gamma) (0 on
    padded lanes), the reciprocal of their sum rden and the relaxed similarity S = sum_k p s ([BLOCK_N, BLOCK_C],
    p = e * rden). Each accumulator is reshaped once; everything after stays in three dimensions, so no layout
    conversion of a whole tile is needed. K == 1 needs no softmax: e = 1, rden = 1, S = s.
    """
    sA3 = tl.reshape(sA, (BLOCK_N, BLOCK_C, KA))
    sB3 = tl.reshape(sB, (BLOCK_N, BLOCK_C, KB))
    if KA == 1 and not HAS_B:
        eA3 = tl.full((BLOCK_N, BLOCK_C, KA), 1.0, sA.dtype)
        eB3 = sB3
        rden = tl.full((BLOCK_N, BLOCK_C), 1.0, sA.dtype)
        S = tl.sum(sA3, axis=2)
    else:
        tA = sA3 * inv_gamma
        m = tl.max(tA, axis=2)
        if HAS_B:
            kB = KA + tl.arange(0, KB)
            tB = tl.where((kB < K)[None, None, :], sB3 * inv_gamma, float("-inf"))
            m = tl.maximum(m, tl.max(tB, axis=2))
        eA3 = tl.exp(tA - m[:, :, None])
        den = tl.sum(eA3, axis=2)
        num = tl.sum(eA3 * sA3, axis=2)
        eB3 = sB3
        if HAS_B:
            eB3 = tl.exp(tB - m[:, :, None])
            den += tl.sum(eB3, axis=2)
            num += tl.sum(eB3 * sB3, axis=2)
        rden = 1.0 / den
        S = num * rden
    return sA3, sB3, eA3, eB3, rden, S


@triton.jit
def to_operand(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x rounded to the operand / storage dtype DTYPE. EMULATE_BF16 (interpreter, bf16 products): the interpreter
    converts fp32 to bf16 by truncation, so the round-to-nearest-even is done here on the fp32 bit pattern; the
    result is an fp32 value exactly representable in bf16 (DTYPE is fp32 then: dots are upcast, see
    config.dot_dtype), and storing it to a bf16 buffer is exact."""
    if EMULATE_BF16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


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
def lane_grad(gw, e3, s3, S, inv_gamma):
    """dL/ds of one lane group, [BLOCK_N, BLOCK_C, KW]: gw * e * (1 + (s - S) / gamma), where gw = dL/dS * rden
    [BLOCK_N, BLOCK_C] (dS/ds = p (1 + (s - S) / gamma), p = e * rden)."""
    return gw[:, :, None] * e3 * (1.0 + (s3 - S[:, :, None]) * inv_gamma)


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
    return tl.where(row_mask[:, None] & cls_valid[None, :], gS, 0.0)


@triton.jit
def tile_similarity(x_ptr, w_ptr, rows, row_mask, c0, C, d, inv_gamma, stride_xn, stride_xd, stride_wm, stride_wd,
                    K: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """The tile starting at class c0, recomputed from the inputs: (sA3, sB3, eA3, eB3, rden, S) of inner_softmax
    (S: the relaxed similarity [BLOCK_N, BLOCK_C]; the rest is dead code unless the caller uses it)."""
    HAS_B: tl.constexpr = KB > 0
    KBX: tl.constexpr = KB if KB > 0 else 1
    colsA, validA = group_lanes(c0, C, K, 0, KA, BLOCK_C)
    colsB, validB = group_lanes(c0, C, K, KA, KBX, BLOCK_C)
    sA, sB = similarity_tiles(x_ptr, w_ptr, rows, row_mask, colsA, validA, colsB, validB, d,
                              stride_xn, stride_xd, stride_wm, stride_wd,
                              BLOCK_N, BLOCK_D, BLOCK_C * KA, BLOCK_C * KBX, HAS_B, DOT_DTYPE, ACC_DTYPE, PRECISION)
    return inner_softmax(sA, sB, inv_gamma, K, BLOCK_N, BLOCK_C, KA, KBX, HAS_B)


@triton.jit
def tile_grads(x_ptr, w_ptr, y_ptr, g_ptr, lse_ptr, ds_ptr, rows, row_mask, c0, C, d, la, inv_gamma, margin,
               stride_xn, stride_xd, stride_wm, stride_wd, stride_dsn, stride_dsc,
               K: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
               PRECISION: tl.constexpr, LOGITS: tl.constexpr):
    """Recompute the tile from the inputs and return, per lane group, the cosines and dL/ds as
    [BLOCK_N, BLOCK_C, K*] tensors: (sA3, dsA3, sB3, dsB3); the group-B values are dummies when KB == 0 and 0 on
    padded lanes."""
    sA3, sB3, eA3, eB3, rden, S = tile_similarity(
        x_ptr, w_ptr, rows, row_mask, c0, C, d, inv_gamma, stride_xn, stride_xd, stride_wm, stride_wd,
        K, KA, KB, BLOCK_N, BLOCK_C, BLOCK_D, DOT_DTYPE, ACC_DTYPE, PRECISION)
    cls = c0 + tl.arange(0, BLOCK_C)
    gS = upstream_grad(y_ptr, g_ptr, lse_ptr, ds_ptr, rows, row_mask, cls, cls < C, S,
                       stride_dsn, stride_dsc, la, margin, LOGITS)
    gw = gS * rden
    dsA3 = lane_grad(gw, eA3, sA3, S, inv_gamma)
    dsB3 = dsA3
    if KB > 0:
        dsB3 = lane_grad(gw, eB3, sB3, S, inv_gamma)
    return sA3, dsA3, sB3, dsB3
