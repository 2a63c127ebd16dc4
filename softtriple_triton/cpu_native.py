"""Fused element-wise kernels of the torch backend on CPU: a small C library compiled at first use.

The torch backend's matrix products are torch's (MKL/oneDNN); everything between them, the inner softmax over
the K centers, the class logits, the online log-sum-exp and the gradient factor, is one pass per chunk here
instead of ~30 torch operations (each a pass over an N x chunk buffer). The chunk is laid out transposed,
sT [chunk columns, N] (a row per center, computed as w_chunk^T @ x^T by the same GEMM), so the K centers of a
class are K contiguous vectors over the batch and every step of the per-class arithmetic is a vector operation.

The library is plain C (no torch headers): one system C compiler call, under a second, at the first use in a
process that finds no cached build (the build is cached on disk, keyed by the source, the flags, the compiler
and the CPU). OpenMP parallel loops use the OpenMP runtime torch already loaded (same soname) and
``torch.get_num_threads()`` threads. Each row / column is computed by exactly one thread in a fixed order, so
results are bitwise reproducible and independent of the thread count.

When no compiler is found, the build fails, or ``SOFTTRIPLE_TRITON_NATIVE=0`` is set, ``library()`` returns
None (with one warning, except when disabled on purpose) and the torch backend runs its pure-torch code.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import torch

ENV_SWITCH = "SOFTTRIPLE_TRITON_NATIVE"   # "0" = never build or use the native kernels
ENV_CACHE = "SOFTTRIPLE_TRITON_CACHE"     # folder of the cached build (default ~/.cache/softtriple_triton)

_VERSION = 8  # of the C source: a cached build answering another number is rebuilt

_COMMON = r"""
#define _POSIX_C_SOURCE 199309L
#include <time.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 256   /* batch entries per inner vector loop (scratch K x TILE per thread) */
#define CB 128     /* columns per block of the column-norm and centre-gradient kernels */
#define ST_LANES 16  /* partial sums of the row reductions */

/* exp(x) to ~1 ulp, branch-free so that loops over it vectorise: x = n ln2 + r, |r| <= ln2/2, exp(r) by its
   Taylor polynomial (degree 7 in fp32, 14 in fp64), 2^n applied as two factors so that the result underflows
   gradually like libm's. The input is clamped where the result has rounded to 0 / overflowed to inf already.
   NaN propagates; -inf gives 0, +inf gives inf. */
static const double ST_INV_FACTORIAL[15] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040,
    1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0,
    1.0 / 87178291200.0};

static inline float st_exp_f32(float x) {
    float xc = x < -104.0f ? -104.0f : x;                   /* exp(-104) rounds to 0: gradual underflow below */
    xc = xc > 89.0f ? 89.0f : xc;                           /* exp(89) overflows to inf; NaN passes both */
    float kf = xc * 1.44269504088896341f + 12582912.0f;     /* 1.5 * 2^23: kf's low bits hold round(x / ln2) */
    uint32_t kb;
    memcpy(&kb, &kf, 4);
    int32_t ni = (int32_t)(kb - 0x4B400000u);                /* the integer n, no float-to-int conversion */
    float n = kf - 12582912.0f;
    float r = xc - n * 0.693359375f;                        /* ln2 = 0.693359375 - 2.12194440e-4 */
    r = r + n * 2.12194440e-4f;
    float p = 1.0f / 5040.0f;                               /* sum_k r^k / k!, k <= 7, by Horner */
    for (int k = 6; k >= 0; k--) p = p * r + (float)ST_INV_FACTORIAL[k];
    int32_t n1 = ni >> 1, n2 = ni - n1;                     /* each in [-75, 64]: two normal powers of two */
    uint32_t b1 = (uint32_t)(n1 + 127) << 23, b2 = (uint32_t)(n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, 4);
    memcpy(&s2, &b2, 4);
    return p * s1 * s2;                                     /* NaN: r and p are NaN, whatever n holds */
}

static inline double st_exp_f64(double x) {
    double xc = x < -746.0 ? -746.0 : x;
    xc = xc > 710.0 ? 710.0 : xc;
    double kf = xc * 1.4426950408889634 + 6755399441055744.0;   /* 1.5 * 2^52 */
    uint64_t kb;
    memcpy(&kb, &kf, 8);
    int64_t ni = (int64_t)(kb - 0x4338000000000000ull);
    double n = kf - 6755399441055744.0;
    double r = xc - n * 6.93147180369123816490e-01;          /* ln2 split (hi has 32 trailing zero bits) */
    r = r - n * 1.90821492927058770002e-10;
    double p = ST_INV_FACTORIAL[14];                        /* k <= 14 */
    for (int k = 13; k >= 0; k--) p = p * r + ST_INV_FACTORIAL[k];
    int64_t n1 = ni >> 1, n2 = ni - n1;                     /* each in [-538, 512] */
    uint64_t b1 = (uint64_t)(n1 + 1023) << 52, b2 = (uint64_t)(n2 + 1023) << 52;
    double s1, s2;
    memcpy(&s1, &b1, 8);
    memcpy(&s2, &b2, 8);
    return p * s1 * s2;
}

/* exp(x) for x in [-87, 0] (fp32) / [-708, 0] (fp64) or NaN, as st_exp but without the clamps and with 2^n as one
   factor (the result is a normal number): the inner softmax with the constant shift, whose argument
   t - 1/gamma lies in [-2/gamma, 0] with gamma >= 2/80 (fp32) / 2/700 (fp64), or is NaN (see _bounded). */
static inline float st_expb_f32(float x) {
    float kf = x * 1.44269504088896341f + 12582912.0f;
    uint32_t kb;
    memcpy(&kb, &kf, 4);
    float n = kf - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    for (int k = 6; k >= 0; k--) p = p * r + (float)ST_INV_FACTORIAL[k];
    uint32_t b = (kb - 0x4B400000u + 127u) << 23;           /* 2^n, n in [-116, 1] */
    float sc;
    memcpy(&sc, &b, 4);
    return p * sc;
}

