#!/usr/bin/env python
"""Before/after of the torch backend: ours with softtriple_triton/cpu.py (its kernels and its embedding
normalisation) as of a git revision (default main) vs the working tree's, with the GEMM floor and optionally
torch.compile of the plain formula, all timed in one interleaved run per case (bench/timing.py). The rest of the
package is the working tree's in both.

    python bench/compare.py                   # the default grid's CPU timing cases, vs main
    python bench/compare.py --ref HEAD~3 --cases target --compile
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

import providers as P  # noqa: E402
import softtriple_triton.functional as F_  # noqa: E402
from grids import grid  # noqa: E402
from softtriple_triton._common import unit_rows  # noqa: E402
from timing import Clock, floor_sampler, steady_allocator, step_sampler, time_interleaved  # noqa: E402

POLICY = dict(min_reps=7, max_reps=40, slow_reps=3, target_s=1.5, cap_s=30.0)


def _git_show(ref: str, path: str) -> str | None:
    r = subprocess.run(["git", "-C", ROOT, "show", f"{ref}:{path}"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def _load(name: str, src: str):
    path = os.path.join(tempfile.mkdtemp(), name.rsplit(".", 1)[1] + ".py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_ref_cpu(ref: str):
    """softtriple_triton/cpu.py at `ref` (and its cpu_native.py, if it has one), loaded as
    softtriple_triton._cpu_ref; its other relative imports resolve to the working tree's package."""
    src = _git_show(ref, "softtriple_triton/cpu.py")
    if src is None:
        raise SystemExit(f"no softtriple_triton/cpu.py at {ref}")
    native = _git_show(ref, "softtriple_triton/cpu_native.py")
    if native is not None:
        _load("softtriple_triton._cpu_native_ref", native)
        src = src.replace("from . import cpu_native\n", "from . import _cpu_native_ref as cpu_native\n")
    return _load("softtriple_triton._cpu_ref", src)


def ours_with(rows_fn, rows_norm_fn, case, x, fc, y):
    """ours (backend="torch") with the given torch_loss_rows and embedding normalisation (cpu.unit_rows_fast, or
    _common.unit_rows for a revision without it)."""
    def step():
        F_.torch_loss_rows, F_.unit_rows_fast = rows_fn, rows_norm_fn
        return P.build("ours", case, x, fc, y, "cpu")[0]()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="main")
    ap.add_argument("--cases", default="default", help="'default' (the default grid's timing cases) or 'target'")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the plain formula")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="CSV file for the results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    alloc = steady_allocator()
    ref = load_ref_cpu(args.ref)
    new_rows, new_norm = F_.torch_loss_rows, F_.unit_rows_fast
    ref_norm = getattr(ref, "unit_rows_fast", unit_rows)
    cases = [c for c in grid("default", False) if c.timing]
    if args.cases == "target":
        cases = [c for c in cases if c.sweep == "target"]
    load0 = os.getloadavg()
    print(f"[compare] ref={args.ref} vs working tree, {torch.get_num_threads()} threads, {len(cases)} cases, "
          f"load {load0[0]:.2f} {load0[1]:.2f}, {alloc}", flush=True)
    header = f"{'case':<34} {'ref':>9} {'new':>9} {'new/ref':>8} {'floor':>9} {'ref/fl':>7} {'new/fl':>7}"
    print(header + (f" {'compile':>9} {'cmp/new':>8}" if args.compile else ""), flush=True)
    lines = ["case,ref_ms,new_ms,floor_ms,compile_ms,load1_start,load1_end"]
    for case in cases:
        x, fc, y = P.make_inputs(case, "cpu")
        clock = Clock("cpu")
        samplers = {"ref": step_sampler(ours_with(ref.torch_loss_rows, ref_norm, case, x, fc, y), [x, fc], clock),
                    "new": step_sampler(ours_with(new_rows, new_norm, case, x, fc, y), [x, fc], clock),
                    "floor": floor_sampler(P.floor_ops(case, x, fc, "cpu"), clock)}
        if args.compile:
            step, params = P.build("compile", case, x, fc, y, "cpu")
            samplers["compile"] = step_sampler(step, params, clock)
        la = os.getloadavg()[0]
        res = time_interleaved(samplers, POLICY, POLICY["cap_s"])
        F_.torch_loss_rows, F_.unit_rows_fast = new_rows, new_norm
        ms = {k: v["modes"]["fwd+bwd"]["value"] * 1e3 if v["modes"] else float("nan") for k, v in res.items()}
        line = (f"{case.case_id:<34} {ms['ref']:9.2f} {ms['new']:9.2f} {ms['new'] / ms['ref']:8.3f} {ms['floor']:9.2f}"
                f" {ms['ref'] / ms['floor']:7.3f} {ms['new'] / ms['floor']:7.3f}")
        if args.compile:
            line += f" {ms['compile']:9.2f} {ms['compile'] / ms['new']:8.3f}"
        print(line, flush=True)
        lines.append(f"{case.case_id},{ms['ref']:.3f},{ms['new']:.3f},{ms['floor']:.3f},{ms.get('compile', float('nan')):.3f},"
                     f"{la:.2f},{os.getloadavg()[0]:.2f}")
    print(f"[compare] load at end {os.getloadavg()[0]:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
