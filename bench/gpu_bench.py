#!/usr/bin/env python
"""The GPU verdict: one training step (forward + backward) of every backward path and dtype policy of the Triton
backend against the plain formula (eager and torch.compile, under autocast), pytorch-metric-learning (under
autocast, when installed) and the 3-GEMM cuBLAS floor, at the GPU target shapes.

    python bench/gpu_bench.py --out DIR               # on a CUDA machine (bench/gpu_check.sh calls it)
    TRITON_INTERPRET=1 python bench/gpu_bench.py --smoke --device cpu --out DIR   # the harness on tiny shapes

Inputs are fresh random tensors per case: embeddings in bf16 (as an autocast model emits them) with fp32 centers,
random labels; tau = 0 (the regulariser is O(C K^2 d) on every backend of this package and is timed apart).
Times: medians of CUDA-event-timed steps (gradients set to None before each), after warm-up; peak memory: the
allocator's peak above the inputs during one step. Every provider's loss is checked against the plain formula in
fp32 before it is timed. Writes results.csv, summary.md and speedup.png under --out; a time budget (--budget-s)
stops the run cleanly, recording what was skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import softtriple_triton as st  # noqa: E402
from softtriple_triton import fused  # noqa: E402

LA, GAMMA, MARGIN = 20.0, 0.1, 0.01
SHAPES = [  # (label, N, d, C, K)
    ("target: N=4096 d=512 C*K=100k", 4096, 512, 10000, 10),
    ("N=128 d=512 C=100 K=10 (CUB-like)", 128, 512, 100, 10),
    ("N=256 d=512 C=11318 K=2 (SOP-like)", 256, 512, 11318, 2),
    ("N=256 d=512 C=11318 K=10 (SOP-like)", 256, 512, 11318, 10),
]
SMOKE_SHAPES = [("smoke", 48, 32, 12, 3)]
OURS = {  # label -> (triton options, embeddings dtype, matmul precision)
    "ours cached (bf16)": (dict(backward="auto"), torch.bfloat16, "highest"),
    "ours chunked (bf16)": (dict(backward="chunked"), torch.bfloat16, "highest"),
    "ours two-kernel (bf16)": (dict(backward="two_kernel"), torch.bfloat16, "highest"),
    "ours cached (fp16)": (dict(backward="auto"), torch.float16, "highest"),
    "ours cached (fp32 @ high, TF32)": (dict(backward="auto"), torch.float32, "high"),
    "ours cached (fp32 @ highest)": (dict(backward="auto"), torch.float32, "highest"),
}
POLICY_SHAPES = 1  # the dtype policies other than bf16 are timed at the first shape only


def plain(x, fc, labels, C, K):
    """The formula written the obvious way (the eager / torch.compile baselines; tau = 0)."""
    xn = F.normalize(x, p=2, dim=1)
    w = F.normalize(fc, p=2, dim=0)
    sim = xn.matmul(w).reshape(x.shape[0], C, K)
    S = (F.softmax(sim / GAMMA, dim=2) * sim).sum(dim=2)
    margin_m = torch.zeros_like(S)
    margin_m[torch.arange(S.shape[0], device=S.device), labels] = MARGIN
    return F.cross_entropy(LA * (S - margin_m), labels)


class configured:
    """The Triton options and float32 matmul precision of one provider, for a whole step (forward + backward)."""

    def __init__(self, opts, precision):
        self.opts, self.precision = opts, precision

    def __enter__(self):
        self.old = fused.set_triton_options(**self.opts)
        self.old_p = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.precision)

    def __exit__(self, *exc):
        fused.set_triton_options(**self.old)
        torch.set_float32_matmul_precision(self.old_p)
        return False


class Timer:
    def __init__(self, device, reps, warmup):
        self.cuda = device.startswith("cuda")
        self.reps, self.warmup = reps, warmup

    def __call__(self, fn, params) -> tuple[float, float, float]:
        """(median, 20th, 80th percentile) seconds of fn() with params' gradients cleared before each call."""
        for _ in range(self.warmup):
            self._clear(params)
            fn()
        times = []
        for _ in range(self.reps):
            self._clear(params)
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
        return statistics.median(times), q[0], q[-1]

    @staticmethod
    def _clear(params):
        for p in params:
            p.grad = None


