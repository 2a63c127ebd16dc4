"""Timers: CPU time.perf_counter (threads fixed by the caller) or CUDA events; interleaved adaptive repeats."""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import time

import numpy as np
import torch


class Clock:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1e3
        return b - a

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def steady_allocator() -> str:
    """Make the glibc heap keep what it frees (mmap and trim thresholds at 1 GiB) for this timing process, and say what
    was done. Interleaving providers otherwise makes each step re-fault its large buffers: glibc's adaptive mmap
    threshold and heap trimming follow the size mix of the previous provider, and at N=256 d=512 C*K=10000 (2-core
    Xeon, torch 2.13) ours took 5,224 minor page faults a step and the 3-GEMM floor 7,500 when alternated, 0 each when
    run alone: +5-8 ms on a 28-33 ms step, different for each provider. A training loop repeats the same allocations
    and reaches the steady state, so that is what is timed. Buffers over 1 GiB are still mapped fresh."""
    if not sys.platform.startswith("linux"):
        return "allocator unchanged (not Linux)"
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(-3, 1 << 30) == 1 and libc.mallopt(-1, 1 << 30) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        ok = False
    return "glibc heap kept (mallopt: mmap and trim thresholds 1 GiB)" if ok else "allocator unchanged (no mallopt)"


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def stats(samples: list[float]) -> dict:
    a = np.asarray(samples, dtype=float)
    return {"value": float(np.median(a)), "p20": float(np.percentile(a, 20)), "p80": float(np.percentile(a, 80)),
            "n_repeats": int(a.size)}


def _zero(params):
    for p in params:
        p.grad = None


def step_sampler(step, params, clock: Clock):
    """One timed training step: zero the grads, forward (graph building included), backward -> (fwd, bwd, total)."""
    def one():
        _zero(params)
        clock.sync()
        a = clock.mark()
        loss = step()
        b = clock.mark()
        loss.backward()
        c = clock.mark()
        clock.sync()
        return clock.elapsed(a, b), clock.elapsed(b, c), clock.elapsed(a, c)
    return one


def floor_sampler(ops, clock: Clock):
    """The bare GEMMs: fwd = X@W, bwd = G@W^T + X^T@G."""
    f, b1, b2 = ops

    def one():
        clock.sync()
        m0 = clock.mark()
        r = f()
        m1 = clock.mark()
        r2 = b1()
        r3 = b2()
        m2 = clock.mark()
        clock.sync()
        del r, r2, r3
        return clock.elapsed(m0, m1), clock.elapsed(m1, m2), clock.elapsed(m0, m2)
    return one


def time_interleaved(samplers: dict, policy: dict, cap_s: float) -> dict:
    """Times several providers in one interleaved run: a first call each (compilation, lazy init: never counted),
    one warm probe each, then rounds in which every provider still sampling runs once, in a rotated order, so
    that a change of machine load hits all of them alike. A provider stops after min_reps samples (slow_reps when
    its probe took >= 1 s) once the round-robin has run target_s per provider, or at max_reps. A provider whose
    warm probe exceeds cap_s keeps its single sample (status "over-time-cap"). A provider that raises is recorded
    with its error and dropped.

    Returns {name: {"modes": {mode: stats}, "first_s": s, "status": str, "faults": median minor page faults of a
    round-robin sample}}.
    """
    out, samples, active = {}, {}, []
    for name, one in samplers.items():
        try:
            t0 = time.perf_counter()
            one()
            first = time.perf_counter() - t0
            samples[name] = [one()]
        except Exception as e:  # recorded, never dropped silently
            out[name] = {"modes": None, "first_s": None, "status": f"error: {type(e).__name__}: {e}"[:200]}
            continue
        probe = samples[name][0][2]
        status = "over-time-cap" if probe > cap_s else "ok"
        out[name] = {"modes": None, "first_s": first, "status": status}
        if status == "ok":
            active.append((name, policy["min_reps"] if probe < 1.0 else policy["slow_reps"]))
    gc.collect()
    deadline = time.perf_counter() + policy["target_s"] * max(1, len(active))

    def done(name, need):
        n = len(samples[name])
        slow = need < policy["min_reps"]
        return n >= policy["max_reps"] or (n >= need and (slow or time.perf_counter() >= deadline))

    rnd, faults = 0, {}
    while True:
        active = [(n, need) for n, need in active if not done(n, need)]
        if not active:
            break
        k = rnd % len(active)
        for name, _ in active[k:] + active[:k]:
            f0 = minor_faults()
            samples[name].append(samplers[name]())
            faults.setdefault(name, []).append(minor_faults() - f0)
        rnd += 1
    for name, s in samples.items():
        cols = list(zip(*s))
        out[name]["modes"] = {"fwd": stats(cols[0]), "bwd": stats(cols[1]), "fwd+bwd": stats(cols[2])}
        out[name]["faults"] = float(np.median(faults[name])) if faults.get(name) else float("nan")
    return out


__all__ = ["Clock", "floor_sampler", "minor_faults", "stats", "steady_allocator", "step_sampler", "time_interleaved"]
