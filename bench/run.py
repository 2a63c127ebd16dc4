#!/usr/bin/env python
"""Speed and memory of the SoftTriple loss: ours vs the plain formula (eager and torch.compile),
pytorch-metric-learning and the GEMM floor. Writes results.csv, PNG plots and summary.md under
bench/results/<device-tag>/ (or --out).

    python bench/run.py            # default grid (< ~10 min on a 2-core CPU)
    python bench/run.py --quick    # ~1-2 min
    python bench/run.py --full     # the long sweep
    python bench/run.py --smoke    # one tiny case, 1 repeat (used by tests/test_bench.py)

On CPU ours is backend="torch" (the Triton interpreter is never benchmarked); on CUDA backend="triton".
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# torch.compile's parallel compile workers would compete with the timed code on a small machine
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import providers as P  # noqa: E402
from grids import TARGET_CPU, grid  # noqa: E402
from timing import Clock, floor_sampler, steady_allocator, step_sampler, time_interleaved  # noqa: E402

POLICIES = {  # repeats: at least min_reps, then until target_s of timing per provider, at most max_reps
    "smoke": dict(min_reps=1, max_reps=1, slow_reps=1, target_s=0.0, cap_s=30.0),
    "quick": dict(min_reps=3, max_reps=10, slow_reps=2, target_s=0.3, cap_s=5.0),
    "default": dict(min_reps=5, max_reps=30, slow_reps=2, target_s=0.8, cap_s=8.0),
    "full": dict(min_reps=10, max_reps=100, slow_reps=5, target_s=2.0, cap_s=30.0),
}


# ----------------------------------------------------------------------------------------- environment
def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def n_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def device_tag(device: str) -> str:
    if device.startswith("cuda"):
        return "cuda-" + _slug(torch.cuda.get_device_name(torch.device(device)))
    words = [w for w in re.split(r"[\s(),]+", cpu_model()) if w and w.upper() not in ("R", "TM", "CPU", "PROCESSOR")]
    vendor = "-".join(words[:2]) if words else "cpu"
    return f"cpu-{n_cores()}core-{_slug(vendor)}"


def environment(device: str) -> dict:
    try:
        import triton
        triton_v = triton.__version__
    except Exception:
        triton_v = "none"
    try:
        import pytorch_metric_learning as pml
        pml_v = pml.__version__
    except Exception:
        pml_v = "not installed"
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else \
        f"{cpu_model()} ({n_cores()} cores, {torch.get_num_threads()} torch threads)"
    return {"device": device, "device_name": name, "device_tag": device_tag(device), "torch": torch.__version__,
            "triton": triton_v, "pml": pml_v, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def machine_gflops(device: str) -> float:
    """Throughput of a square fp32 matmul, for predicting a step's time before running it."""
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    clock = Clock(device)
    a @ b
    clock.sync()
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    clock.sync()
    return 3 * 2 * n ** 3 / (time.perf_counter() - t) / 1e9


def native_status() -> dict:
    from softtriple_triton import cpu_native
    return cpu_native.status()


# ----------------------------------------------------------------------------------------- one case
def row(env, case: P.Case, provider, mode, metric, value, status="ok", **kw) -> dict:
    r = {k: env[k] for k in ("device", "device_name", "device_tag", "torch", "triton", "date")}
    r.update(sweep=case.sweep, case=case.case_id, N=case.N, d=case.d, C=case.C, K=case.K, CK=case.CK,
             dtype=case.dtype, tau=case.tau, provider=provider, mode=mode, metric=metric, value=value,
             p20=kw.get("p20"), p80=kw.get("p80"), n_repeats=kw.get("n_repeats"), status=status,
             check=kw.get("check", ""), check_rel_err=kw.get("check_rel_err"),
             predicted_bytes=kw.get("predicted_bytes"), minor_faults=kw.get("minor_faults"), note=kw.get("note", ""))
    return r


