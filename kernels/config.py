"""Host-side rules shared by the kernel launchers: lane groups, tiles, launch plans, dtype rules, operand checks.

Lane groups. A tile holds BLOCK_C whole classes. The K centers of a class are split into at most two groups of
power-of-two width, KA = the largest power of two <= K and KB = next_pow2(K - KA) (0 when K is a power of two):
K=10 -> 8 + 2, K=3 -> 2 + 1, K=7 -> 4 + 4 (one masked lane). Each group is its own tl.dot, so no matrix-unit
work is spent on padding lanes (one group of next_pow2(K) lanes would waste 37.5% of it at K=10).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .._common import TRITON_MAX_CENTERS_PER_CLASS as MAX_CENTERS_PER_CLASS
from .._common import acc_dtype, interpreting  # noqa: F401  (re-exported to the kernel files)
from .target import Target, capturing, launch, simulated, target_of  # noqa: F401


def emulating() -> bool:
    """Kernels run through Triton's interpreter: TRITON_INTERPRET is set and launches are not being captured for
    ahead-of-time compilation (target.simulate)."""
    return interpreting() and not capturing()

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def tl_dtype(dt: torch.dtype):
    return _TL_DTYPES[dt]


# ----------------------------------------------------------------------------------------------- lane groups
def lane_groups(K: int) -> tuple[int, int]:
    """(KA, KB): the widths of the two lane groups of a class (KB = 0: one group)."""
    ka = 1 << (int(K).bit_length() - 1)
    rest = K - ka
    return ka, (triton.next_power_of_2(rest) if rest else 0)


def lane_efficiency(K: int) -> float:
    """Useful lanes / computed lanes of the dots (1.0 unless K - KA is not a power of two)."""
    ka, kb = lane_groups(K)
    return K / (ka + kb)


# ------------------------------------------------------------------------------------------------ dtype rules
def dot_dtype(dt: torch.dtype) -> torch.dtype:
    """Operand dtype of the similarity dots for operands stored in ``dt`` (embeddings and prepared centers share
    it). bf16 is upcast to fp32 under the interpreter, which multiplies raw bf16 bit patterns (triton issue
    11584): the products of bf16 values are exact in fp32, so the emulation computes what the tensor core does."""
    if dt == torch.bfloat16 and emulating():
        return torch.float32
    return dt


def dot_precision(dt: torch.dtype) -> str:
    """fp32 dots follow torch.get_float32_matmul_precision() as torch.mm does on CUDA: "highest" -> IEEE fp32,
    "high" / "medium" -> TF32. Other dtypes: "ieee" (ignored for 16-bit operands, exact for fp64)."""
    if dt == torch.float32 and not emulating() and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def dtype_class(dt: torch.dtype, precision: str) -> str:
    """Key of the tile tables: "mma16" (bf16/fp16), "tf32", "fp32" (IEEE, FMA units) or "fp64"."""
    if dt in (torch.float16, torch.bfloat16):
        return "mma16"
    if dt == torch.float32:
        return "tf32" if precision == "tf32" else "fp32"
    return "fp64"


# ------------------------------------------------------------------------------------------------------ tiles
@dataclass(frozen=True)
class TileConfig:
    block_n: int   # rows of embeddings per tile
    block_c: int   # whole classes per tile
    block_d: int   # embedding-dimension chunk of each tl.dot
    ka: int        # lanes per class, group A
    kb: int        # lanes per class, group B (0: none)
    num_warps: int = 4
    num_stages: int = 2

    @property
    def lanes(self) -> int:
        return self.block_c * (self.ka + self.kb)


@dataclass(frozen=True)
class TileRule:
    """Default tile of one (kernel, target, dtype class): rows, target lanes per tile, d chunk, warps, stages."""
    block_n: int
    lanes: int
    block_d: int
    num_warps: int
    num_stages: int


# Defaults chosen from the compiled-code sweep (bench/gpu_static.py --sweep; bench/results/gpu-static/sweep.csv): per
# (kernel, architecture, dtype class) the candidate without register spills for K in {1, 3, 10} (the loss and, for
# the kernels they share, the logits), within the shared memory limit, with matrix instructions where the dtype has
# them and >= 8 resident warps per SM, with the largest tile (then the most resident warps, then the most stages).
# _R(block_n, lanes, block_d, warps, stages).
# Keys: (kernel, arch family, dtype class). "forward" also serves the logits; "forward_cache" is the forward that
# also stores the gradient factor; "grad" the dL/ds chunk kernel; backward_x/backward_w the two-kernel backward.
_R = TileRule
TILE_RULES: dict[tuple[str, str, str], TileRule] = {
    ("backward_w", "sm80", "fp32"): _R(64, 64, 16, 8, 2),
    ("backward_w", "sm80", "fp64"): _R(64, 64, 16, 8, 2),
    ("backward_w", "sm80", "mma16"): _R(128, 64, 32, 8, 2),
    ("backward_w", "sm80", "tf32"): _R(128, 64, 32, 8, 2),
    ("backward_w", "sm90", "fp32"): _R(32, 64, 32, 8, 2),
    ("backward_w", "sm90", "fp64"): _R(64, 64, 16, 8, 2),
    ("backward_w", "sm90", "mma16"): _R(64, 128, 64, 8, 2),
    ("backward_w", "sm90", "tf32"): _R(64, 128, 64, 8, 2),
    ("backward_x", "sm80", "fp32"): _R(64, 64, 16, 8, 2),
    ("backward_x", "sm80", "fp64"): _R(64, 64, 16, 8, 2),
    ("backward_x", "sm80", "mma16"): _R(128, 64, 32, 8, 2),
    ("backward_x", "sm80", "tf32"): _R(128, 64, 32, 8, 2),
    ("backward_x", "sm90", "fp32"): _R(64, 64, 16, 8, 2),
    ("backward_x", "sm90", "fp64"): _R(64, 64, 16, 8, 2),
    ("backward_x", "sm90", "mma16"): _R(64, 128, 64, 8, 2),
    ("backward_x", "sm90", "tf32"): _R(64, 128, 64, 8, 2),
    ("forward", "sm80", "fp32"): _R(64, 64, 16, 8, 2),
    ("forward", "sm80", "fp64"): _R(64, 64, 16, 8, 2),
    ("forward", "sm80", "mma16"): _R(128, 128, 64, 8, 3),
    ("forward", "sm80", "tf32"): _R(128, 128, 32, 8, 3),
    ("forward", "sm90", "fp32"): _R(64, 64, 16, 8, 2),
    ("forward", "sm90", "fp64"): _R(64, 64, 16, 8, 2),
    ("forward", "sm90", "mma16"): _R(128, 128, 64, 8, 3),
    ("forward", "sm90", "tf32"): _R(128, 128, 32, 8, 3),
    ("forward_cache", "sm80", "fp32"): _R(64, 64, 16, 8, 2),
    ("forward_cache", "sm80", "fp64"): _R(64, 64, 16, 8, 2),
    ("forward_cache", "sm80", "mma16"): _R(128, 64, 64, 8, 3),
    ("forward_cache", "sm80", "tf32"): _R(128, 64, 32, 8, 3),
    ("forward_cache", "sm90", "fp32"): _R(64, 64, 16, 8, 2),
    ("forward_cache", "sm90", "fp64"): _R(64, 64, 16, 8, 2),
    ("forward_cache", "sm90", "mma16"): _R(64, 128, 64, 8, 3),
    ("forward_cache", "sm90", "tf32"): _R(64, 128, 64, 8, 3),
    ("grad", "sm80", "fp32"): _R(64, 64, 16, 8, 2),
    ("grad", "sm80", "fp64"): _R(64, 64, 16, 8, 2),
    ("grad", "sm80", "mma16"): _R(128, 128, 32, 8, 3),
    ("grad", "sm80", "tf32"): _R(128, 64, 64, 8, 3),
    ("grad", "sm90", "fp32"): _R(32, 64, 32, 8, 2),
    ("grad", "sm90", "fp64"): _R(64, 64, 16, 8, 2),
    ("grad", "sm90", "mma16"): _R(128, 128, 32, 8, 3),
    ("grad", "sm90", "tf32"): _R(128, 128, 32, 8, 3),
}
# gfx942 (MI300; compiled for the report, not checked in CI): the sweep's choice for the default tensor-core kernels
# (bench/results/gpu-static/sweep-gfx942.csv; forward_cache/tf32 had no spill-free candidate for every K: the one
# spilling least), the sm_90 choice elsewhere.
TILE_RULES.update({
    ("forward", "gfx9", "mma16"): _R(64, 256, 64, 8, 2),
    ("forward", "gfx9", "tf32"): _R(128, 64, 32, 8, 3),
    ("forward_cache", "gfx9", "mma16"): _R(64, 64, 32, 4, 3),
    ("forward_cache", "gfx9", "tf32"): _R(64, 64, 32, 4, 3),
    ("grad", "gfx9", "mma16"): _R(128, 64, 64, 8, 3),
    ("grad", "gfx9", "tf32"): _R(128, 64, 32, 8, 3),
})
for (_kind, _arch, _dc), _rule in list(TILE_RULES.items()):
    if _arch == "sm90":
        TILE_RULES.setdefault((_kind, "gfx9", _dc), _rule)
# The dL/ds chunk kernel in logits mode (the backward of softtriple_logits, e.g. in the sharded loss) loads dS
# [N, C] per tile besides: at the loss-mode tiles it spilled 64-140 bytes with triton 3.6 (the GPU machines'
# version, bench/results/gpu-static/triton-3.6.md), so half the lanes there.
for (_kind, _arch, _dc), _rule in list(TILE_RULES.items()):
    if _kind == "grad":
        TILE_RULES[("grad_logits", _arch, _dc)] = replace(_rule, lanes=64) if _dc in ("mma16", "tf32") else _rule
INTERPRETER_RULE = _R(64, 128, 64, 4, 1)  # large tiles: each interpreted Triton op is one numpy call


def arch_family(target: Target) -> str:
    if target.backend == "hip":
        return "gfx9"
    return "sm90" if (target.arch or 0) >= 90 else "sm80"


def classes_per_tile(K: int, C: int, lanes: int) -> int:
    """Largest power of two BLOCK_C with BLOCK_C * (KA + KB) <= 1.25 * lanes, within the tl.dot minimum of 16
    columns per group and no more than C needs; halved (down to that minimum) while the last tile's padded
    classes are more than 5% of C (C=100, K=10: 8 classes per tile, 104 computed, not 16 and 112)."""
    ka, kb = lane_groups(K)
    smallest = 1
    while smallest * min(ka, kb or ka) < 16:
        smallest *= 2
    bc = 1
    while 2 * bc * (ka + kb) <= 1.25 * lanes:
        bc *= 2
    bc = max(smallest, min(bc, triton.next_power_of_2(max(C, 1))))
    while bc // 2 >= smallest and triton.cdiv(C, bc) * bc - C > 0.05 * C:
        bc //= 2
    return bc


def tile_config(kind: str, N: int, d: int, C: int, K: int, dt: torch.dtype, target: Target,
                lanes: int | None = None) -> TileConfig:
    """The fixed default tile of a launch (no autotuning on the default path). ``lanes`` overrides the rule's."""
    if target.backend == "interpreter":
        rule = INTERPRETER_RULE
        rule = replace(rule, block_n=max(16, min(rule.block_n, triton.next_power_of_2(max(N, 1)))))
    else:
        rule = TILE_RULES[(kind, arch_family(target), dtype_class(dt, dot_precision(dt)))]
    ka, kb = lane_groups(K)
    return TileConfig(block_n=rule.block_n, block_c=classes_per_tile(K, C, lanes or rule.lanes),
                      block_d=max(16, min(rule.block_d, triton.next_power_of_2(max(d, 1)))), ka=ka, kb=kb,
                      num_warps=rule.num_warps, num_stages=rule.num_stages)


