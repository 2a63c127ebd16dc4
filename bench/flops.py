#!/usr/bin/env python
"""Matrix work of one training step (forward + backward), counted, in GEMM-equivalents of 2 N d C K FLOPs.

Counted: every tl.dot that Triton's interpreter executes (its operand shapes, padded lanes and rows included:
the work a GPU does) plus every torch matrix product (torch.utils.flop_counter.FlopCounterMode, also inside the
custom ops' implementations, which an outer FlopCounterMode does not see) and every product the torch backend's
C kernels call from torch's BLAS (cpu_native.forward_fused / backward_fused, counted from their shapes; under
"torch"). The Triton backend runs with the launch
plan of a GPU target (tiles and splits of an H200 by default: kernels.target.simulate(..., record=False)).

    TRITON_INTERPRET=1 python bench/flops.py          # the table -> bench/results/gemm_equivalents.md (+ .csv)

GEMM-equivalents do not depend on d (every product is linear in d), nor on N and C when they are multiples of the
tile (N of BLOCK_N, C of BLOCK_C); the shapes below are the GPU target shapes with d reduced to 64 and, for the
large C, N to 256 (the interpreter is slow), which keeps every padding factor of the full shapes.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import softtriple_triton as st  # noqa: E402
from softtriple_triton import cpu_native, fused  # noqa: E402

# (label, N, d, C, K): the GPU target shapes of issue 10 with d = 64 (and N = 256 for C*K = 100k)
SHAPES = [
    ("N=4096 d=512 C*K=100k (C=10000, K=10)", 256, 64, 10000, 10),
    ("N=4096 d=512 C*K=100k (C=100000, K=1)", 256, 64, 100000, 1),
    ("N=128 d=512 C=100 K=10", 128, 64, 100, 10),
    ("N=256 d=512 C=11318 K=2", 256, 64, 11318, 2),
    ("N=256 d=512 C=11318 K=10", 256, 64, 11318, 10),
]


def _inplace_addmm(inp, a, b, *args, out_shape=None, **kwargs):
    return 2 * a[0] * a[1] * b[1]


def _inplace_baddbmm(inp, a, b, *args, out_shape=None, **kwargs):
    return 2 * a[0] * a[1] * a[2] * b[2]


def _mode() -> FlopCounterMode:
    """FlopCounterMode, also counting the in-place forms (torch backend: dx.addmm_), which it has no formula for."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={aten.addmm_: _inplace_addmm,
                                                          aten.baddbmm_: _inplace_baddbmm})


class MatrixWork(contextlib.ContextDecorator):
    """Counts the matrix FLOPs executed inside the block: ``triton`` (interpreted tl.dot) and ``torch``."""

    def __enter__(self):
        from triton.runtime import interpreter

        self.triton = 0
        self.torch = 0
        self._builder = interpreter.interpreter_builder
        real_dot = self._builder.create_dot

        def counting_dot(a, b, d, *args, **kwargs):
            *batch, m, k = a.data.shape
            n = b.data.shape[-1]
            size = 1
            for v in batch:
                size *= v
            self.triton += 2 * size * m * n * k
            return real_dot(a, b, d, *args, **kwargs)
        self._builder.create_dot = counting_dot
        self._wrapped = {}
        for name in ("loss_forward", "logits_forward", "backward"):
            real = getattr(fused, name)
            self._wrapped[name] = real
            setattr(fused, name, self._counted(real))
        self._native = {}
        for name in ("forward_fused", "backward_fused"):
            real = getattr(cpu_native, name)
            self._native[name] = real
            setattr(cpu_native, name, self._counted_native(real))
        self._outer = _mode()
        self._outer.__enter__()
        return self

    def _counted_native(self, fn):
        sig = inspect.signature(fn)

        def run(*args):  # products of 2 N d m K each: the u product (forward), dx and / or V (backward)
            a = sig.bind(*args).arguments
            N, d = a["x"].shape
            products = 1 if "dx" not in a else (a["dx"] is not None) + (a["V"] is not None)
            self.torch += products * 2 * N * d * a["m"] * a["K"]
            return fn(*args)
        return run

    def _counted(self, fn):
        def run(*args, **kwargs):  # inside a custom op the outer mode is inactive: count with an inner one
            with _mode() as inner:
                out = fn(*args, **kwargs)
            self.torch += inner.get_total_flops()
            return out
        return run

    def __exit__(self, *exc):
        self._outer.__exit__(*exc)
        self.torch += self._outer.get_total_flops()
        for name, real in self._wrapped.items():
            setattr(fused, name, real)
        for name, real in self._native.items():
            setattr(cpu_native, name, real)
        del self._builder.create_dot  # back to the class's method
        return False


