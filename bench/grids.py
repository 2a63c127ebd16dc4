"""Size grids of bench/run.py: smoke (tests), quick (~1 min), default (< ~10 min on a 2-core CPU), full."""

from __future__ import annotations

from providers import Case

# the shapes the targets are stated at
TARGET_CPU = Case("target", 256, 512, 1000, 10)
MEMORY_CPU = Case("large-C", 512, 128, 50000, 10, memory=True, timing=False)
CUB = dict(N=128, d=512, C=100)
SOP = dict(N=256, d=512, C=11318)
GPU_FLOOR = Case("large-C", 4096, 512, 10000, 10, dtype="bf16")


def _dedup(cases):
    seen, out = {}, []
    for c in cases:
        key = (c.N, c.d, c.C, c.K, c.dtype, c.tau)
        if key in seen:  # keep one; merge the memory flag
            i = seen[key]
            o = out[i]
            out[i] = Case(o.sweep, c.N, c.d, c.C, c.K, c.dtype, c.tau, o.memory or c.memory, o.timing or c.timing)
            continue
        seen[key] = len(out)
        out.append(c)
    return out


def grid(size: str, cuda: bool) -> list[Case]:
    if size == "smoke":
        return [Case("smoke", 32, 16, 10, 2, tau=0.2, memory=True)]
    if size == "quick":
        if cuda:  # the GPU targets' shapes first (a time-limited run keeps what it finished)
            return _dedup([Case(GPU_FLOOR.sweep, GPU_FLOOR.N, GPU_FLOOR.d, GPU_FLOOR.C, GPU_FLOOR.K, "bf16", memory=True),
                           Case("CUB/SOP", **CUB, K=10), Case("CUB/SOP", **SOP, K=2), Case("CUB/SOP", **SOP, K=10),
                           Case("target", 256, 512, 1000, 10, memory=True),
                           Case("large-C", 1024, 512, 100000, 10, dtype="bf16", memory=True, timing=False)])
        return _dedup([Case("target", 256, 512, 1000, 10, memory=True),
                       Case("C", CUB["N"], CUB["d"], CUB["C"], 10),
                       Case("large-C", 512, 128, 10000, 10, memory=True, timing=False)])
    full = size == "full"
    Ns = [32, 64, 128, 256, 512, 1024, 2048, 4096] if full else ([32, 256, 1024, 4096] if cuda else [32, 128, 256, 1024])
    Cs = [100, 1000, 11318, 50000] if full else [100, 1000, 11318]
    if cuda:
        Cs += [100000]
    dtypes = ["fp32", "bf16", "fp16"] if cuda else ["fp32"]
    cases = []
    for dt in dtypes:
        cases.append(Case("target", 256, 512, 1000, 10, dtype=dt, memory=True))
        cases += [Case("N", n, 512, 1000, 10, dtype=dt, memory=True) for n in Ns]
        cases += [Case("C", 256, 512, c, 10, dtype=dt, memory=True) for c in Cs]
        cases += [Case("K", 256, 512, 1000, k, dtype=dt) for k in (1, 2, 10)]
        cases += [Case("d", 256, d, 1000, 10, dtype=dt) for d in (64, 512)]
        if dt != "fp32" and not full:
            break
    # tau > 0 (the regulariser; the naive one is (C*K)^2) at the CUB-like and SOP-like shapes
    for tau in (0.0, 0.2):
        if full or cuda:  # on a CPU the naive (C*K)^2 regulariser makes this a ~10 s step per baseline
            cases.append(Case("tau", 256, 512, 1000, 10, tau=tau))
        cases.append(Case("CUB/SOP", **CUB, K=10, tau=tau))
        cases.append(Case("CUB/SOP", **SOP, K=2, tau=tau))
        cases.append(Case("CUB/SOP", **SOP, K=10, tau=tau))
    # large C*K: the memory wall of the naive formula
    if cuda:
        for n in ([1024, 4096] if full else [1024]):
            cases += [Case("large-C", n, 512, c, 10, dtype="bf16", memory=True) for c in (1000, 10000, 50000, 100000)]
        cases.append(GPU_FLOOR)
    else:
        # memory only (a step at C*K = 1M takes 10-30 s here)
        cases += [Case("large-C", 512, 128, c, 10, memory=True, timing=False) for c in (1000, 10000, 50000, 100000)]
        if full:  # C*K = 1,000,000 at d = 512 (a step takes ~15-60 s on 2 cores)
            cases += [Case("large-C", n, 512, 100000, 10, memory=True, timing=False) for n in (256, 1024)]
    return _dedup(cases)