static inline double st_expb_f64(double x) {
    double kf = x * 1.4426950408889634 + 6755399441055744.0;
    uint64_t kb;
    memcpy(&kb, &kf, 8);
    double n = kf - 6755399441055744.0;
    double r = x - n * 6.93147180369123816490e-01;
    r = r - n * 1.90821492927058770002e-10;
    double p = ST_INV_FACTORIAL[14];
    for (int k = 13; k >= 0; k--) p = p * r + ST_INV_FACTORIAL[k];
    uint64_t b = (kb - 0x4338000000000000ull + 1023ull) << 52;  /* 2^n, n in [-1011, 1] */
    double sc;
    memcpy(&sc, &b, 8);
    return p * sc;
}

int st_version(void) { return ST_VERSION; }

/* Seconds spent in the parts of the fused calls while timing is on (bench/report.py's profile): the column norms,
   the u, dx and V products, the forward and backward passes, the centre-gradient correction. */
enum { ST_NORMS, ST_U, ST_FWD, ST_BWD, ST_DX, ST_V, ST_CORR, ST_NPARTS };
static double st_part_s[ST_NPARTS];
static int st_timing = 0;
static double st_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
#define ST_PART(i, stmt) do { if (st_timing) { double t_ = st_now(); stmt; st_part_s[i] += st_now() - t_; } \
                              else { stmt; } } while (0)
void st_part_timing(int on, double* out) {  /* out (ST_NPARTS): the sums so far, then reset */
    for (int i = 0; i < ST_NPARTS; i++) { if (out) out[i] = st_part_s[i]; st_part_s[i] = 0; }
    st_timing = on;
}

/* The first index of labels [n] outside [0, C), or -1. */
int64_t st_labels_bad(int64_t n, const int64_t* labels, int64_t C) {
    for (int64_t i = 0; i < n; i++)
        if (labels[i] < 0 || labels[i] >= C) return i;
    return -1;
}

void st_exp_f32_array(int64_t n, const float* x, float* y) { for (int64_t i = 0; i < n; i++) y[i] = st_exp_f32(x[i]); }
void st_exp_f64_array(int64_t n, const double* x, double* y) {
    for (int64_t i = 0; i < n; i++) y[i] = st_exp_f64(x[i]);
}
void st_expb_f32_array(int64_t n, const float* x, float* y) {
    for (int64_t i = 0; i < n; i++) y[i] = st_expb_f32(x[i]);
}
void st_expb_f64_array(int64_t n, const double* x, double* y) {
    for (int64_t i = 0; i < n; i++) y[i] = st_expb_f64(x[i]);
}
"""

# One body, instantiated for float (f32) and double (f64): `real` and `_SFX` are replaced.
_BODY = r"""
/* rw_j = 1 / max(||w_j||, 1e-12) for the columns of w [d, M] (row stride ldw); sums in double. Blocks of columns
   whose row segments are 4 KiB, so that every row read is a contiguous run the hardware prefetches. */
void st_inv_norms_SFX(int64_t d, int64_t M, const real* restrict w, int64_t ldw, real* restrict rw, int nt) {
    enum { B = 4096 / sizeof(real) };
    int64_t nb = (M + B - 1) / B;
    #pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && d * M > 65536)
    for (int64_t b = 0; b < nb; b++) {
        int64_t j0 = b * B, nj = M - j0 < B ? M - j0 : B;
        double acc[B];
        for (int64_t j = 0; j < nj; j++) acc[j] = 0.0;
        int64_t r = 0;
        for (; r + 4 <= d; r += 4) {  /* four rows per sweep: a quarter of the loads and stores of acc */
            const real* restrict w0 = w + r * ldw + j0;
            const real* restrict w1 = w0 + ldw;
            const real* restrict w2 = w1 + ldw;
            const real* restrict w3 = w2 + ldw;
            for (int64_t j = 0; j < nj; j++) {
                double v0 = (double)w0[j], v1 = (double)w1[j], v2 = (double)w2[j], v3 = (double)w3[j];
                acc[j] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3);
            }
        }
        for (; r < d; r++) {
            const real* restrict wr = w + r * ldw + j0;
            for (int64_t j = 0; j < nj; j++) {
                double v = (double)wr[j];
                acc[j] += v * v;
            }
        }
        for (int64_t j = 0; j < nj; j++) {
            double nrm = sqrt(acc[j]);
            rw[j0 + j] = (real)(1.0 / (nrm > 1e-12 ? nrm : 1e-12));
        }
    }
}

/* Rows of x [N, d] (row stride ldx) normalised as F.normalize does, y = x / max(||x||, 1e-12), for any finite x:
   sums of squares in double, and for double input each row first divided by the power of two s that brings its
   largest entry into [1, 2) when it is >= 2 (exact; as _common.pow2_scale), so no square overflows. Per row:
   nc = max(||x / s||, 1e-12) (NaN stays NaN) and s, for the backward. A row is one thread's. */
void st_unit_rows_SFX(int64_t N, int64_t d, const real* restrict x, int64_t ldx, real* restrict y,
                      double* restrict nc, double* restrict sc, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && N * d > 16384)
    for (int64_t i = 0; i < N; i++) {
        const real* restrict xr = x + i * ldx;
        real* restrict yr = y + i * d;
        double s = 1.0;
        if (sizeof(real) == sizeof(double)) {
            double m = 0.0;
            for (int64_t r = 0; r < d; r++) { double a = fabs((double)xr[r]); m = a > m ? a : m; }
            if (m >= 2.0 && m <= 1.7976931348623157e308) { int e; frexp(m, &e); s = ldexp(1.0, e - 1); }
        }
        const double inv_s = 1.0 / s;
        double part[ST_LANES] = {0};                        /* fixed-order partial sums: a vector loop */
        int64_t r0 = 0;
        for (; r0 + ST_LANES <= d; r0 += ST_LANES)
            for (int l = 0; l < ST_LANES; l++) { double v = (double)xr[r0 + l] * inv_s; part[l] += v * v; }
        for (; r0 < d; r0++) { double v = (double)xr[r0] * inv_s; part[0] += v * v; }
        double acc = 0.0;
        for (int l = 0; l < ST_LANES; l++) acc += part[l];
        double n = sqrt(acc);
        double c = n < 1e-12 ? 1e-12 : n;                  /* NaN < eps is false: NaN propagates */
        const double is = 1.0 / s, ic = 1.0 / c;             /* 1 / s is a power of two: exact */
        for (int64_t r = 0; r < d; r++) yr[r] = (real)(((double)xr[r] * is) * ic);
        nc[i] = c;
        sc[i] = s;
    }
}

