"""Peak-memory measurement of one case, run in its own subprocess by bench/run.py.

Usage: python bench/memory_worker.py '<case json>' <device> <provider> [<provider> ...]
Prints one JSON line per provider and mode: {"provider", "mode", "bytes", "status"}.

CPU: peak resident set size above the inputs. Per provider: one warm-up step (lazy init,
compilation; on a small copy of the case except for torch.compile), free everything, malloc_trim, then baseline = VmRSS and the kernel's high-water mark
is reset (/proc/self/clear_refs 5); then one forward (mode "fwd": VmHWM - baseline) and its
backward (mode "fwd+bwd": VmHWM - baseline). The per-case subprocess keeps other cases' memory out.
CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the step.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from providers import Case, build, make_inputs  # noqa: E402

try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # pragma: no cover
    _libc = None


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _settle():
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _warm_up(provider: str, case: Case, device: str):
    """One step first (lazy library init; torch.compile's compilation) so that it is not counted. On a
    small copy of the case (same d, K, tau), except for torch.compile, which must see the same shapes."""
    if provider != "compile":
        case = Case(case.sweep, min(case.N, 64), case.d, min(case.C, 64), case.K, case.dtype, case.tau)
    x, fc, y = make_inputs(case, device)
    step, params = build(provider, case, x, fc, y, device)
    step().backward()
    return step if provider == "compile" else None


def measure(provider: str, case: Case, device: str) -> list[dict]:
    _warm_up(provider, case, device)
    x, fc, y = make_inputs(case, device)
    step, params = build(provider, case, x, fc, y, device)
    _settle()
    out = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step()
        torch.cuda.synchronize()
        out.append({"mode": "fwd", "bytes": torch.cuda.max_memory_allocated() - base})
        loss.backward()
        torch.cuda.synchronize()
        out.append({"mode": "fwd+bwd", "bytes": torch.cuda.max_memory_allocated() - base})
        return out
    base = _status_kb("VmRSS")
    if not _reset_hwm():
        raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    loss = step()
    out.append({"mode": "fwd", "bytes": _status_kb("VmHWM") - base})
    loss.backward()
    out.append({"mode": "fwd+bwd", "bytes": _status_kb("VmHWM") - base})
    return out


def main():
    case = Case(**json.loads(sys.argv[1]))
    device = sys.argv[2]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    for provider in sys.argv[3:]:
        try:
            rows = measure(provider, case, device)
            for r in rows:
                print(json.dumps({"provider": provider, "status": "ok", **r}), flush=True)
        except torch.OutOfMemoryError:
            print(json.dumps({"provider": provider, "status": "oom", "mode": "fwd+bwd", "bytes": None}), flush=True)
        except Exception as e:  # recorded, not fatal
            print(json.dumps({"provider": provider, "status": f"error: {type(e).__name__}: {e}"[:200],
                              "mode": "fwd+bwd", "bytes": None}), flush=True)
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        _settle()


if __name__ == "__main__":
    main()