def peak_bytes(fn, params, device) -> float:
    if not device.startswith("cuda"):
        return float("nan")
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def providers(N, d, C, K, device, first_shape, have_pml):
    """name -> (make() -> (step, params, loss_fn)); make builds fresh inputs, step runs forward + backward."""
    def inputs(emb_dtype, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(N, d, generator=g).to(device=device, dtype=emb_dtype).requires_grad_(True)
        fc = torch.randn(d, C * K, generator=g).to(device).requires_grad_(True)
        y = torch.randint(0, C, (N,), generator=g).to(device)
        return x, fc, y

    out = {}
    for name, (opts, dt, prec) in OURS.items():
        if name != "ours cached (bf16)" and "bf16" not in name and not first_shape:
            continue

        def make(opts=opts, dt=dt, prec=prec):
            x, fc, y = inputs(dt)

            def loss():
                return st.softtriple_loss(x, fc, y, K, la=LA, gamma=GAMMA, tau=0.0, margin=MARGIN, backend="triton")

            def step():
                with configured(opts, prec):
                    loss().backward()

            def checked_loss():
                with configured(opts, prec):
                    return loss()
            return step, [x, fc], checked_loss, (x, fc, y)
        out[name] = make

    def baseline(kind):
        def make():
            x, fc, y = inputs(torch.bfloat16)
            fn = plain
            if kind == "compile":
                torch._dynamo.reset()
                fn = torch.compile(plain, dynamic=False)
            if kind == "pml":
                from pytorch_metric_learning import losses
                m = losses.SoftTripleLoss(C, d, centers_per_class=K, la=LA, gamma=GAMMA, margin=MARGIN).to(device)
                m.fc = torch.nn.Parameter(fc.detach().clone())
                fc_param = m.fc

                def fn(x, fc, y, C, K):  # noqa: ARG001 (same signature)
                    return m(x, y)
            else:
                fc_param = fc

            def loss():
                with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
                    return fn(x, fc_param, y, C, K)
            return (lambda: loss().backward()), [x, fc_param], loss, (x, fc_param, y)
        return make

    out["eager (autocast)"] = baseline("eager")
    out["torch.compile (autocast)"] = baseline("compile")
    if have_pml:
        out["pytorch-metric-learning (autocast)"] = baseline("pml")

    def floor():
        g = torch.Generator(device="cpu").manual_seed(0)
        X = torch.randn(N, d, generator=g).to(device=device, dtype=torch.bfloat16)
        W = torch.randn(d, C * K, generator=g).to(device=device, dtype=torch.bfloat16)
        G = torch.randn(N, C * K, generator=g).to(device=device, dtype=torch.bfloat16)

        def step():
            torch.matmul(X, W)
            torch.matmul(G, W.t())
            torch.matmul(X.t(), G)
        return step, [], None, None
    out["3-GEMM floor (cuBLAS bf16)"] = floor
    return out


def check(loss_fn, tensors, C, K) -> float:
    """Relative difference of the provider's loss and the fp32 plain formula on the same (rounded) inputs."""
    x, fc, y = tensors
    with torch.no_grad():
        got = float(loss_fn())
        want = float(plain(x.detach().float(), fc.detach().float(), y, C, K))
    return abs(got - want) / max(abs(want), 1e-6)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repetitions (tests the harness)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=240.0)
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu (with TRITON_INTERPRET=1) for the harness smoke run")
    os.makedirs(a.out, exist_ok=True)
    shapes = SMOKE_SHAPES if a.smoke else SHAPES
    timer = Timer(a.device, 2 if a.smoke else a.reps, 1 if a.smoke else 3)
    try:
        import pytorch_metric_learning  # noqa: F401
        have_pml = True
    except Exception:
        have_pml = False
    t0 = time.time()
    rows = []
    for si, (label, N, d, C, K) in enumerate(shapes):
        for name, make in providers(N, d, C, K, a.device, si < POLICY_SHAPES, have_pml).items():
            row = dict(shape=label, N=N, d=d, C=C, K=K, provider=name, status="ok")
            if time.time() - t0 > a.budget_s:
                row["status"] = "skipped: time budget"
                rows.append(row)
                continue
            try:
                step, params, loss_fn, tensors = make()
                if loss_fn is not None:
                    row["check_rel"] = check(loss_fn, tensors, C, K)
                med, p20, p80 = timer(step, params)
                row.update(ms=med * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3,
                           peak_mib=peak_bytes(step, params, a.device) / 2**20)
            except Exception as e:  # recorded, never hidden
                row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.device.startswith("cuda"):
                torch.cuda.empty_cache()
    write(a.out, rows, a.device)
    return 0


def write(out, rows, device):
    cols = ["shape", "N", "d", "C", "K", "provider", "status", "ms", "p20_ms", "p80_ms", "peak_mib", "check_rel"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    import triton
    dev = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    lines = ["# GPU verdict (bench/gpu_bench.py)", "",
             f"device {dev}; torch {torch.__version__}; triton {triton.__version__}; python "
             f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        ref = {r["provider"]: r.get("ms") for r in rs}
        floor, comp, eager = (ref.get("3-GEMM floor (cuBLAS bf16)"), ref.get("torch.compile (autocast)"),
                              ref.get("eager (autocast)"))
        lines += [f"#### {shape}", "", "| provider | ms | / floor | vs torch.compile | vs eager | peak MiB | loss check |",
                  "|---|---|---|---|---|---|---|"]
        for r in rs:
            ms = r.get("ms")
            if ms is None:
                lines.append(f"| {r['provider']} | {r['status']} | | | | | |")
                continue
            lines.append(f"| {r['provider']} | {ms:.3f} | {_ratio(ms, floor)} | {_ratio(ms, comp, True)} | "
                         f"{_ratio(ms, eager, True)} "
                         f"| {r.get('peak_mib', float('nan')):.0f} | {r.get('check_rel', float('nan')):.1e} |")
        lines.append("")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    try:
        plot(out, rows)
    except Exception as e:
        print("plot failed:", e)


def _ratio(ms, b, inverse=False):
    if not b:
        return ""
    return f"{(b / ms):.2f}x" if inverse else f"{ms / b:.2f}"


def plot(out, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    names = list(dict.fromkeys(r["provider"] for r in rows if r.get("ms")))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = []
        for s in shapes:
            floor = next((r.get("ms") for r in rows if r["shape"] == s and r["provider"].startswith("3-GEMM")), None)
            ms = next((r.get("ms") for r in rows if r["shape"] == s and r["provider"] == name), None)
            vals.append(ms / floor if ms and floor else 0)
        ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=8)
    ax.set_ylabel("step time / 3-GEMM floor (lower is better)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "speedup.png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