def skip_reason(provider: str, case: P.Case, args, gflops: float, policy: dict) -> str | None:
    if provider == "pml" and not P.pml_available():
        return "not-installed"
    if provider == "compile" and args.no_compile:
        return "disabled"
    pred = P.predicted_bytes(provider, case)
    if pred > args.mem_budget_gb * 2 ** 30:
        return "oom-predicted"
    if provider != "ours" and P.predicted_flops(provider, case) / (gflops * 1e9) > 2 * policy["cap_s"]:
        return "over-time-cap-predicted"
    return None


def run_case(case: P.Case, env, args, policy, gflops, log, rows: list) -> list[dict]:
    """Appends to rows as it goes (an interrupted run keeps what was measured)."""
    device = args.device
    x, fc, y = P.make_inputs(case, device)
    tol = P.tolerance(case)
    # ---- correctness guard: ours vs the reference formula (fp64, up to 64 rows), then every baseline vs ours
    err = P.reference_rows_check(case, x, fc, y, device)
    ours_ok = err <= tol
    rows.append(row(env, case, "ours", "fwd", "check", err, "ok" if ours_ok else "MISMATCH",
                    check="ok" if ours_ok else "MISMATCH", check_rel_err=err,
                    note="per-row loss vs fp64 reference formula"))
    if case.timing:
        with torch.no_grad():
            step, _ = P.build("ours", case, x, fc, y, device)
            ours_val = float(step())
    providers = [p for p in P.PROVIDERS if p in args.providers] if case.timing else []
    # ---- build every provider, check its loss against ours, then time them all in one interleaved run
    clock = Clock(device)
    samplers, info = {}, {}
    for prov in providers:
        pred = P.predicted_bytes(prov, case)
        reason = skip_reason(prov, case, args, gflops, policy)
        if prov == "ours" and not ours_ok:
            reason = "wrong-result"
        if reason:
            for mode in ("fwd", "bwd", "fwd+bwd"):
                rows.append(row(env, case, prov, mode, "time_s", float("nan"), reason, predicted_bytes=pred))
            if case.memory and prov != "floor":
                rows.append(row(env, case, prov, "fwd+bwd", "peak_bytes", float("nan"), reason, predicted_bytes=pred))
            log(f"    {P.LABELS[prov]:<30} {reason} (predicted {pred / 2**30:.1f} GiB)")
            continue
        check, cerr, status = "ok", 0.0, None
        if prov == "floor":
            samplers[prov] = floor_sampler(P.floor_ops(case, x, fc, device), clock)
            check, cerr = "n/a", None
        else:
            try:
                step, params = P.build(prov, case, x, fc, y, device)
                if prov != "ours":
                    with torch.no_grad():
                        v = float(step())
                    cerr = P.rel_err(v, ours_val)
                    check = "ok" if cerr <= tol else "MISMATCH"
                if check == "ok":
                    samplers[prov] = step_sampler(step, params, clock)
                else:
                    status = "mismatch"
            except torch.OutOfMemoryError:
                status, check, cerr = "oom", "n/a", None
            except Exception as e:  # recorded, never dropped
                status, check, cerr = f"error: {type(e).__name__}: {e}"[:200], "n/a", None
        info[prov] = (pred, check, cerr, status)
    timed = time_interleaved(samplers, policy, policy["cap_s"]) if samplers else {}
    x.grad = fc.grad = None
    for prov, (pred, check, cerr, status) in info.items():
        res = timed.get(prov, {})
        status = status or res.get("status", "not run")
        modes = res.get("modes")
        for mode in ("fwd", "bwd", "fwd+bwd"):
            st = modes[mode] if modes else {"value": float("nan")}
            rows.append(row(env, case, prov, mode, "time_s", st["value"], status, p20=st.get("p20"),
                            p80=st.get("p80"), n_repeats=st.get("n_repeats"), check=check, check_rel_err=cerr,
                            predicted_bytes=pred, minor_faults=res.get("faults"),
                            note="interleaved with the other providers of this case"))
        if prov in ("compile", "ours") and res.get("first_s") is not None:
            rows.append(row(env, case, prov, "fwd+bwd", "first_call_s", res["first_s"], status,
                            note="first call in this process (torch.compile: incl. compilation)"))
        msg = f"{modes['fwd+bwd']['value'] * 1e3:9.2f} ms fwd+bwd" if modes else ""
        log(f"    {P.LABELS[prov]:<30} {status:<14} {msg}  check={check}"
            + (f" (rel err {cerr:.1e})" if cerr else ""))
    samplers.clear()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    del x, fc, y
    if case.memory:
        rows += run_memory(case, env, args, policy, gflops, log)
    return rows


