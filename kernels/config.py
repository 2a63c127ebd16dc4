"""Host-side helpers shared by the kernel launchers: dtype rules, tile configuration, argument checks."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._common import TRITON_MAX_CENTERS_PER_CLASS as MAX_CENTERS_PER_CLASS
from .._common import acc_dtype, interpreting  # noqa: F401  (re-exported to the kernel files)

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}



def dot_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """Operand dtype of tl.dot: the promotion of both inputs.

    bf16 dots are upcast to fp32 under the interpreter, which multiplies raw bf16 bit patterns
    (triton issue 11584); on a GPU bf16 stays bf16.
    """
    dt = torch.promote_types(x_dtype, w_dtype)
    if dt == torch.bfloat16 and interpreting():
        return torch.float32
    return dt


def grad_dot_dtype(dt: torch.dtype) -> torch.dtype:
    """Operand dtype of the gradient dots (ds @ w^T, x^T @ ds). dL/ds can exceed fp16's range at extreme
    la / gamma (|ds| <= g * la * (1 + 2 / gamma)), so fp16 inputs take fp32 gradient dots; bf16 has fp32's range."""
    return torch.float32 if dt == torch.float16 else dt


def dot_precision(dt: torch.dtype) -> str:
    """fp32 dots follow torch.get_float32_matmul_precision(): "highest" -> IEEE fp32, else TF32."""
    if dt == torch.float32 and not interpreting() and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


@dataclass(frozen=True)
class TileConfig:
    block_n: int  # rows of embeddings per tile
    block_c: int  # whole classes per tile
    kp: int       # K padded to a power of two (lanes per class)
    block_d: int  # embedding-dimension chunk of each tl.dot
    num_warps: int = 4
    num_stages: int = 2

    @property
    def block_m(self) -> int:
        return self.block_c * self.kp