/* Backward of st_unit_rows: dx = (g - y (y . g)) / nc / s (as products with the reciprocals) where the norm
   was not clamped (nc > 1e-12), g / nc / s where it was (the clamp's gradient is zero), in double per row. */
void st_unit_rows_backward_SFX(int64_t N, int64_t d, const real* restrict y, const real* restrict g, int64_t ldg,
                               const double* restrict nc, const double* restrict sc, real* restrict dx, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && N * d > 16384)
    for (int64_t i = 0; i < N; i++) {
        const real* restrict yr = y + i * d;
        const real* restrict gr = g + i * ldg;
        real* restrict dr = dx + i * d;
        double part[ST_LANES] = {0};
        int64_t r0 = 0;
        for (; r0 + ST_LANES <= d; r0 += ST_LANES)
            for (int l = 0; l < ST_LANES; l++) part[l] += (double)yr[r0 + l] * (double)gr[r0 + l];
        for (; r0 < d; r0++) part[0] += (double)yr[r0] * (double)gr[r0];
        double dot = 0.0;
        for (int l = 0; l < ST_LANES; l++) dot += part[l];
        const double c = nc[i], s = sc[i];
        if (!(c > 1e-12)) dot = c != c ? c : 0.0;       /* clamped: no projection; a NaN norm stays NaN */
        const double ic = 1.0 / c, is = 1.0 / s;
        for (int64_t r = 0; r < d; r++) dr[r] = (real)((((double)gr[r] - (double)yr[r] * dot) * ic) * is);
    }
}

/* Through the column normalisation: V -= (w rw) coef (coef_j = rw_j (w_j . V_j), computed by st_backward), rows
   in parallel, each a contiguous stream. w is normalised before the product: rw_j^2 alone under- or overflows
   for columns of norm beyond ~1e19 (fp32). */
void st_center_grad_SFX(int64_t d, int64_t M, real* restrict V, int64_t ldv, const real* restrict w, int64_t ldw,
                        const real* restrict rw, const real* restrict coef, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && d * M > 65536)
    for (int64_t r = 0; r < d; r++) {
        const real* restrict wr = w + r * ldw;
        real* restrict vr = V + r * ldv;
        for (int64_t j = 0; j < M; j++) vr[j] -= (wr[j] * rw[j]) * coef[j];
    }
}

/* The inner softmax of one class over batch entries i0 .. i0+ni, from its K rows of uT (row k at uc + k * N), with
   a software prefetch of the next work item (rows at next + k * N, see st_next; NULL = none) spread over the
   work: the chunk comes from DRAM, and the hardware streamer stops at every 4 KiB page (cold chunk at N=256
   C*K=10000, 2 threads: forward 1.38 -> 1.00 ms, backward 1.44 -> 1.04 ms):
   T[k] = t = u rw / gamma, E[k] = e = exp(t - shift) (shift 1/gamma when `bounded`: |s| <= 1, else the
   per-entry max over k), DEN = 1 / sum_k e, SS = S = gamma sum_k e t / sum_k e. Scratch rows are TILE long. */
static inline void st_class_SFX(int64_t N, int64_t K, int64_t ni, const real* restrict uc, const real* restrict rwc,
                                real gamma, int bounded, real* restrict T, real* restrict E, real* restrict MX,
                                real* restrict DEN, real* restrict NUM, real* restrict SS, const real* next) {
    const real inv_gamma = (real)1 / gamma;
    /* software prefetch of the next class's rows (`next`, NULL = none), a row per centre of this one: the
       hardware streamer stops at every 4 KiB page, and the chunk is read from DRAM */

    if (K == 1) {  /* p = 1, S = s: no exponential */
        if (next)
            for (int64_t i = 0; i < ni; i += 64 / sizeof(real)) __builtin_prefetch(next + i, 1, 3);
        for (int64_t i = 0; i < ni; i++) {
            T[i] = uc[i] * (rwc[0] * inv_gamma);
            E[i] = 1;
            DEN[i] = 1;
            SS[i] = uc[i] * rwc[0];
        }
        return;
    }
    for (int64_t i = 0; i < ni; i++) { DEN[i] = 0; NUM[i] = 0; }
    if (bounded) {
        for (int64_t k = 0; k < K; k++) {
            const real* restrict uk = uc + k * N;
            real* restrict tk = T + k * TILE;
            real* restrict ek = E + k * TILE;
            const real f = rwc[k] * inv_gamma;
            if (next)
                for (int64_t i = 0; i < ni; i += 64 / sizeof(real)) __builtin_prefetch(next + k * N + i, 1, 3);
            for (int64_t i = 0; i < ni; i++) {
                real t = uk[i] * f;
                real e = st_expb_SFX(t - inv_gamma);
                tk[i] = t;
                ek[i] = e;
                DEN[i] += e;
                NUM[i] += e * t;
            }
        }
    } else {
        for (int64_t k = 0; k < K; k++) {
            const real* restrict uk = uc + k * N;
            real* restrict tk = T + k * TILE;
            const real f = rwc[k] * inv_gamma;
            if (next)
                for (int64_t i = 0; i < ni; i += 64 / sizeof(real)) __builtin_prefetch(next + k * N + i, 1, 3);
            for (int64_t i = 0; i < ni; i++) tk[i] = uk[i] * f;
            if (k == 0) {
                for (int64_t i = 0; i < ni; i++) MX[i] = tk[i];
            } else {
                for (int64_t i = 0; i < ni; i++) MX[i] = tk[i] > MX[i] ? tk[i] : MX[i];
            }
        }
        for (int64_t k = 0; k < K; k++) {
            const real* restrict tk = T + k * TILE;
            real* restrict ek = E + k * TILE;
            for (int64_t i = 0; i < ni; i++) {
                real e = st_exp_SFX(tk[i] - MX[i]);
                ek[i] = e;
                DEN[i] += e;
                NUM[i] += e * tk[i];
            }
        }
    }
    for (int64_t i = 0; i < ni; i++) {
        SS[i] = gamma * (NUM[i] / DEN[i]);
        DEN[i] = (real)1 / DEN[i];
    }
}