def memory_providers(case: P.Case, args, policy, gflops) -> list[str]:
    provs = [p for p in P.PROVIDERS if p in args.providers and p != "floor"
             and skip_reason(p, case, args, gflops, policy) is None]
    if args.size == "quick" or (args.size == "default" and not case.timing):
        provs = [p for p in provs if p in ("ours", "eager")]  # keeps the run short
    elif args.size == "default":
        provs = [p for p in provs if p != "pml"]  # PML's memory ~ the eager formula's (same math)
    return provs


def run_memory(case: P.Case, env, args, policy, gflops, log) -> list[dict]:
    provs = memory_providers(case, args, policy, gflops)
    if not provs:
        return []
    cmd = [sys.executable, os.path.join(HERE, "memory_worker.py"), json.dumps(case.as_dict()), args.device, *provs]
    envv = dict(os.environ, BENCH_THREADS=str(torch.get_num_threads()), MALLOC_MMAP_THRESHOLD_="131072")
    rows, seen = [], set()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=envv, timeout=args.memory_timeout)
        lines, rc, err = out.stdout.splitlines(), out.returncode, out.stderr[-300:]
    except subprocess.TimeoutExpired as e:
        lines, rc, err = (e.stdout or b"").decode().splitlines() if isinstance(e.stdout, bytes) else \
            (e.stdout or "").splitlines(), "timeout", ""
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        seen.add(r["provider"])
        rows.append(row(env, case, r["provider"], r["mode"], "peak_bytes",
                        float("nan") if r["bytes"] is None else float(r["bytes"]), r["status"],
                        predicted_bytes=P.predicted_bytes(r["provider"], case),
                        note="peak RSS above inputs, own subprocess" if not args.device.startswith("cuda")
                        else "max_memory_allocated above inputs"))
        if r["mode"] == "fwd+bwd":
            b = r["bytes"]
            log(f"    memory {P.LABELS[r['provider']]:<23} {r['status']:<6} "
                + (f"{b / 2**20:9.1f} MiB fwd+bwd peak" if b is not None else ""))
    for p in provs:
        if p not in seen:  # the subprocess died (e.g. the kernel's OOM killer) or timed out
            status = "timeout" if rc == "timeout" else f"crashed (rc={rc})"
            rows.append(row(env, case, p, "fwd+bwd", "peak_bytes", float("nan"), status, note=err))
            log(f"    memory {P.LABELS[p]:<23} {status}")
    return rows


_FIRST_CALL = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[2]))
import providers as P
from softtriple_triton import cpu_native
x, fc, y = P.make_inputs(P.Case("target", 256, 512, 1000, 10), "cpu")
step, params = P.build("ours", P.Case("target", 256, 512, 1000, 10), x, fc, y, "cpu")
def one():
    for p in params:
        p.grad = None
    t = time.perf_counter()
    step().backward()
    return time.perf_counter() - t