def tile_config(N: int, d: int, C: int, K: int, device: torch.device, block_m: int | None = None) -> TileConfig:
    """Fixed default tiles (no autotuning on the default path).

    Interpreter: large tiles, since each Triton op is one numpy call. GPU: 64 x 128 tiles.
    tl.dot needs every dimension >= 16.
    """
    kp = triton.next_power_of_2(K)
    target_m = block_m or (128 if (device.type == "cuda" or interpreting()) else 64)
    block_c = min(max(1, target_m // kp), triton.next_power_of_2(C))
    while block_c * kp < 16:  # tl.dot needs >= 16 columns
        block_c *= 2
    block_n = 64 if device.type == "cuda" else max(16, min(64, triton.next_power_of_2(N)))
    block_d = max(16, min(64, triton.next_power_of_2(d)))
    return TileConfig(block_n=block_n, block_c=block_c, kp=kp, block_d=block_d,
                      num_warps=8 if block_c * kp >= 128 else 4)


# Candidate tiles for the opt-in autotuner: (block_n, target block_m, block_d, num_warps).
CANDIDATE_TILES = ((64, 128, 64, 8), (64, 64, 64, 4), (128, 64, 32, 8), (32, 128, 64, 4), (128, 128, 32, 8),
                   (64, 256, 32, 8))
_autotune = {"enabled": os.environ.get("SOFTTRIPLE_TRITON_AUTOTUNE", "0") == "1"}
_tuned: dict = {}


def set_autotune(enabled: bool) -> bool:
    """Opt in to (or out of) autotuning the tiles of the CUDA kernels; returns the previous setting.

    Off by default: the fixed tiles of ``tile_config`` are used. When on, the first call for a given
    (kernel, N rounded up to a power of two, d, C, K, dtypes) times every candidate of CANDIDATE_TILES with
    ``triton.testing.do_bench`` and keeps the fastest for the rest of the process. Also settable with the
    environment variable SOFTTRIPLE_TRITON_AUTOTUNE=1.
    """
    old = _autotune["enabled"]
    _autotune["enabled"] = bool(enabled)
    return old


def _bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=25)


def _autotune_applies(device: torch.device) -> bool:
    return _autotune["enabled"] and device.type == "cuda" and not interpreting()


def choose_tiles(kind: str, x: torch.Tensor, w: torch.Tensor, K: int, block_m: int | None, run) -> TileConfig:
    """The tile configuration for one launch: fixed by default, the fastest candidate when autotuning.

    ``run(cfg)`` performs the launch with fresh outputs (the kernels never accumulate into caller memory).
    """
    N, d = x.shape
    C = w.shape[1] // K
    default = tile_config(N, d, C, K, x.device, block_m)
    if block_m is not None or not _autotune_applies(x.device):
        return default
    key = (kind, triton.next_power_of_2(max(N, 1)), d, C, K, x.dtype, w.dtype, str(x.device))
    if key not in _tuned:
        kp = default.kp
        cands = {default}
        for bn, bm, bd, warps in CANDIDATE_TILES:
            bc = min(max(1, bm // kp), triton.next_power_of_2(C))
            while bc * kp < 16:
                bc *= 2
            cands.add(TileConfig(block_n=bn, block_c=bc, kp=kp, block_d=max(16, min(bd, triton.next_power_of_2(d))),
                                 num_warps=warps))
        _tuned[key] = min(sorted(cands, key=repr), key=lambda cfg: _bench(lambda: run(cfg)))
    return _tuned[key]


@dataclass(frozen=True)
class LaunchPlan:
    """Grid of one launch: row blocks x class tiles, and the split of the looped dimension."""
    n_row_blocks: int
    n_tiles: int
    n_splits: int
    per_split: int  # loop iterations (class tiles, or row blocks for the centers' backward) per split


def plan_launch(N: int, C: int, cfg: TileConfig, device: torch.device, splits: int | None,
                loop_over_rows: bool) -> LaunchPlan:
    n_row_blocks = triton.cdiv(N, cfg.block_n)
    n_tiles = triton.cdiv(C, cfg.block_c)
    programs, loop = (n_tiles, n_row_blocks) if loop_over_rows else (n_row_blocks, n_tiles)
    n_splits = split_count(programs, max(loop, 1), device, splits)
    per_split = max(1, triton.cdiv(loop, n_splits))
    n_splits = max(1, triton.cdiv(loop, per_split))  # every split gets at least one iteration
    return LaunchPlan(n_row_blocks, n_tiles, n_splits, per_split)


def kernel_meta(cfg: TileConfig, x_dtype: torch.dtype, w_dtype: torch.dtype, grad: bool) -> dict:
    """The constexpr and launch keyword arguments shared by all three kernels."""
    dot = dot_dtype(x_dtype, w_dtype)
    meta = dict(BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, KP=cfg.kp, BLOCK_D=cfg.block_d,
                DOT_DTYPE=tl_dtype(dot), ACC_DTYPE=tl_dtype(acc_dtype(x_dtype, w_dtype)),
                PRECISION=dot_precision(dot), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if grad:
        meta["GRAD_DTYPE"] = tl_dtype(grad_dot_dtype(dot))
    return meta


def upstream_args(labels, g, lse, dS, N: int, C: int, acc: torch.dtype, device: torch.device):
    """Kernel arguments (y, g, lse, ds, stride_dsn, stride_dsc, LOGITS) of the two backward modes."""
    dummy = torch.empty((1,), dtype=acc, device=device)
    if dS is None:
        return labels, g, lse, dummy, 0, 0, False
    if dS.shape != (N, C):
        raise ValueError(f"dS must have shape ({N}, {C}), got {tuple(dS.shape)}")
    return torch.empty((1,), dtype=torch.int64, device=device), dummy, dummy, dS, dS.stride(0), dS.stride(1), True


def split_count(programs: int, work_items: int, device: torch.device, splits: int | None) -> int:
    """How many independent splits of the loop dimension to launch so the GPU is full.

    Each split writes its own partial result, reduced afterwards in a fixed order (deterministic).
    """
    if splits is not None:
        return max(1, min(int(splits), work_items))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(2 * sms / max(programs, 1))
    return max(1, min(want, work_items))


def check_operands(x: torch.Tensor, w: torch.Tensor, rw: torch.Tensor, K: int) -> None:
    """Shape/dtype/device checks shared by all launchers (the user-facing API validates earlier)."""
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"expected x [N, d] and w [d, C*K]; got x {tuple(x.shape)} and w {tuple(w.shape)}")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"x has width {x.shape[1]} but w has height {w.shape[0]}")
    if K < 1 or K > MAX_CENTERS_PER_CLASS or w.shape[1] % K:
        raise ValueError(f"K={K} must be in [1, {MAX_CENTERS_PER_CLASS}] and divide w.shape[1]={w.shape[1]}")
    if rw.shape != (w.shape[1],):
        raise ValueError(f"rw must have shape ({w.shape[1]},), got {tuple(rw.shape)}")
    for name, t in (("x", x), ("w", w)):
        if t.dtype not in _TL_DTYPES:
            raise TypeError(f"{name} must be fp16, bf16, fp32 or fp64; got {t.dtype}")
    if rw.dtype != acc_dtype(x.dtype, w.dtype):
        raise TypeError(f"rw must be {acc_dtype(x.dtype, w.dtype)}, got {rw.dtype}")
    if not (x.device == w.device == rw.device):
        raise ValueError(f"x, w, rw on different devices: {x.device}, {w.device}, {rw.device}")
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set before importing triton); "
                           "use backend='torch' for the fast CPU path")


def tl_dtype(dt: torch.dtype):
    return _TL_DTYPES[dt]


def hyper_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scalar hyper-parameters as a small tensor so fp64 kernels see them unrounded (a Python float kernel
    argument is passed as fp32). Cached: creating a CUDA tensor from host values is a blocking copy, so only the
    first call with given values pays it, not every training step. The cached tensors are never written."""
    return _hyper_tensor(tuple(float(v) for v in values), dtype, torch.device(device))


@functools.lru_cache(maxsize=64)
def _hyper_tensor(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)