/* The rows of the work item after (class c, entries i0 ..): the same class's next tile, else the next class's first. */
static inline const real* st_next_SFX(const real* uT, int64_t N, int64_t K, int64_t m, int64_t c, int64_t i0) {
    if (i0 + TILE < N) return uT + c * K * N + i0 + TILE;
    return c + 1 < m ? uT + (c + 1) * K * N : NULL;
}

/* Scratch of one thread for st_class: T, E (K x TILE each) and four TILE rows. */
static real* st_scratch_SFX(int64_t K) { return (real*)malloc(sizeof(real) * (size_t)(2 * K * TILE + 4 * TILE)); }

/* Forward of one chunk of m classes: uT [m*K, N] = u^T (u = x @ w_chunk, raw centers; read only), rw its inverse
   column norms. Writes (each optional, NULL = skip):
     z [m, N]            la S - la margin [class == label]      (the class logits)
     S_out [N, ldS]      S (at S_out[i * ldS + c])              (the logits mode)
   and, when m_run/l_run/zt are given, merges the chunk into the running row max, sum of exp and target logit
   (starting from none when `init`: the first chunk) and, when rows/lse are given (the last chunk), writes the loss
   rows (max - z_label) + log(sum) and lse = max + log(sum). */
void st_forward_SFX(int64_t N, int64_t m, int64_t K, const real* restrict uT, const real* restrict rw, real gamma,
                    int bounded, real la, real margin, const int64_t* restrict labels, int64_t c0,
                    real* restrict z, real* restrict S_out, int64_t ldS,
                    real* restrict m_run, real* restrict l_run, real* restrict zt, int init, real* restrict rows,
                    real* restrict lse, int nt) {
    const real lam = la * margin;
    #pragma omp parallel num_threads(nt) if (nt > 1 && N * m * K > 16384)
    {
        real* T = st_scratch_SFX(K);
        real *E = T + K * TILE, *MX = E + K * TILE, *DEN = MX + TILE, *NUM = DEN + TILE, *SS = NUM + TILE;
        #pragma omp for schedule(static)
        for (int64_t c = 0; c < m; c++) {
            const int64_t cg = c0 + c;
            for (int64_t i0 = 0; i0 < N; i0 += TILE) {
                const int64_t ni = N - i0 < TILE ? N - i0 : TILE;
                st_class_SFX(N, K, ni, uT + c * K * N + i0, rw + c * K, gamma, bounded, T, E, MX, DEN, NUM, SS,
                             st_next_SFX(uT, N, K, m, c, i0));
                if (z) {
                    real* restrict zc = z + c * N + i0;
                    const int64_t* restrict lab = labels + i0;
                    for (int64_t i = 0; i < ni; i++) zc[i] = la * SS[i] - (lab[i] == cg ? lam : (real)0);
                }
                if (S_out) {
                    for (int64_t i = 0; i < ni; i++) S_out[(i0 + i) * ldS + c] = SS[i];
                }
            }
        }
        free(T);
        if (m_run) {
            /* rows of the batch in blocks of 64 (so that both threads share a batch of 128): new max, rescaled
               sum of exp, target logit */
            enum { RB = 64 };
            const int64_t nbk = (N + RB - 1) / RB;
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < nbk; b++) {
                const int64_t i0 = b * RB, ni = N - i0 < RB ? N - i0 : RB;
                real mx[RB], acc[RB];
                for (int64_t i = 0; i < ni; i++) mx[i] = init ? -(real)INFINITY : m_run[i0 + i];
                for (int64_t c = 0; c < m; c++) {
                    const real* restrict zc = z + c * N + i0;
                    for (int64_t i = 0; i < ni; i++) mx[i] = zc[i] > mx[i] ? zc[i] : mx[i];
                }
                for (int64_t i = 0; i < ni; i++)
                    acc[i] = init ? (real)0 : l_run[i0 + i] * st_exp_SFX(m_run[i0 + i] - mx[i]);
                for (int64_t c = 0; c < m; c++) {
                    const real* restrict zc = z + c * N + i0;
                    for (int64_t i = 0; i < ni; i++) acc[i] += st_exp_SFX(zc[i] - mx[i]);
                }
                for (int64_t i = 0; i < ni; i++) {
                    m_run[i0 + i] = mx[i];
                    l_run[i0 + i] = acc[i];
                    const int64_t rel = labels[i0 + i] - c0;
                    real t = init ? (real)0 : zt[i0 + i];
                    if (rel >= 0 && rel < m) t += z[rel * N + i0 + i];
                    zt[i0 + i] = t;
                    if (rows) {  /* (max - z_label) + log(sum): a loss near 0 keeps its relative precision */
                        const real log_l = (real)log((double)acc[i]);
                        rows[i0 + i] = (mx[i] - t) + log_l;
                        lse[i0 + i] = mx[i] + log_l;
                    }
                }
            }
        }
    }
}

