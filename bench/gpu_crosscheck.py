#!/usr/bin/env python
"""On a GPU: the kernels the public API actually loaded, against the ahead-of-time compiled-code report.

For each main configuration (bench/aot.py MAIN_CONFIGS, K in {1, 3, 10}, both default backward paths) one
training step runs on CUDA tensors; then, for every kernel Triton compiled and loaded for it, this compares the
driver's numbers (CompiledKernel.n_regs, n_spills, shared memory) with (a) the AOT analysis of the same PTX
(bench/aot.py's ptxas -v) and (b) the committed report (bench/results/gpu-static/report.csv) for the same kernel,
configuration and tile. Writes crosscheck.md under --out.

    python bench/gpu_crosscheck.py --out DIR
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import aot  # noqa: E402
import torch  # noqa: E402

import softtriple_triton as st  # noqa: E402
from softtriple_triton import fused  # noqa: E402
from softtriple_triton.kernels import backward_w, backward_x, center_grad, forward, grad_cached, grad_chunk, prepare  # noqa: E402

KERNELS = [forward.softtriple_fwd_kernel, grad_chunk.softtriple_grad_chunk_kernel,
           grad_cached.softtriple_grad_cached_kernel, prepare.softtriple_prepare_kernel,
           center_grad.softtriple_center_grad_kernel, backward_x.softtriple_bwd_x_kernel,
           backward_w.softtriple_bwd_w_kernel]


def loaded():
    """(kernel name, CompiledKernel) of everything compiled since the caches were cleared."""
    out = []
    for k in KERNELS:
        for cache in k.device_caches.values():
            for ck in cache[0].values():
                out.append((k.fn.__name__, ck))
    return out


def clear():
    for k in KERNELS:
        k.device_caches.clear()


def committed_report():
    path = os.path.join(HERE, "results", "gpu-static", "report.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA device"
    report = committed_report()
    lines = ["# Loaded kernels vs the ahead-of-time report", "",
             f"device {torch.cuda.get_device_name(0)}; torch {torch.__version__}; triton "
             f"{__import__('triton').__version__}", "",
             "| config | K | path | kernel | n_regs (driver) | regs (ptxas on its PTX) | regs (committed report) | "
             "n_spills (driver) | spill bytes (ptxas) | smem B | agree |", "|" + "---|" * 11]
    bad = 0
    for config in aot.MAIN_CONFIGS:
        emb_dt, fc_dt, _, precision = aot.CONFIGS[config]
        for K in (1, 3, 10):
            for path in aot.DEFAULT_PATHS:
                clear()
                torch.set_float32_matmul_precision(precision)
                old = fused.set_triton_options(**aot.PATHS[path])
                try:
                    N, d, C = 1024, 512, max(16, 20000 // K)
                    x = torch.randn(N, d, device="cuda", dtype=emb_dt, requires_grad=True)
                    fc = torch.randn(d, C * K, device="cuda", dtype=fc_dt, requires_grad=True)
                    y = torch.randint(0, C, (N,), device="cuda")
                    st.softtriple_loss(x, fc, y, K, tau=0.0, backend="triton").backward()
                    torch.cuda.synchronize()
                finally:
                    fused.set_triton_options(**old)
                    torch.set_float32_matmul_precision("highest")
                for name, ck in loaded():
                    ours = aot._ptxas_report(ck.asm["ptx"], 90 if ck.metadata.target.arch >= 90 else 80)
                    same = [r for r in report if r["kernel"] == name and r["config"] == config
                            and int(r["K"]) == K and r["target"] == "sm90" and r["path"] == path]
                    rep_regs = "/".join(sorted({r["regs"] for r in same})) or "-"
                    agree = ck.n_regs == ours["regs"] and (ck.n_spills > 0) == (ours["spill_stores"] > 0)
                    bad += not agree
                    lines.append(f"| {config} | {K} | {path} | {name.replace('softtriple_', '')} | {ck.n_regs} | "
                                 f"{ours['regs']} | {rep_regs} | {ck.n_spills} | {ours['spill_stores']} | "
                                 f"{ck.metadata.shared} | {'yes' if agree else 'NO'} |")
    lines += ["", f"{bad} disagreements between the driver and ptxas -v on the same PTX."]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "crosscheck.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
