#!/usr/bin/env python
"""Compiled-code report of the Triton kernels for GPUs that are not here: sm_90 (H100/H200), sm_80 (A100) and
gfx942 (MI300), from the launches the public API makes (bench/aot.py captures and compiles them).

    python bench/gpu_static.py            # the report: bench/results/gpu-static/{report.csv, summary.md}
    python bench/gpu_static.py --check    # the CI check of the default tensor-core variants (exit 1 on a violation)
    python bench/gpu_static.py --sweep    # tile sweep -> bench/results/gpu-static/sweep.csv (chooses TILE_RULES)

Per launch: kernel, configuration (embeddings/centers dtypes, matmul precision, autocast), K, tile, registers,
spill bytes, shared memory, the matrix instructions and their count, FMAs, CTAs per SM and the grid in waves.
Compiled results are cached in bench/results/gpu-static/cache.json (key: kernel source hash, specialisation,
options, target, Triton version), so unchanged kernels are not recompiled.
Run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import multiprocessing
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("gpu_static.py compiles for real GPUs: run it without TRITON_INTERPRET")

import aot  # noqa: E402

OUT = os.path.join(HERE, "results", "gpu-static")
CACHE = os.path.join(OUT, "cache.json")
COLUMNS = ["target", "config", "K", "mode", "path", "kernel", "tile", "regs", "spill_stores", "spill_loads",
           "shared", "mma", "mma_count", "fma", "ctas_per_sm", "programs", "waves"]
CHECK_KS = (1, 3, 10)
REPORT_KS = (1, 3, 10)


# ------------------------------------------------------------------------------------------ parallel compiles
_JOBS: list = []


def _work(i):
    launch, target = _JOBS[i]
    try:
        return aot.cache_key(launch, target), aot.analyze(aot.compile_launch(launch, target), launch, target), None
    except Exception as e:  # a failed compile is a result too (reported, never hidden)
        return aot.cache_key(launch, target), None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def precompile(cache: aot.Cache, pairs, jobs: int) -> dict:
    """Compile every (launch, target) missing from the cache, in ``jobs`` forked processes; returns errors."""
    global _JOBS
    todo, seen = [], set()
    for launch, target in pairs:
        key = aot.cache_key(launch, target)
        if key not in cache.data and key not in seen:
            seen.add(key)
            todo.append((launch, target))
    errors: dict = {}
    cache.misses += len(todo)
    if not todo:
        return errors
    _JOBS = todo
    t0 = time.time()
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_work, range(len(todo)))
    else:
        results = [_work(i) for i in range(len(todo))]
    for key, row, err in results:
        if row is not None:
            cache.data[key] = row
        else:
            errors[key] = err
    print(f"compiled {len(todo)} variants in {time.time() - t0:.0f} s ({jobs} processes)", flush=True)
    return errors


# --------------------------------------------------------------------------------------------------- report
def collect(cache, configs, ks, targets, modes, paths, jobs):
    plans = []
    for config, K, tname, mode, path in itertools.product(configs, ks, targets, modes, paths):
        if mode == "logits" and path == "cached":
            continue  # the logits have no cached path
        target = aot.TARGETS[tname]
        C = max(1, 100_000 // K)
        for launch in aot.capture(config, 4096, 512, C, K, target, mode=mode, **aot.PATHS[path]):
            plans.append((dict(config=config, K=K, target=tname, mode=mode, path=path), launch, target))
    errors = precompile(cache, [(launch, target) for _, launch, target in plans], jobs)
    rows, seen = [], set()
    for info, launch, target in plans:
        key = aot.cache_key(launch, target)
        tag = (key, info["config"], info["K"], info["mode"], info["path"], launch.grid)
        if tag in seen:
            continue
        seen.add(tag)
        if key in errors:
            row = dict(kernel=launch.kernel.fn.__name__, regs=-1, spill_stores=-1, spill_loads=-1, shared=-1,
                       mma=f"COMPILE FAILED: {errors[key]}", mma_count=0, fma=0, ctas_per_sm=0,
                       programs=0, waves=0, smem_limit=0)
        else:
            row = dict(cache.data[key], **aot.grid_facts(cache.data[key], launch, target))
            cache.hits += 1
        row.update(info, tile=aot.tile_of(launch))
        rows.append(row)
    return rows


def write_csv(path, rows, columns=COLUMNS):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def short_mma(m: str) -> str:
    if m.startswith("COMPILE"):
        return m
    kinds = sorted({part.split(" x")[0].split(".")[0] + "." + _shape(part) for part in m.split("; ") if part})
    return ", ".join(kinds) if m != "none" else "none"


def _shape(instr: str) -> str:
    for tok in instr.split("."):
        if tok.startswith("m") and "n" in tok and "k" in tok:
            return tok + "." + ".".join(instr.split(" x")[0].split(".")[-2:])
    return instr.split(" x")[0].split("_", 2)[-1]


def markdown(rows, title):
    lines = [f"### {title}", "",
             "| target | config | K | mode | path | kernel | tile | regs | spill B (st/ld) | smem B | MMA | "
             "#MMA | CTAs/SM | waves |", "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r['target']} | {r['config']} | {r['K']} | {r['mode']} | {r['path']} | "
                     f"{r['kernel'].replace('softtriple_', '').replace('_kernel', '')} | {r['tile']} | {r['regs']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {short_mma(r['mma'])} | "
                     f"{r['mma_count']} | {r['ctas_per_sm']} | {r['waves']} |")
    return "\n".join(lines) + "\n"


def run_check(cache, jobs) -> int:
    rows = collect(cache, aot.MAIN_CONFIGS, CHECK_KS, ("sm90", "sm80"), ("loss", "logits"), aot.DEFAULT_PATHS, jobs)
    bad = [(r, aot.violations(r)) for r in rows]
    bad = [(r, v) for r, v in bad if v]
    print(markdown(rows, "default variants (CI check)"))
    print(f"cache: {cache.hits} hits, {cache.misses} compiled this run")
    for r, v in bad:
        print(f"VIOLATION {r['target']} {r['config']} K={r['K']} {r['mode']} {r['kernel']} {r['tile']}: "
              + "; ".join(v))
    print(f"{len(rows)} default variants checked, {len(bad)} violations")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------------- sweep
SWEEP_KINDS = {  # kernel kind -> backward path whose capture contains it
    "forward": "chunked", "forward_cache": "cached", "grad": "chunked",
    "backward_x": "two_kernel", "backward_w": "two_kernel",
}
KIND_KERNEL = {"forward": "softtriple_fwd_kernel", "forward_cache": "softtriple_fwd_kernel",
               "grad": "softtriple_grad_chunk_kernel", "backward_x": "softtriple_bwd_x_kernel",
               "backward_w": "softtriple_bwd_w_kernel"}
SWEEP_CONFIGS = {"mma16": "bf16/fp32", "tf32": "fp32@high", "fp32": "fp32@highest", "fp64": "fp64"}


def candidates(kind, dclass):
    """Tensor-core friendly candidates (BLOCK_N x lanes >= 64 x 64, d chunk 32-64, 4 or 8 warps, 2-3 stages) for
    the default kernels; a few for the two-kernel backward and for the FMA-unit dtypes (fp32 IEEE, fp64)."""
    rule = aot.tile_rule
    if dclass in ("mma16", "tf32") and kind in ("forward", "forward_cache", "grad"):
        return [rule(64, 128, 64, 4, 3), rule(64, 128, 64, 8, 3), rule(128, 128, 64, 8, 3), rule(128, 128, 64, 8, 2),
                rule(128, 64, 64, 4, 3), rule(128, 64, 64, 8, 3), rule(64, 64, 64, 4, 3), rule(64, 256, 64, 8, 2),
                rule(128, 128, 32, 8, 3), rule(64, 128, 32, 4, 3), rule(64, 64, 32, 4, 3), rule(64, 64, 64, 8, 3),
                rule(128, 64, 32, 8, 3)]
    if dclass in ("mma16", "tf32"):
        return [rule(64, 128, 64, 8, 2), rule(64, 64, 64, 4, 2), rule(128, 64, 32, 8, 2), rule(64, 64, 32, 4, 2)]
    return [rule(32, 32, 32, 4, 2), rule(64, 32, 16, 4, 2), rule(32, 64, 16, 4, 2), rule(64, 64, 16, 8, 2),
            rule(32, 32, 16, 4, 2), rule(32, 64, 32, 8, 2), rule(64, 32, 16, 8, 2)]


def run_sweep(cache, jobs, ks=(1, 3, 10), archs=("sm90", "sm80")):
    from softtriple_triton.kernels import config as kc

    plans = []
    for kind, dclass, arch, K in itertools.product(SWEEP_KINDS, SWEEP_CONFIGS, archs, ks):
        path = SWEEP_KINDS[kind]
        target = aot.TARGETS[arch]
        modes = ("loss", "logits") if kind in ("forward", "grad") else ("loss",)  # the logits reuse these kernels
        for rule, mode in itertools.product(candidates(kind, dclass), modes):
            slot = (kind, kc.arch_family(target), dclass)
            saved = kc.TILE_RULES[slot]
            kc.TILE_RULES[slot] = rule
            try:
                launches = aot.capture(SWEEP_CONFIGS[dclass], 4096, 512, max(1, 100_000 // K), K, target,
                                       mode=mode, **aot.PATHS[path])
            finally:
                kc.TILE_RULES[slot] = saved
            launch = next(la for la in launches if la.kernel.fn.__name__ == KIND_KERNEL[kind])
            plans.append((dict(kind=kind, dclass=dclass, arch=arch, K=K, mode=mode, rule=rule), launch, target))
    errors = precompile(cache, [(la, t) for _, la, t in plans], jobs)
    cache.save()
    rows = []
    for info, launch, target in plans:
        key = aot.cache_key(launch, target)
        rule = info.pop("rule")
        row = dict(info, block_n=rule.block_n, lanes=rule.lanes, block_d=rule.block_d, num_warps=rule.num_warps,
                   num_stages=rule.num_stages, tile=aot.tile_of(launch))
        if key in errors:
            row.update(error=errors[key])
        else:
            r = cache.data[key]
            row.update({k: r[k] for k in ("regs", "spill_stores", "spill_loads", "shared", "mma_count", "ctas_per_sm",
                                          "smem_limit")})
        rows.append(row)
    cols = ["kind", "dclass", "arch", "K", "mode", "block_n", "lanes", "block_d", "num_warps", "num_stages", "tile", "regs",
            "spill_stores", "spill_loads", "shared", "mma_count", "ctas_per_sm", "error"]
    write_csv(os.path.join(OUT, "sweep.csv" if archs == ("sm90", "sm80") else f"sweep-{'-'.join(archs)}.csv"), rows, cols)
    print(choose(rows))


def choose(rows) -> str:
    """Per (kind, arch, dtype class): the candidate valid for every K (no spill, shared memory within the limit,
    matrix instructions where the dtype has them, >= 8 resident warps per SM) with the largest tile, then the most
    resident warps, then the most stages."""
    by_rule: dict = {}
    for r in rows:
        key = (r["kind"], r["arch"], r["dclass"], r["block_n"], r["lanes"], r["block_d"], r["num_warps"],
               r["num_stages"])
        by_rule.setdefault(key, []).append(r)
    best: dict = {}
    for key, rs in by_rule.items():
        ok = all("error" not in r and not r["spill_stores"] and not r["spill_loads"] and r["shared"] <= r["smem_limit"]
                 and (r["mma_count"] > 0 or r["dclass"] in ("fp32", "fp64")) and r["ctas_per_sm"] * r["num_warps"] >= 8
                 for r in rs)
        if not ok:
            continue
        score = (key[3] * key[4], min(r["ctas_per_sm"] for r in rs) * key[6], key[7])
        slot = key[:3]
        if slot not in best or score > best[slot][0]:
            best[slot] = (score, key, rs)
    out = ["chosen tiles (kind, arch, dtype class): block_n x lanes, block_d, warps, stages -> regs, CTAs/SM"]
    for slot, (_, key, rs) in sorted(best.items()):
        out.append(f"{slot}: {key[3]}x{key[4]} d{key[5]} w{key[6]} s{key[7]} -> regs "
                   f"{'/'.join(str(r['regs']) for r in rs)}, CTAs/SM {'/'.join(str(r['ctas_per_sm']) for r in rs)}")
    missing = {(r["kind"], r["arch"], r["dclass"]) for r in rows} - set(best)
    for slot in sorted(missing):
        out.append(f"{slot}: NO VALID CANDIDATE")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="CI check of the default tensor-core variants")
    ap.add_argument("--sweep", action="store_true", help="tile sweep (writes sweep.csv)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--archs", default="sm90,sm80", help="--sweep: the architectures (sm90, sm80, gfx942)")
    ap.add_argument("--cache", default=CACHE, help="analysis cache (JSON); '' disables it")
    args = ap.parse_args(argv)
    cache = aot.Cache(args.cache or None)
    try:
        if args.check:
            return run_check(cache, args.jobs)
        if args.sweep:
            run_sweep(cache, args.jobs, archs=tuple(args.archs.split(",")))
            return 0
        configs = tuple(aot.CONFIGS)
        rows = collect(cache, configs, REPORT_KS, ("sm90", "sm80", "gfx942"), ("loss", "logits"),
                       tuple(aot.PATHS), args.jobs)
        write_csv(os.path.join(OUT, "report.csv"), rows)
        write_summary(rows)
        print(f"{len(rows)} rows -> {OUT}/report.csv, summary.md")
        return 0
    finally:
        cache.save()


def write_summary(rows):
    import platform

    import torch
    import triton

    main_rows = [r for r in rows if r["config"] in ("bf16/fp32", "fp32@high", "fp64") and r["K"] in (1, 10)
                 and r["mode"] == "loss"]
    tc = [r for r in rows if r["config"] in aot.TENSOR_CORE_CONFIGS and r["path"] in aot.DEFAULT_PATHS
          and r["target"] != "gfx942"]
    spilled = [r for r in tc if r["spill_stores"] or r["spill_loads"]]
    no_mma = [r for r in tc if r["mma_count"] == 0 and r["kernel"] in aot.DOT_KERNELS]
    text = ["# Compiled-code report (ahead of time, no GPU)", "",
            f"triton {triton.__version__}, torch {torch.__version__}, python {platform.python_version()}; "
            "shapes N=4096 d=512 C*K=100k (C = 100000 // K); produced by `python bench/gpu_static.py`.", "",
            f"- {len(rows)} distinct launches (configs x K in {REPORT_KS} x loss/logits x cached/chunked/two_kernel "
            "backward x sm90/sm80/gfx942).",
            f"- Tensor-core configurations, default paths (cached, chunked), sm90 + sm80: {len(tc)} launches, "
            f"{len(spilled)} with spills, {len(no_mma)} dot kernels without MMA.", "",
            markdown(main_rows, "main cases (loss, K in {1, 10})"), "",
            "Full table: report.csv. Columns: regs = registers per thread (VGPR+AGPR on gfx942), spill bytes per "
            "thread from ptxas -v (gfx942: spilled registers), smem = shared memory (LDS) per CTA in bytes, MMA = "
            "matrix instruction kinds, #MMA = their count in the code, CTAs/SM = resident programs per SM from "
            "registers, shared memory and warps, waves = programs / (SMs x CTAs/SM).", ""]
    with open(os.path.join(OUT, "summary.md"), "w") as f:
        f.write("\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