# Candidate tiles for the opt-in autotuner: (block_n, lanes, block_d, num_warps, num_stages).
CANDIDATE_TILES = ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (128, 64, 32, 4, 3),
                   (64, 256, 32, 8, 3), (128, 256, 64, 8, 2))
_autotune = {"enabled": os.environ.get("SOFTTRIPLE_TRITON_AUTOTUNE", "0") == "1"}
_tuned: dict = {}


def set_autotune(enabled: bool) -> bool:
    """Opt in to (or out of) autotuning the tiles of the CUDA kernels; returns the previous setting.

    Off by default: the fixed tiles of ``tile_config`` are used. When on, the first call for a given
    (kernel, N rounded up to a power of two, d, C, K, dtype) times every candidate of CANDIDATE_TILES with
    ``triton.testing.do_bench`` and keeps the fastest for the rest of the process. Also settable with the
    environment variable SOFTTRIPLE_TRITON_AUTOTUNE=1.
    """
    old = _autotune["enabled"]
    _autotune["enabled"] = bool(enabled)
    return old


def _bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=25)


def _autotune_applies(target: Target) -> bool:
    return _autotune["enabled"] and target.backend in ("cuda", "hip") and simulated() is None


def choose_tiles(kind: str, x: torch.Tensor, M: int, K: int, lanes: int | None, run) -> TileConfig:
    """The tile configuration for one launch: fixed by default, the fastest candidate when autotuning.

    ``run(cfg)`` performs the launch with fresh outputs (the kernels never accumulate into caller memory).
    """
    N, d = x.shape
    C = M // K
    target = target_of(x.device)
    default = tile_config(kind, N, d, C, K, x.dtype, target, lanes)
    if lanes is not None or run is None or not _autotune_applies(target):
        return default
    key = (kind, triton.next_power_of_2(max(N, 1)), d, C, K, x.dtype, dot_precision(x.dtype), str(x.device))
    if key not in _tuned:
        cands = {default}
        for bn, ln, bd, warps, stages in CANDIDATE_TILES:
            cands.add(replace(default, block_n=bn, block_c=classes_per_tile(K, C, ln),
                              block_d=max(16, min(bd, triton.next_power_of_2(d))), num_warps=warps,
                              num_stages=stages))
        _tuned[key] = min(sorted(cands, key=repr), key=lambda cfg: _bench(lambda: run(cfg)))
    return _tuned[key]


