#!/usr/bin/env python
"""Cost model of one SoftTriple training step on an H200: FLOPs and HBM bytes per design, and predicted times.

    python bench/cost_model.py        # prints the tables of docs/design.md ("Cost model")

Every number here is a prediction from two measured ceilings and stated efficiencies, not a measurement; the GPU
verdict (bench/gpu_check.sh) replaces it with timings. Ceilings measured on an H200 of this workplace
(/work/.library/device/KINDS.md): 788 TFLOP/s bf16 dense matrix products (8192^3, random data), 4.3 TB/s device
copy (bytes read + written). From the datasheet: fp32 non-tensor 67 TFLOP/s (33.5 T simple instructions/s), and 16
exp2 per SM per clock on the special-function units (132 SMs x 1.98 GHz: 4.2 T/s).

Units: per lane (one similarity s_ij, N x C*K of them) and per center element (d x C*K). Per design, each kernel
is modelled as max(matrix time / efficiency + non-overlapped element-wise time, bytes / (0.85 x copy rate)).
"""

from __future__ import annotations

from dataclasses import dataclass

MMA = 788e12          # bf16 matrix FLOP/s (measured)
HBM = 4.3e12          # copy bytes/s, read + written (measured)
ALU = 33.5e12         # fp32 simple instructions/s (datasheet)
SFU = 4.2e12          # exp2/s (datasheet: 16 / SM / clock)
ETA_LIB = 0.85        # cuBLAS GEMM efficiency at these shapes (assumed)
ETA_TRITON = 0.75     # matrix part of a Triton GEMM with a fused epilogue (assumed; Triton's fused attention
#                       reaches 70-80% of peak on Hopper, and our epilogue per FLOP is lighter)
ETA_MEM = 0.85        # fraction of the copy rate reached by a streaming kernel (assumed)

SHAPES = [  # (label, N, d, C, K): the GPU target shapes (bf16 products)
    ("N=4096 d=512 C*K=100k (C=10000 K=10)", 4096, 512, 10000, 10),
    ("N=128 d=512 C=100 K=10", 128, 512, 100, 10),
    ("N=256 d=512 C=11318 K=2", 256, 512, 11318, 2),
    ("N=256 d=512 C=11318 K=10", 256, 512, 11318, 10),
]


@dataclass
class Kernel:
    name: str
    flops: float = 0.0        # matrix FLOPs
    eta: float = ETA_LIB
    alu: float = 0.0          # element-wise instructions
    exp: float = 0.0          # exp2 evaluations
    bytes: float = 0.0        # HBM bytes read + written
    launches: int = 1

    def time(self) -> float:
        compute = self.flops / (MMA * self.eta) + self.alu / ALU + self.exp / SFU
        return max(compute, self.bytes / (HBM * ETA_MEM)) + self.launches * 3e-6  # ~3 us per launch