first = one()
warm = sorted(one() for _ in range(5))[2]
print(json.dumps({"first_s": first, "warm_s": warm, "native": cpu_native.status()}))
"""


def first_call_latency(env, log) -> list[dict]:
    """CPU: ours' first training step at the target shape in a fresh process, with an empty kernel cache (the C
    kernels are compiled in that call) and then with the cached build; the extra latency is first - warm."""
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label in ("empty kernel cache (builds the C kernels)", "cached kernel build"):
            envv = dict(os.environ, SOFTTRIPLE_TRITON_CACHE=cache)
            cmd = [sys.executable, "-c", _FIRST_CALL, HERE, str(torch.get_num_threads())]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, env=envv, timeout=300)
                res = json.loads(r.stdout.strip().splitlines()[-1])
            except (subprocess.SubprocessError, OSError, ValueError, IndexError) as e:
                log(f"    first call ({label}): failed: {type(e).__name__}: {e}")
                continue
            nat = res["native"]
            kern = (f"C kernels built/loaded in {nat['build_s']:.2f} s" if nat["available"]
                    else f"C kernels unavailable ({nat['reason']})")
            note = f"fresh process, {label}; warm step {res['warm_s'] * 1e3:.1f} ms; {kern}"
            rows.append(row(env, TARGET_CPU, "ours", "fwd+bwd", "first_call_s", res["first_s"], "ok", note=note))
            log(f"    first call of ours, {label}: {res['first_s']:.2f} s ({note})")
    return rows


# rough cost of a step relative to the GEMM floor on a CPU (from --quick runs); only for --list
_STEP_FACTOR = {"ours": 3.0, "eager": 3.6, "compile": 1.8, "pml": 3.6, "floor": 1.0}


def estimate_s(case: P.Case, args, policy, gflops) -> float:
    """Very rough wall-time estimate of one case (for --list)."""
    t = 2.0  # guard, inputs
    floor = P.predicted_flops("floor", case) / (gflops * 1e9)
    for prov in memory_providers(case, args, policy, gflops) if not case.timing else args.providers:
        if skip_reason(prov, case, args, gflops, policy):
            continue
        extra = (P.predicted_flops(prov, case) - P.predicted_flops("floor", case)) / (gflops * 1e9)
        step = floor * _STEP_FACTOR[prov] + 1.2 * extra
        if case.timing:
            n = policy["min_reps"] if step < 1.0 else policy["slow_reps"]
            t += step + max(n * step, policy["target_s"]) + (15.0 if prov == "compile" else 0.0)
        if case.memory and prov in memory_providers(case, args, policy, gflops):
            t += (2 * step + 8.0) if prov == "compile" else step
    return t + (5.0 if case.memory else 0.0)


# ----------------------------------------------------------------------------------------- main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="size", action="store_const", const="quick")
    g.add_argument("--full", dest="size", action="store_const", const="full")
    g.add_argument("--smoke", dest="size", action="store_const", const="smoke")
    ap.set_defaults(size="default")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available, else cpu)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<device-tag>)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--providers", default=",".join(P.PROVIDERS), help="comma list of " + ",".join(P.PROVIDERS))
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--mem-budget-gb", type=float, default=None,
                    help="skip a baseline whose predicted memory exceeds this (default: 1/3 of RAM or GPU memory)")
    ap.add_argument("--memory-timeout", type=float, default=600.0, help="seconds per memory subprocess")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the grid with rough time estimates and exit")
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    if args.size == "smoke":  # < 30 s: no torch.compile (its compilation alone takes longer)
        args.no_compile = True
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if args.mem_budget_gb is None:
        if args.device.startswith("cuda"):
            total = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        args.mem_budget_gb = total / 3 / 2 ** 30
    return args


def main(argv=None) -> str:
    args = parse(argv)
    torch.set_num_threads(args.threads or n_cores())
    env = environment(args.device)
    env["allocator"] = steady_allocator()
    # the default grid owns results/<device-tag> (the committed results); other sizes get their own folder so a
    # --smoke or --quick run never overwrites them
    tag = env["device_tag"] + ("" if args.size == "default" else f"-{args.size}")
    out = args.out or os.path.join(HERE, "results", tag)
    os.makedirs(out, exist_ok=True)
    policy = POLICIES[args.size]
    cases = grid(args.size, args.device.startswith("cuda"))
    load0 = os.getloadavg()[0]
    gflops = machine_gflops(args.device)
    print(f"[bench] {env['device_name']} | torch {env['torch']} triton {env['triton']} pml {env['pml']} | "
          f"{len(cases)} cases ({args.size}) | ~{gflops:.0f} GFLOP/s fp32 matmul | out={out}", flush=True)
    if args.list:
        total = 0.0
        for case in cases:
            e = estimate_s(case, args, policy, gflops)
            total += e
            skips = {p: skip_reason(p, case, args, gflops, policy) for p in args.providers}
            skips = ", ".join(f"{p}: {r}" for p, r in skips.items() if r)
            print(f"  {case.sweep:<8} {case.case_id:<34} {'time' if case.timing else '    '} "
                  f"{'mem' if case.memory else '   '} ~{e:5.0f}s  {skips}")
        print(f"[bench] estimated total ~{total / 60:.1f} min (rough; assumes a quiet machine)")
        return out
    rows = []
    t_start = time.perf_counter()
    def _term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _term)  # `timeout` / a job runner: still write summary and plots
    interrupted = False
    try:
        for i, case in enumerate(cases, 1):
            el = time.perf_counter() - t_start
            print(f"[{i}/{len(cases)} {el:6.0f}s] {case.sweep:<8} {case.case_id}", flush=True)
            run_case(case, env, args, policy, gflops, lambda m: print(m, flush=True), rows)
            pd.DataFrame(rows).to_csv(os.path.join(out, "results.csv"), index=False)  # partial results survive
        if args.size != "smoke" and not args.device.startswith("cuda") and "ours" in args.providers:
            print("[bench] first-call latency of ours (fresh processes)", flush=True)
            rows += first_call_latency(env, lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        interrupted = True
        print(f"[bench] interrupted after {len(set(r['case'] for r in rows))} cases; writing what was measured",
              flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not rows:
        sys.exit(1)
    df = pd.DataFrame(rows)
    df.to_csv(os.path.join(out, "results.csv"), index=False)
    with open(os.path.join(out, "environment.json"), "w") as f:
        json.dump({**env, "size": args.size, "interrupted": interrupted, "loadavg_1min_start": load0,
                   "loadavg_1min_end": os.getloadavg()[0],
                   "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "threads": torch.get_num_threads(), "matmul_gflops": gflops,
                   "mem_budget_gb": args.mem_budget_gb, "wall_s": time.perf_counter() - t_start,
                   "cpu_native_kernels": native_status()}, f, indent=2)
    import report
    prof = None
    if args.size != "smoke" and "ours" in args.providers and not interrupted:
        prof = report.profile_above_floor(df, args.device)
    load1 = os.getloadavg()[0]
    # Judged by the load before the run: the load at the end includes the benchmark's own threads (a quiet
    # 2-core machine running it ends near 2), so it is reported but not used.
    quiet = None if args.device.startswith("cuda") or load0 < 0.5 * n_cores() else \
        f"the machine was busy (1-min load average {load0:.1f} at start; {load1:.1f} at end including this " \
        f"benchmark's own threads; {n_cores()} cores): CPU timings are noisy; rerun on a quiet machine before quoting them"
    if quiet:
        print(f"[bench] WARNING: {quiet}", flush=True)
    report.write_summary(df, env, out, args.size + (" (INTERRUPTED: partial)" if interrupted else ""),
                         time.perf_counter() - t_start, prof, warning=quiet)
    if not args.no_plots:
        report.plots(df, env, out)
    print(f"[bench] done in {time.perf_counter() - t_start:.0f}s -> {out}", flush=True)
    if interrupted:
        sys.exit(3)
    return out


if __name__ == "__main__":
    main()