# ------------------------------------------------------------------------------------------------ launch plans
@dataclass(frozen=True)
class LaunchPlan:
    """Grid of one launch: row blocks x class tiles, and the split of the looped dimension."""
    n_row_blocks: int
    n_tiles: int
    n_splits: int
    per_split: int  # loop iterations (class tiles, or row blocks for the centers' backward) per split


PROGRAMS_PER_SM = 8


def split_count(programs: int, work_items: int, target: Target, splits: int | None) -> int:
    """How many independent splits of the loop dimension to launch so the GPU is full: about PROGRAMS_PER_SM
    programs per SM, so that the last, partial wave costs little: with W = programs / resident slots, the idle
    fraction of the last wave is (ceil(W) - W) / ceil(W), e.g. 320 programs on 132 SMs x 2 resident programs
    (W = 1.21) leave 40% of the second wave idle. Each split writes its own partial result, reduced afterwards in
    a fixed order (deterministic)."""
    if splits is not None:
        return max(1, min(int(splits), work_items))
    if target.backend == "interpreter":
        return 1
    want = math.ceil(PROGRAMS_PER_SM * target.sms / max(programs, 1))
    return max(1, min(want, work_items))


def plan_launch(N: int, C: int, cfg: TileConfig, target: Target, splits: int | None,
                loop_over_rows: bool) -> LaunchPlan:
    n_row_blocks = triton.cdiv(N, cfg.block_n)
    n_tiles = triton.cdiv(C, cfg.block_c)
    programs, loop = (n_tiles, n_row_blocks) if loop_over_rows else (n_row_blocks, n_tiles)
    n_splits = split_count(programs, max(loop, 1), target, splits)
    per_split = max(1, triton.cdiv(loop, n_splits))
    n_splits = max(1, triton.cdiv(loop, per_split))  # every split gets at least one iteration
    return LaunchPlan(n_row_blocks, n_tiles, n_splits, per_split)