def designs(N, d, C, K):
    """Kernels of one forward + backward (bf16 products, fp32 centers, tau = 0) for each design."""
    M = C * K
    lanes = N * M
    gemm = 2.0 * N * d * M
    centers_fp32 = 4.0 * d * M
    prep = Kernel("norms + prepared bf16 centers (one kernel)", bytes=centers_fp32 + 2.0 * d * M)
    center_grad = Kernel("centers' gradient through the normalisation", bytes=3 * centers_fp32)
    lib_dx = Kernel("cuBLAS dx = ds @ wt", flops=gemm, bytes=2.0 * lanes + 2.0 * d * M + 4.0 * N * d)
    lib_dw = Kernel("cuBLAS dL/dwn = x^T @ ds", flops=gemm, bytes=2.0 * lanes + 2.0 * N * d + 4.0 * d * M)
    per_class = lanes / K
    fwd = Kernel("forward (GEMM + inner softmax + online lse)", flops=gemm, eta=ETA_TRITON,
                 alu=7 * lanes + 10 * per_class, exp=lanes + per_class, bytes=2.0 * (N + M) * d)
    fwd_cache = Kernel("forward + cache (factor a, logits z)", flops=gemm, eta=ETA_TRITON,
                       alu=13 * lanes + 10 * per_class, exp=lanes + per_class,
                       bytes=2.0 * (N + M) * d + 2.0 * lanes + 4.0 * per_class)
    grad_cached = Kernel("dL/ds from the cache", alu=8 * lanes, exp=lanes,
                         bytes=2.0 * lanes + 4.0 * per_class + 2.0 * lanes)
    grad_chunk = Kernel("dL/ds recomputed (GEMM + epilogue), written", flops=gemm, eta=ETA_TRITON,
                        alu=14 * lanes + 12 * per_class, exp=lanes + per_class,
                        bytes=2.0 * (N + M) * d + 2.0 * lanes)
    recompute_rmw = 2 * 4.0 * N * d * (M / 160)  # two-kernel: fp32 partial rows re-read and re-written per tile
    two_x = Kernel("two-kernel: dx (recompute + product)", flops=2 * gemm, eta=ETA_TRITON,
                   alu=14 * lanes, exp=lanes + per_class, bytes=recompute_rmw)
    two_w = Kernel("two-kernel: dL/dwn (recompute + product)", flops=2 * gemm, eta=ETA_TRITON,
                   alu=14 * lanes, exp=lanes + per_class, bytes=2 * 4.0 * d * M * (N / 64))
    lib_fwd = Kernel("cuBLAS s = x @ wn (bf16 out)", flops=gemm, bytes=2.0 * lanes + 2.0 * (N + M) * d)
    floor = [Kernel("cuBLAS x 3", flops=3 * gemm, bytes=3 * (2.0 * lanes), launches=3)]
    # torch.compile of the plain formula under autocast: normalisation and casts fused, the GEMM's bf16 output
    # read once in the forward (softmax over K, S, log-sum-exp) and once in the backward (dL/ds written in bf16);
    # reductions saved, pointwise work recomputed (inductor's default partitioner)
    compiled = [Kernel("normalise + cast centers", bytes=centers_fp32 + 2.0 * d * M), lib_fwd,
                Kernel("fused softmax / S / lse (reads s)", alu=10 * lanes, exp=lanes + per_class,
                       bytes=2.0 * lanes + 12.0 * per_class),
                Kernel("fused backward (reads s, writes ds)", alu=16 * lanes, exp=lanes + per_class,
                       bytes=4.0 * lanes + 12.0 * per_class), lib_dx, lib_dw,
                Kernel("normalisation backward", bytes=3 * centers_fp32, launches=3)]
    # eager under autocast: every operation of the formula is a pass over N x C*K: the GEMM's bf16 output, s / gamma
    # (bf16), softmax (fp32 out), p * s (fp32), the sum over K; the backward the same chain in reverse
    eager = [Kernel("normalise + cast centers", bytes=3 * centers_fp32 + 2.0 * d * M, launches=4), lib_fwd,
             Kernel("forward element-wise chain", alu=12 * lanes, exp=lanes, bytes=24.0 * lanes, launches=6),
             Kernel("backward element-wise chain", alu=16 * lanes, bytes=40.0 * lanes, launches=8), lib_dx, lib_dw,
             Kernel("normalisation backward", bytes=4 * centers_fp32, launches=4)]
    return {
        "cached (ours, default when the cache fits)": [prep, fwd_cache, grad_cached, lib_dx, lib_dw, center_grad],
        "chunked (ours, default otherwise)": [prep, fwd, grad_chunk, lib_dx, lib_dw, center_grad],
        "two-kernel (ours, previous)": [prep, fwd, two_x, two_w, center_grad],
        "3-GEMM floor (cuBLAS)": floor,
        "torch.compile, autocast (model)": compiled,
        "eager, autocast (model)": eager,
    }


def table() -> str:
    out = []
    for label, N, d, C, K in SHAPES:
        ds = designs(N, d, C, K)
        t = {k: sum(x.time() for x in v) for k, v in ds.items()}
        floor, comp, eager = t["3-GEMM floor (cuBLAS)"], t["torch.compile, autocast (model)"], \
            t["eager, autocast (model)"]
        gemm = 2.0 * N * d * C * K
        out += [f"#### {label}", "",
                "| design | GEMM-eq. | HBM GB | predicted ms | / floor | vs torch.compile | vs eager |",
                "|---|---|---|---|---|---|---|"]
        for k, v in ds.items():
            flops = sum(x.flops for x in v) / gemm
            gb = sum(x.bytes for x in v) / 1e9
            out.append(f"| {k} | {flops:.0f} | {gb:.2f} | {t[k] * 1e3:.3f} | {t[k] / floor:.2f} | "
                       f"{comp / t[k]:.2f}x | {eager / t[k]:.2f}x |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(table())