/* Backward of one chunk, in place of uT [m*K, N]: dL/du = a G with the factor a = dS/du = rw (e / den)
   (1 + t - S / gamma) recomputed from u, and G = g la (exp(z - lse) - [class == label]) (loss mode, z [m, N])
   or G = dS[i * ldS + c] (logits mode); g has the stride ldg (0: one value for every row). Also
   coef_j = rw_j sum_i dL/du_ij u_ij = rw_j (w_j . V_j), the
   centre-gradient coefficients of the chunk's columns (V = x^T dL/du). */
void st_backward_SFX(int64_t N, int64_t m, int64_t K, real* restrict uT, const real* restrict rw, real gamma,
                     int bounded, const real* restrict z, const real* restrict lse, const real* restrict g,
                     int64_t ldg, real la, const int64_t* restrict labels, int64_t c0, const real* restrict dS,
                     int64_t ldS, real* restrict coef, int nt) {
    enum { L = 16 };  /* partial sums of the dot products: a fixed order, vectorisable */
    const real inv_gamma = (real)1 / gamma;
    #pragma omp parallel num_threads(nt) if (nt > 1 && N * m * K > 16384)
    {
        real* T = st_scratch_SFX(K);
        real *E = T + K * TILE, *MX = E + K * TILE, *DEN = MX + TILE, *NUM = DEN + TILE, *SS = NUM + TILE;
        real G[TILE], part[L];
        double* dot = (double*)malloc(sizeof(double) * (size_t)K);
        #pragma omp for schedule(static)
        for (int64_t c = 0; c < m; c++) {
            const int64_t cg = c0 + c;
            for (int64_t k = 0; k < K; k++) dot[k] = 0.0;
            for (int64_t i0 = 0; i0 < N; i0 += TILE) {
                const int64_t ni = N - i0 < TILE ? N - i0 : TILE;
                real* uc = uT + c * K * N + i0;
                st_class_SFX(N, K, ni, uc, rw + c * K, gamma, bounded, T, E, MX, DEN, NUM, SS,
                             st_next_SFX(uT, N, K, m, c, i0));
                if (z) {
                    const real* restrict zc = z + c * N + i0;
                    const int64_t* restrict lab = labels + i0;
                    for (int64_t i = 0; i < ni; i++)
                        G[i] = (la * g[(i0 + i) * ldg])
                               * (st_exp_SFX(zc[i] - lse[i0 + i]) - (lab[i] == cg ? (real)1 : (real)0));
                } else {
                    for (int64_t i = 0; i < ni; i++) G[i] = dS[(i0 + i) * ldS + c];
                }
                /* per entry 1 - S / gamma; per centre p = e / den first (<= 1: nothing overflows when den is
                   tiny), the factor p (t + 1 - S / gamma) rw, dL/du = factor G, and the dots */
                for (int64_t i = 0; i < ni; i++) NUM[i] = (real)1 - SS[i] * inv_gamma;
                if (K == 1) {  /* the factor is rw exactly */
                    for (int64_t i = 0; i < ni; i++) { T[i] = 0; NUM[i] = 1; }
                }
                for (int64_t k = 0; k < K; k++) {
                    real* restrict uk = uc + k * N;
                    const real* restrict tk = T + k * TILE;
                    const real* restrict ek = E + k * TILE;
                    const real r = rw[c * K + k];
                    for (int l = 0; l < L; l++) part[l] = 0;
                    int64_t i = 0;
                    for (; i + L <= ni; i += L) {
                        for (int l = 0; l < L; l++) {
                            real d = (r * G[i + l]) * ((ek[i + l] * DEN[i + l]) * (tk[i + l] + NUM[i + l]));
                            part[l] += d * uk[i + l];
                            uk[i + l] = d;
                        }
                    }
                    for (; i < ni; i++) {
                        real d = (r * G[i]) * ((ek[i] * DEN[i]) * (tk[i] + NUM[i]));
                        part[0] += d * uk[i];
                        uk[i] = d;
                    }
                    /* at most TILE / L terms per partial sum in `real`, the partials and tiles summed in double */
                    double sum = 0.0;
                    for (int l = 0; l < L; l++) sum += (double)part[l];
                    dot[k] += sum;
                }
            }
            for (int64_t k = 0; k < K; k++) {
                const double r = (double)rw[c * K + k];
                coef[c * K + k] = (real)(r * dot[k]);
            }
        }
        free(dot);
        free(T);
    }
}

/* The products by the ILP64 Fortran BLAS gemm torch links (`fn`: sgemm_64_ / dgemm_64_), called from here so that a
   chunk's product and its pass are one call: C (column-major m x n, ldc) = A^T B^T + beta C, with A column-major
   k x m (lda) and B column-major n x k (ldb). Every product here is of that form on row-major operands. */
typedef void (*st_gemm_fn_SFX)(const char*, const char*, const int64_t*, const int64_t*, const int64_t*, const real*,
                               const real*, const int64_t*, const real*, const int64_t*, const real*, real*,
                               const int64_t*);

void st_gemm_tt_SFX(void* fn, int64_t m, int64_t n, int64_t k, const real* A, int64_t lda, const real* B, int64_t ldb,
                    real beta, real* C, int64_t ldc) {
    const real one = 1;
    if (m == 0 || n == 0) return;
    /* BLAS wants every leading dimension >= 1 even where a dimension is 0 (an empty batch) */
    lda = lda < 1 ? 1 : lda;
    ldb = ldb < 1 ? 1 : ldb;
    ldc = ldc < 1 ? 1 : ldc;
    ((st_gemm_fn_SFX)fn)("T", "T", &m, &n, &k, &one, A, &lda, B, &ldb, &beta, C, &ldc);
}

/* One chunk's forward in one call: the inverse column norms of all of w [d, M] first when `norms` (the first chunk),
   uT = w_chunk^T x^T, then st_forward (see there; rw_all is all M inverse norms). */