PATHS = [  # (label, backend, option): triton -> fused.set_triton_options(**option), torch -> cache_bytes
    ("triton, cached backward (default when the cache fits)", "triton", dict(backward="auto")),
    ("triton, chunked backward (default otherwise)", "triton", dict(backward="chunked")),
    ("triton, two-kernel backward", "triton", dict(backward="two_kernel")),
    ("torch backend, forward cache kept", "torch", 1 << 40),
    ("torch backend, recompute", "torch", 0),
    ("plain formula (eager / torch.compile)", "reference", None),
]


def count_step(backend: str, option, N: int, d: int, C: int, K: int, target=None) -> dict:
    """Matrix FLOPs of one forward + backward of softtriple_loss (tau = 0, fp32 inputs)."""
    from softtriple_triton.kernels.target import H200, simulate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, d, generator=g, requires_grad=True)
    w = torch.randn(d, C * K, generator=g, requires_grad=True)
    y = torch.randint(0, C, (N,), generator=g)
    plan = simulate(target or H200, record=False) if backend == "triton" else contextlib.nullcontext()
    old_t = fused.set_triton_options(**option) if backend == "triton" else None
    old_c = st.set_memory_budget(cache_bytes=option) if backend == "torch" else None
    try:
        with plan, MatrixWork() as work:
            st.softtriple_loss(x, w, y, K, tau=0.0, backend=backend).backward()
    finally:
        if old_t:
            fused.set_triton_options(**old_t)
        if old_c:
            st.set_memory_budget(**old_c)
    unit = 2 * N * d * C * K
    return dict(triton=work.triton / unit, torch=work.torch / unit, total=(work.triton + work.torch) / unit)


def main():
    rows = []
    for label, N, d, C, K in SHAPES:
        for plabel, backend, option in PATHS:
            if backend == "reference" and N * C * K > 40_000_000:
                continue  # the plain formula's (C*K)-wide tensors: skipped where they are large (same count)
            r = count_step(backend, option, N, d, C, K)
            rows.append(dict(shape=label, path=plabel, **{k: round(v, 3) for k, v in r.items()}))
            print(f"{label:40s} {plabel:40s} {r['total']:.3f} (triton {r['triton']:.3f}, torch {r['torch']:.3f})",
                  flush=True)
    out = os.path.join(HERE, "results")
    with open(os.path.join(out, "gemm_equivalents.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["shape", "path", "total", "triton", "torch"])
        wr.writeheader()
        wr.writerows(rows)
    lines = ["# Matrix work per training step (GEMM-equivalents of 2 N d C K FLOPs)", "",
             "Counted by `TRITON_INTERPRET=1 python bench/flops.py`: tl.dot executed by the interpreter with an "
             "H200's launch plan + torch matrix products (FlopCounterMode). tau = 0 (the regulariser is O(C K^2 d)). "
             "Counted at d = 64 and, for C*K = 100k, N = 256 (products are linear in d, and N, C keep the padding "
             "of the named shapes); fp32 inputs (fp32 tiles: the last class tile's padding differs from the bf16 "
             "tiles' by < 0.1% of the work at C = 11318).",
             "", "| shape | path | GEMM-eq. | in Triton dots | in torch products |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['path']} | **{r['total']:.2f}** | {r['triton']:.2f} | {r['torch']:.2f} |")
    with open(os.path.join(out, "gemm_equivalents.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("->", os.path.join(out, "gemm_equivalents.md"))


if __name__ == "__main__":
    sys.exit(main())