def kernel_meta(cfg: TileConfig, dt: torch.dtype, K: int, grad: bool = False) -> dict:
    """The constexpr and launch keyword arguments shared by the kernels that build similarity tiles.

    dt: dtype of the embeddings and prepared centers. GRAD_DTYPE: operand dtype of in-kernel gradient dots (the
    same as the similarity dots: fp16 gradients are pre-scaled into fp16's range, see ops layer)."""
    dot = dot_dtype(dt)
    meta = dict(K=K, KA=cfg.ka, KB=cfg.kb, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d,
                DOT_DTYPE=tl_dtype(dot), ACC_DTYPE=tl_dtype(acc_dtype(dt)), PRECISION=dot_precision(dot),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if grad:
        meta["GRAD_DTYPE"] = tl_dtype(dot)
        meta["EMULATE_BF16"] = emulate_bf16(dt)
    return meta


def emulate_bf16(dt: torch.dtype) -> bool:
    """Under the interpreter, bf16 roundings are done by tiles.to_operand (the interpreter truncates)."""
    return dt == torch.bfloat16 and emulating()


def upstream_args(labels, g, lse, dS, N: int, C: int, acc: torch.dtype, device: torch.device):
    """Kernel arguments (y, g, lse, ds, stride_dsn, stride_dsc, LOGITS) of the two backward modes."""
    dummy = torch.empty((1,), dtype=acc, device=device)
    if dS is None:
        return labels, g, lse, dummy, 0, 0, False
    if dS.shape != (N, C):
        raise ValueError(f"dS must have shape ({N}, {C}), got {tuple(dS.shape)}")
    return torch.empty((1,), dtype=torch.int64, device=device), dummy, dummy, dS, dS.stride(0), dS.stride(1), True


# ------------------------------------------------------------------------------------------------------ checks
def check_operands(x: torch.Tensor, wt: torch.Tensor, K: int) -> None:
    """Shape/dtype/device checks shared by all launchers (the user-facing API validates earlier).

    x [N, d] embeddings, wt [M = C*K, d] column-normalised centers stored row-wise, both in the product dtype."""
    if x.dim() != 2 or wt.dim() != 2:
        raise ValueError(f"expected x [N, d] and wt [C*K, d]; got x {tuple(x.shape)} and wt {tuple(wt.shape)}")
    if x.shape[1] != wt.shape[1]:
        raise ValueError(f"x has width {x.shape[1]} but wt has width {wt.shape[1]}")
    if K < 1 or K > MAX_CENTERS_PER_CLASS or wt.shape[0] % K:
        raise ValueError(f"K={K} must be in [1, {MAX_CENTERS_PER_CLASS}] and divide wt.shape[0]={wt.shape[0]}")
    for name, t in (("x", x), ("wt", wt)):
        if t.dtype not in _TL_DTYPES:
            raise TypeError(f"{name} must be fp16, bf16, fp32 or fp64; got {t.dtype}")
    if x.dtype != wt.dtype:
        raise TypeError(f"x and wt must share the product dtype, got {x.dtype} and {wt.dtype}")
    if x.device != wt.device:
        raise ValueError(f"x and wt on different devices: {x.device}, {wt.device}")
    if x.device.type == "cpu" and not emulating():
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set before importing triton); "
                           "use backend='torch' for the fast CPU path")


def hyper_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scalar hyper-parameters as a small tensor so fp64 kernels see them unrounded (a Python float kernel
    argument is passed as fp32). Cached: creating a CUDA tensor from host values is a blocking copy, so only the
    first call with given values pays it, not every training step. The cached tensors are never written."""
    values = tuple(float(v) for v in values)
    if capturing():  # fake tensors: only the dtype matters, and nothing enters the cache
        return torch.empty((len(values),), dtype=dtype, device=device)
    return _hyper_tensor(values, dtype, torch.device(device))


@functools.lru_cache(maxsize=64)
def _hyper_tensor(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)