void st_forward_fused_SFX(void* fn, int64_t N, int64_t d, int64_t m, int64_t K, const real* x, int64_t ldx,
                          const real* w, int64_t ldw, int64_t M, real* rw_all, int norms, real* uT, real gamma,
                          int bounded, real la, real margin, const int64_t* labels, int64_t c0, real* z, real* S_out,
                          int64_t ldS, real* m_run, real* l_run, real* zt, int init, real* rows, real* lse, int nt) {
    if (norms) ST_PART(ST_NORMS, st_inv_norms_SFX(d, M, w, ldw, rw_all, nt));
    ST_PART(ST_U, st_gemm_tt_SFX(fn, N, m * K, d, x, ldx, w + c0 * K, ldw, 0, uT, N));
    ST_PART(ST_FWD, st_forward_SFX(N, m, K, uT, rw_all + c0 * K, gamma, bounded, la, margin, labels, c0, z, S_out, ldS,
                                   m_run, l_run, zt, init, rows, lse, nt));
}

/* One chunk's backward in one call: st_backward (uT -> dL/du in place, the chunk's coef), dx (+)= dL/du w_chunk^T
   (dx [N, d]; `dx_first`: =), V[:, chunk] = x^T dL/du, and on the last chunk the centre-gradient correction of all
   of V (st_center_grad with all M coefficients). dx / V NULL: not wanted. */
