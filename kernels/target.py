"""The GPU a launch is planned for, and the one place where kernels are launched.

Launch planning (tiles, splits) depends on the target: its architecture and its number of SMs. On a real
device both come from the driver. ``simulate(target)`` makes the launchers plan for a GPU that is not there
and record their launches instead of running them: ``bench/gpu_static.py`` uses it, with fake CUDA tensors,
to capture exactly the launches the public API makes and compile them ahead of time for sm_90 / sm_80 / gfx942.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass

import torch

from .._common import interpreting


@dataclass(frozen=True)
class Target:
    backend: str        # "cuda", "hip" or "interpreter"
    arch: object        # 90, 80 (cuda compute capability x 10), "gfx942" (hip), None (interpreter)
    sms: int            # streaming multiprocessors (compute units)
    warp_size: int = 32
    memory: int = 0     # device memory in bytes (0: unknown)

    @property
    def tensor_cores(self) -> bool:
        """wgmma (sm_90), mma.sync (sm_80) or MFMA (gfx9xx): bf16/fp16/tf32 dots run on matrix units."""
        return self.backend in ("cuda", "hip")


INTERPRETER = Target("interpreter", None, 1)
H200 = Target("cuda", 90, 132, memory=141 << 30)   # the H100's chip (132 SMs) with 141 GB
H100 = Target("cuda", 90, 132, memory=80 << 30)
A100 = Target("cuda", 80, 108, memory=80 << 30)
MI300X = Target("hip", "gfx942", 304, 64, memory=192 << 30)

_state = threading.local()


def simulated() -> Target | None:
    return getattr(_state, "target", None)


def capturing() -> bool:
    """Launches are recorded, not run (simulate with record=True): the tensors are fakes."""
    return simulated() is not None and getattr(_state, "records", None) is not None


def target_of(device: torch.device) -> Target:
    sim = simulated()
    if sim is not None:
        return sim
    if device.type != "cuda" or interpreting():
        return INTERPRETER
    return _device_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _device_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    if getattr(torch.version, "hip", None):
        return Target("hip", props.gcnArchName.split(":")[0], props.multi_processor_count, 64, props.total_memory)
    return Target("cuda", props.major * 10 + props.minor, props.multi_processor_count, 32, props.total_memory)


@contextlib.contextmanager
def simulate(target: Target, record: bool = True):
    """Plan launches for ``target`` and record them (kernel, grid, args, kwargs) instead of running them.

    record=False: plan for ``target`` but run the launches (through the interpreter): the tiles and splits of that
    GPU, executed on CPU tensors (bench/flops.py counts the matrix work of the GPU's launch plan this way)."""
    old_t, old_r = simulated(), getattr(_state, "records", None)
    _state.target, _state.records = target, ([] if record else None)
    try:
        yield _state.records
    finally:
        _state.target, _state.records = old_t, old_r


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), or a recorded launch under ``simulate``."""
    if capturing():
        _state.records.append((kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)
