"""Timers: CPU time.perf_counter (threads fixed by the caller) or CUDA events; adaptive repeats."""

from __future__ import annotations

import gc
import statistics
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


def stats(samples: list[float]) -> dict:
    a = np.asarray(samples, dtype=float)
    return {"value": float(np.median(a)), "p20": float(np.percentile(a, 20)), "p80": float(np.percentile(a, 80)),
            "n_repeats": int(a.size)}


def _zero(params):
    for p in params:
        p.grad = None


def time_step(step, params, clock: Clock, policy: dict, cap_s: float) -> tuple[dict, float, str]:
    """Times forward (graph building included), backward, and forward+backward of one training step.

    Returns ({mode: stats}, first_call_s, status). The first call (compilation, lazy init) is never
    counted. status is "ok", or "over-time-cap" when one warm step exceeded cap_s (then the single
    warm sample is recorded).
    """
    clock.sync()
    t0 = time.perf_counter()
    _zero(params)
    step().backward()
    clock.sync()
    first = time.perf_counter() - t0
    fwd, bwd, tot = [], [], []

    def one():
        _zero(params)
        clock.sync()
        a = clock.mark()
        loss = step()
        b = clock.mark()
        loss.backward()
        c = clock.mark()
        clock.sync()
        fwd.append(clock.elapsed(a, b))
        bwd.append(clock.elapsed(b, c))
        tot.append(clock.elapsed(a, c))

    one()  # probe: a warmed-up step, kept as a sample
    probe = tot[-1]
    if probe > cap_s:
        return {"fwd": stats(fwd), "bwd": stats(bwd), "fwd+bwd": stats(tot)}, first, "over-time-cap"
    min_reps = policy["min_reps"] if probe < 1.0 else policy["slow_reps"]  # slow steps: few samples
    deadline = time.perf_counter() + policy["target_s"]
    gc.collect()
    while len(tot) < policy["max_reps"] and (len(tot) < min_reps or time.perf_counter() < deadline):
        one()
    _zero(params)
    return {"fwd": stats(fwd), "bwd": stats(bwd), "fwd+bwd": stats(tot)}, first, "ok"


def time_floor(ops, clock: Clock, policy: dict) -> dict:
    """Times the bare GEMMs: fwd = X@W, bwd = G@W^T + X^T@G, fwd+bwd = all three."""
    f, b1, b2 = ops
    for _ in range(2):
        f(), b1(), b2()
    fwd, bwd, tot = [], [], []
    deadline = time.perf_counter() + policy["target_s"]
    while len(tot) < policy["max_reps"] and (len(tot) < policy["min_reps"] or time.perf_counter() < deadline):
        clock.sync()
        m0 = clock.mark()
        r = f()
        m1 = clock.mark()
        r2 = b1()
        r3 = b2()
        m2 = clock.mark()
        clock.sync()
        del r, r2, r3
        fwd.append(clock.elapsed(m0, m1))
        bwd.append(clock.elapsed(m1, m2))
        tot.append(clock.elapsed(m0, m2))
        if tot[-1] > 5 * policy["target_s"]:
            break
    return {"fwd": stats(fwd), "bwd": stats(bwd), "fwd+bwd": stats(tot)}


__all__ = ["Clock", "time_step", "time_floor", "stats", "statistics"]