void st_backward_fused_SFX(void* fn, int64_t N, int64_t d, int64_t m, int64_t K, const real* x, int64_t ldx,
                           const real* w, int64_t ldw, int64_t M, const real* rw_all, real* uT, real gamma, int bounded,
                           const real* z, const real* lse, const real* g, int64_t ldg, real la,
                           const int64_t* labels, int64_t c0, const real* dS, int64_t ldS, real* coef_all, real* dx,
                           int dx_first, real* V, int64_t ldv, int last, int nt) {
    ST_PART(ST_BWD, st_backward_SFX(N, m, K, uT, rw_all + c0 * K, gamma, bounded, z, lse, g, ldg, la, labels, c0, dS,
                                    ldS, coef_all + c0 * K, nt));
    if (dx) ST_PART(ST_DX, st_gemm_tt_SFX(fn, d, N, m * K, w + c0 * K, ldw, uT, N, dx_first ? 0 : 1, dx, d));
    if (V) {
        ST_PART(ST_V, st_gemm_tt_SFX(fn, m * K, d, N, uT, N, x, ldx, 0, V + c0 * K, ldv));
        if (last) ST_PART(ST_CORR, st_center_grad_SFX(d, M, V, ldv, w, ldw, rw_all, coef_all, nt));
    }
}
"""

# -fno-trapping-math lets the compiler turn the selects of exp (clamps, NaN test) into vector blends on AVX2 (without
# it those loops stay scalar there; AVX-512 masks them either way); -ffp-contract=fast gives fused multiply-adds.
_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast",
          "-mprefer-vector-width=512"]
_OPTIONAL = (["-march=native"], ["-fopenmp"])  # dropped one by one when the compiler refuses them

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "why": None, "build_s": None}


def source() -> str:
    return _COMMON.replace("ST_VERSION", str(_VERSION)) + "".join(_BODY.replace("real", t).replace("_SFX", "_" + sfx)
                             for sfx, t in (("f32", "float"), ("f64", "double")))


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> str:
    d = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "softtriple_triton")
    try:
        os.makedirs(d, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = os.path.join(tempfile.gettempdir(), f"softtriple_triton-{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(d, exist_ok=True)
    return d


def _build() -> tuple[ctypes.CDLL | None, str | None]:
    if sys.platform == "win32":
        return None, "native CPU kernels are built only on Linux/macOS"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install cc/gcc/clang)"
    src = source()
    folder = _cache_dir()
    last_err = ""
    for drop in (0, 1, 2):  # all flags; without -march=native; without OpenMP as well
        flags = _FLAGS + [f for i, opt in enumerate(_OPTIONAL) if i >= drop for f in opt]
        key = hashlib.sha256("\n".join([src, " ".join(flags), cc, platform.machine(), _cpu_id()]).encode())
        so = os.path.join(folder, f"cpu_kernels_{key.hexdigest()[:20]}.so")
        if not os.path.exists(so):
            c_path = so[:-3] + f".{os.getpid()}.c"
            tmp = so + f".{os.getpid()}.tmp"
            with open(c_path, "w") as f:
                f.write(src)
            try:
                r = subprocess.run([cc, *flags, c_path, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.SubprocessError) as e:
                r = None
                last_err = f"{type(e).__name__}: {e}"
            finally:
                os.remove(c_path)
            if r is None or r.returncode != 0:
                if r is not None:
                    last_err = (r.stderr or r.stdout).strip()[-500:]
                if os.path.exists(tmp):
                    os.remove(tmp)
                continue
            os.replace(tmp, so)  # atomic: concurrent processes never load a half-written library
        try:
            lib = ctypes.CDLL(so)
            _declare(lib)
            if lib.st_version() != _VERSION:
                raise OSError("version mismatch")
            return lib, None
        except (OSError, AttributeError) as e:
            last_err = f"{type(e).__name__}: {e}"
    return None, f"the C compiler {cc} failed: {last_err}"


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for sfx, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        getattr(lib, f"st_inv_norms_{sfx}").argtypes = [i64, i64, ptr, i64, ptr, cint]
        getattr(lib, f"st_center_grad_{sfx}").argtypes = [i64, i64, ptr, i64, ptr, i64, ptr, ptr, cint]
        getattr(lib, f"st_forward_{sfx}").argtypes = [i64, i64, i64, ptr, ptr, real, cint, real, real, ptr, i64,
                                                      ptr, ptr, i64, ptr, ptr, ptr, cint, ptr, ptr, cint]
        getattr(lib, f"st_backward_{sfx}").argtypes = [i64, i64, i64, ptr, ptr, real, cint, ptr, ptr, ptr, i64, real,
                                                       ptr, i64, ptr, i64, ptr, cint]
        getattr(lib, f"st_exp_{sfx}_array").argtypes = [i64, ptr, ptr]
        getattr(lib, f"st_expb_{sfx}_array").argtypes = [i64, ptr, ptr]
        getattr(lib, f"st_unit_rows_{sfx}").argtypes = [i64, i64, ptr, i64, ptr, ptr, ptr, cint]
        getattr(lib, f"st_unit_rows_backward_{sfx}").argtypes = [i64, i64, ptr, ptr, i64, ptr, ptr, ptr, cint]
        getattr(lib, f"st_gemm_tt_{sfx}").argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, i64, real, ptr, i64]
        getattr(lib, f"st_forward_fused_{sfx}").argtypes = [ptr, i64, i64, i64, i64, ptr, i64, ptr, i64, i64, ptr,
                                                            cint, ptr, real, cint, real, real, ptr, i64, ptr, ptr, i64,
                                                            ptr, ptr, ptr, cint, ptr, ptr, cint]
        getattr(lib, f"st_backward_fused_{sfx}").argtypes = [ptr, i64, i64, i64, i64, ptr, i64, ptr, i64, i64, ptr,
                                                             ptr, real, cint, ptr, ptr, ptr, i64, real, ptr, i64, ptr,
                                                             i64, ptr, ptr, cint, ptr, i64, cint, cint]
        for name in ("inv_norms", "center_grad", "forward", "backward", "unit_rows", "unit_rows_backward", "gemm_tt",
                     "forward_fused", "backward_fused"):
            getattr(lib, f"st_{name}_{sfx}").restype = None
    lib.st_version.restype = cint
    lib.st_part_timing.argtypes = [cint, ptr]
    lib.st_part_timing.restype = None
    lib.st_labels_bad.argtypes = [i64, ptr, i64]
    lib.st_labels_bad.restype = i64


def _switched_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "off", "no")


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first call; None when unavailable (see the module docstring)."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            if _switched_off(ENV_SWITCH):
                _state["why"] = f"disabled by {ENV_SWITCH}"
            else:
                t0 = time.perf_counter()
                try:
                    _state["lib"], _state["why"] = _build()
                except Exception as e:  # never let the optional fast path break the loss
                    _state["lib"], _state["why"] = None, f"{type(e).__name__}: {e}"
                _state["build_s"] = time.perf_counter() - t0
                if _state["lib"] is None:
                    warnings.warn(f"softtriple_triton: the fused CPU kernels are unavailable ({_state['why']}); "
                                  f"backend='torch' uses its slower pure-torch path", RuntimeWarning, stacklevel=3)
            _state["tried"] = True
    return _state["lib"]


def status() -> dict:
    """Whether the native kernels are in use, why not, and how long building/loading them took (s)."""
    library()
    return {"available": _state["lib"] is not None, "reason": _state["why"], "build_s": _state["build_s"]}


# ----------------------------------------------------------------------------------------- thin wrappers
def _call(lib, name: str, t: torch.Tensor, *args) -> None:
    """lib.st_<name>_<f32|f64>(*args, threads), under a profiler label while torch.profiler records."""
    fn = getattr(lib, f"st_{name}_{'f64' if t.dtype == torch.float64 else 'f32'}")
    if torch._C._autograd._profiler_enabled():
        with torch.autograd.profiler.record_function(f"softtriple::{name}"):
            fn(*args, torch.get_num_threads())
    else:
        fn(*args, torch.get_num_threads())


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _ps(t: torch.Tensor | None) -> tuple[int | None, int]:
    """(pointer, stride of the first dimension) of an optional tensor; (None, 0) for None."""
    return (None, 0) if t is None else (t.data_ptr(), t.stride(0))


def _run_state(state: torch.Tensor | None, c0: int) -> tuple:
    """The C forward's (m_run, l_run, zt, init) pointers from the [3+, N] running state (rows of it); init on the
    first chunk (c0 == 0)."""
    if state is None:
        return None, None, None, int(c0 == 0)
    p, step = state.data_ptr(), state.stride(0) * state.element_size()
    return p, p + step, p + 2 * step, int(c0 == 0)


def inv_norms(lib, w: torch.Tensor) -> torch.Tensor:
    """1 / max(||w_j||, 1e-12) per column of w [d, M] (w.stride(1) == 1)."""
    rw = torch.empty(w.shape[1], dtype=w.dtype)
    _call(lib, "inv_norms", w, w.shape[0], w.shape[1], w.data_ptr(), w.stride(0), rw.data_ptr())
    return rw


def unit_rows(lib, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, nc, s): the rows of x [N, d] (x.stride(1) == 1) normalised, their clamped norms after the power-of-two
    scale s, and s (both fp64 [N]); see st_unit_rows in the C source."""
    N, d = x.shape
    y = torch.empty((N, d), dtype=x.dtype)
    nc = torch.empty(N, dtype=torch.float64)
    sc = torch.empty(N, dtype=torch.float64)
    _call(lib, "unit_rows", x, N, d, x.data_ptr(), x.stride(0), y.data_ptr(), nc.data_ptr(), sc.data_ptr())
    return y, nc, sc


def unit_rows_backward(lib, y: torch.Tensor, g: torch.Tensor, nc: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    """dL/dx of unit_rows for dL/dy = g (g.stride(1) == 1)."""
    dx = torch.empty_like(y)
    _call(lib, "unit_rows_backward", y, y.shape[0], y.shape[1], y.data_ptr(), g.data_ptr(), g.stride(0),
          nc.data_ptr(), sc.data_ptr(), dx.data_ptr())
    return dx


def center_grad_(lib, V: torch.Tensor, w: torch.Tensor, rw: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """In place: V_j -= (w_j rw_j) coef_j (rw the inverse column norms, coef from backward_chunk)."""
    _call(lib, "center_grad", w, w.shape[0], w.shape[1], V.data_ptr(), V.stride(0), w.data_ptr(), w.stride(0),
          rw.data_ptr(), coef.data_ptr())
    return V


def forward_chunk(lib, uT, rw_chunk, m, K, gamma, bounded, c0=0, la=0.0, margin=0.0, labels=None, z=None,
                  S_out=None, state=None, rows=None, lse=None) -> None:
    """One chunk's forward from uT [m*K, N] (read only); see st_forward in the C source for what it writes.
    state: [3, N] (running max, sum of exp, target logit), started afresh when c0 == 0; rows, lse: written on the
    last chunk."""
    _call(lib, "forward", uT, uT.shape[1], m, K, uT.data_ptr(), rw_chunk.data_ptr(), gamma, int(bounded), la, margin,
          _p(labels), c0, _p(z), *_ps(S_out), *_run_state(state, c0), _p(rows), _p(lse))


def backward_chunk(lib, uT, rw_chunk, m, K, gamma, bounded, coef_chunk, c0=0, z=None, lse=None, g=None, la=0.0,
                   labels=None, dS=None) -> None:
    """In place uT -> dL/du, and the centre-gradient coefficients of the chunk's columns into coef_chunk. g [N] may
    have stride 0 (the gradient of a mean)."""
    _call(lib, "backward", uT, uT.shape[1], m, K, uT.data_ptr(), rw_chunk.data_ptr(), gamma, int(bounded), _p(z),
          _p(lse), *_ps(g), la, _p(labels), c0, *_ps(dS), coef_chunk.data_ptr())


def loaded() -> ctypes.CDLL | None:
    """The kernels if this process has already built / loaded them (never starts a build)."""
    return _state["lib"] if _state["tried"] else None


def labels_bad(lib, labels: torch.Tensor, num_classes: int) -> int:
    """The first index of the contiguous int64 CPU labels outside [0, num_classes), or -1."""
    return lib.st_labels_bad(labels.numel(), labels.data_ptr(), num_classes)


# ----------------------------------------------------------------------------------------- the products from C
_gemm: dict = {}


def blas_gemm(lib, dtype: torch.dtype) -> int | None:
    """Address of the ILP64 Fortran BLAS gemm torch links (sgemm_64_ / dgemm_64_: MKL in the x86 wheels), checked once
    against torch's arithmetic on a small product with tails (_gemm_agrees); None where there is none (the products
    stay torch.mm's). ``SOFTTRIPLE_TRITON_NATIVE_GEMM=0`` turns it off."""
    if dtype in _gemm:
        return _gemm[dtype]
    addr = None
    if not _switched_off(ENV_SWITCH + "_GEMM"):
        name = "sgemm_64_" if dtype == torch.float32 else "dgemm_64_"
        for path in (os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"), None):
            try:
                addr = ctypes.cast(getattr(ctypes.CDLL(path), name), ctypes.c_void_p).value
                break
            except (OSError, AttributeError):
                continue
        if addr is not None and not _gemm_agrees(lib, addr, dtype):
            addr = None
    _gemm[dtype] = addr
    return addr


def _gemm_agrees(lib, addr: int, dtype: torch.dtype) -> bool:
    """st_gemm_tt through `addr` on m, n, k = 5, 3, 7 against torch: column-major A (k x m, lda = k) is the row-major
    a [m, k], B (n x k, ldb = n) the row-major b [k, n], and C = A^T B^T (m x n, ldc = m) the row-major (a @ b)^T."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=g, dtype=dtype)
    b = torch.randn(7, 3, generator=g, dtype=dtype)
    c = torch.full((3, 5), float("nan"), dtype=dtype)
    fn = getattr(lib, f"st_gemm_tt_{'f64' if dtype == torch.float64 else 'f32'}")
    fn(addr, 5, 3, 7, a.data_ptr(), 7, b.data_ptr(), 3, 0.0, c.data_ptr(), 5)
    ref = (a.unsqueeze(2) * b.unsqueeze(0)).sum(dim=1)  # a @ b without a matrix product (no FLOP counter sees it)
    return bool(torch.allclose(c, ref.t(), rtol=1e-5, atol=1e-5))


def forward_fused(lib, gemm, x, w, rw, norms, u, m, K, gamma, bounded, c0, la, margin, labels, z, S_out, state, rows,
                  lse) -> None:
    """forward_chunk with its product (and on the first chunk the inverse norms of all of w into rw) in one call:
    u (flat, m*K*N) gets uT = w_chunk^T x^T. x [N, d], w [d, M] with unit column stride."""
    N, d = x.shape
    _call(lib, "forward_fused", x, gemm, N, d, m, K, *_ps(x), *_ps(w), w.shape[1], rw.data_ptr(), int(norms),
          u.data_ptr(), gamma, int(bounded), la, margin, _p(labels), c0, _p(z), *_ps(S_out), *_run_state(state, c0),
          _p(rows), _p(lse))


def backward_fused(lib, gemm, x, w, rw, u, m, K, gamma, bounded, c0, z, lse, g, la, labels, dS, coef, dx, V,
                   last) -> None:
    """backward_chunk, dx (=, first chunk; +=) dL/du w_chunk^T and V[:, chunk] = x^T dL/du (each skipped when None),
    and on the last chunk the centre-gradient correction of V, in one call."""
    N, d = x.shape
    _call(lib, "backward_fused", x, gemm, N, d, m, K, *_ps(x), *_ps(w), w.shape[1], rw.data_ptr(), u.data_ptr(), gamma,
          int(bounded), _p(z), _p(lse), *_ps(g), la, _p(labels), c0, *_ps(dS), coef.data_ptr(), _p(dx), int(c0 == 0),
          *_ps(V), int(last))


PARTS = ("column norms", "u product", "forward pass", "backward pass", "dx product", "V product",
         "centre-gradient correction")


def part_timing(on: bool) -> dict:
    """Turn the fused calls' part timers on/off; returns the seconds summed per part since the last call (a profile
    of what a step spends inside forward_fused / backward_fused; the timers cost two clock reads per part)."""
    lib = library()
    if lib is None:
        return {}
    out = (ctypes.c_double * len(PARTS))()
    lib.st_part_timing(int(on), out)
    return dict(zip(PARTS, list(out)))
