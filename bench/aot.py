"""Ahead-of-time compilation of the launches the public API makes, for GPUs that are not on this machine.

1. capture(): runs ``softtriple_loss`` / ``softtriple_logits`` forward and backward on fake CUDA tensors
   (FakeTensorMode) with ``kernels.target.simulate(target)``: the launchers plan for the simulated GPU (tiles,
   splits, SM count) and record each launch instead of running it. Nothing is computed.
2. compile_launch(): applies Triton's own argument specialisation to the recorded arguments (its binder: integers
   equal to 1 become constants, multiples of 16 get a divisibility hint, pointers are 16-byte aligned as PyTorch
   allocations are) and compiles with ``triton.compile`` for the target (sm_90, sm_80 or gfx942).
3. analyze(): registers and spill bytes from the wheel's ptxas (-v, same flags as Triton's own call), shared
   memory from the kernel metadata, the matrix instructions (wgmma / mma.sync / v_mfma) and FMAs counted in the
   PTX / AMDGCN, occupancy (CTAs per SM) from registers, shared memory and warps.

Results are cached by a key of the kernel's source hash (Triton's cache_key covers the called @jit helpers),
the specialised signature, constants, options, target and Triton version, in a JSON file: an unchanged kernel is
never compiled twice, in CI either.

Must run without TRITON_INTERPRET (the @triton.jit functions must be real JITFunctions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

import softtriple_triton as st
from softtriple_triton import fused
from softtriple_triton.kernels import target as tgt

# name -> (embeddings dtype, centers dtype, simulated autocast dtype, float32 matmul precision)
CONFIGS = {
    "bf16/fp32": (torch.bfloat16, torch.float32, None, "highest"),
    "fp16/fp32": (torch.float16, torch.float32, None, "highest"),
    "bf16/bf16": (torch.bfloat16, torch.bfloat16, None, "highest"),
    "fp32@high": (torch.float32, torch.float32, None, "high"),
    "autocast-bf16": (torch.float32, torch.float32, torch.bfloat16, "highest"),
    "fp32@highest": (torch.float32, torch.float32, None, "highest"),
    "fp64": (torch.float64, torch.float64, None, "highest"),
}
MAIN_CONFIGS = ("bf16/fp32", "fp16/fp32", "bf16/bf16", "fp32@high")   # the CI check
TENSOR_CORE_CONFIGS = ("bf16/fp32", "fp16/fp32", "bf16/bf16", "fp32@high", "autocast-bf16")
TARGETS = {"sm90": tgt.H200, "sm80": tgt.A100, "gfx942": tgt.MI300X}
# backward paths: name -> fused.set_triton_options arguments (the defaults take "cached" when the cache fits)
PATHS = {"cached": dict(backward="auto", cache_bytes=1 << 62), "chunked": dict(backward="auto", cache_bytes=0),
         "two_kernel": dict(backward="two_kernel")}
DEFAULT_PATHS = ("cached", "chunked")
DOT_KERNELS = ("softtriple_fwd_kernel", "softtriple_grad_chunk_kernel", "softtriple_bwd_x_kernel",
               "softtriple_bwd_w_kernel")


@dataclass
class Launch:
    kernel: object       # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


# ----------------------------------------------------------------------------------------------------- capture
@contextlib.contextmanager
def _policy(autocast_dtype, precision):
    """The matmul precision, and a simulated autocast (a CPU-only torch build cannot enter CUDA autocast, and meta
    tensors have none): product_dtype answers as under torch.autocast(dtype=autocast_dtype)."""
    from softtriple_triton import functional

    old_prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    real = functional.product_dtype
    if autocast_dtype is not None:
        def under_autocast(emb_dtype, fc_dtype, device_type):
            if torch.float64 in (emb_dtype, fc_dtype):
                return torch.float64
            return autocast_dtype
        functional.product_dtype = under_autocast
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old_prec)
        functional.product_dtype = real


@contextlib.contextmanager
def _on_meta(functional):
    real = functional.resolve_backend
    functional.resolve_backend = lambda backend, device, K: "triton"
    try:
        yield
    finally:
        functional.resolve_backend = real


def capture(config: str, N: int, d: int, C: int, K: int, target: tgt.Target, mode: str = "loss",
            backward: str = "auto", tau: float = 0.0, cache_bytes=fused._UNSET) -> list[Launch]:
    """The kernel launches of one forward + backward of the public API, mode "loss" (reduction mean) or "logits".

    Tensors live on the meta device (shapes and dtypes only; autograd runs on them as usual); the API is told the
    backend is "triton" and the launchers plan for ``target``. backward / cache_bytes: fused.set_triton_options
    (the default "auto" takes the cached path when the forward's cache fits)."""
    from softtriple_triton import functional

    emb_dt, fc_dt, autocast_dt, precision = CONFIGS[config]
    old = fused.set_triton_options(backward=backward, cache_bytes=cache_bytes)
    try:
        with _policy(autocast_dt, precision), _on_meta(functional), tgt.simulate(target) as records:
            emb = torch.empty((N, d), device="meta", dtype=emb_dt, requires_grad=True)
            fc = torch.empty((d, C * K), device="meta", dtype=fc_dt, requires_grad=True)
            if mode == "loss":
                y = torch.zeros((N,), device="meta", dtype=torch.int64)
                st.softtriple_loss(emb, fc, y, K, tau=tau, backend="triton").backward()
            else:
                st.softtriple_logits(emb, fc, K, backend="triton").sum().backward()
            recorded = list(records)
    finally:
        fused.set_triton_options(**old)
    return [Launch(k, g, a, kw) for k, g, a, kw in recorded]


# ----------------------------------------------------------------------------------------------------- compile
class _Ptr:
    """A recorded tensor argument as Triton's binder sees a real allocation: its dtype and a 16-aligned address."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self):
        return 0


def _gpu_target(target: tgt.Target):
    from triton.backends.compiler import GPUTarget
    return GPUTarget(target.backend, target.arch, target.warp_size)


def specialise(launch: Launch, target: tgt.Target):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run would compile this launch."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(_gpu_target(target))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [_Ptr(a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


def cache_key(launch: Launch, target: tgt.Target) -> str:
    import triton

    signature, constexprs, attrs, options = specialise(launch, target)
    blob = json.dumps([launch.kernel.cache_key, sorted(signature.items()), sorted(map(repr, constexprs.items())),
                       sorted(map(repr, attrs.items())), repr(sorted(options.__dict__.items())), repr(target),
                       triton.__version__], default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def compile_launch(launch: Launch, target: tgt.Target):
    import triton
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialise(launch, target)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(src, target=_gpu_target(target), options=options.__dict__)


# ----------------------------------------------------------------------------------------------------- analyze
# per-SM limits: register file, max warps, max CTAs, shared memory per SM and per block (bytes)
_SM = {90: (65536, 64, 32, 233472, 232448), 80: (65536, 64, 32, 167936, 166912)}


def _ptxas_report(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia import compiler as nv

    try:
        ptxas = nv.get_ptxas(arch).path
    except TypeError:  # older Triton: get_ptxas() without the architecture
        ptxas = nv.get_ptxas().path
    name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={name}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode != 0 and "regAllocOptLevel" in log:  # an older ptxas without that flag
        return _ptxas_report_plain(ptxas, name, ptx)
    return _parse_ptxas(log)


def _ptxas_report_plain(ptxas, name, ptx):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={name}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    return _parse_ptxas(out.stdout + out.stderr)


def _parse_ptxas(log: str) -> dict:
    def grab(pattern, default=0):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else default
    return dict(regs=grab(r"Used (\d+) registers", -1), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"))


def _count(pattern: str, text: str) -> dict:
    found: dict = {}
    for m in re.finditer(pattern, text):
        found[m.group(0)] = found.get(m.group(0), 0) + 1
    return found


def analyze(ck, launch: Launch, target: tgt.Target) -> dict:
    meta = ck.metadata
    warps = meta.num_warps
    smem = int(meta.shared)
    row = dict(kernel=launch.kernel.fn.__name__, num_warps=warps, num_stages=meta.num_stages, shared=smem)
    if target.backend == "cuda":
        ptx = ck.asm["ptx"]
        row.update(_ptxas_report(ptx, target.arch))
        mma = _count(r"wgmma\.mma_async\.sync\.aligned\.[\w.]+|mma\.sync\.aligned\.[\w.]+", ptx)
        row["mma"] = "; ".join(f"{k} x{v}" for k, v in sorted(mma.items())) or "none"
        row["mma_count"] = sum(mma.values())
        row["fma"] = len(re.findall(r"\bfma\.rn\.f(?:32|64)\b", ptx))
        regfile, max_warps, max_ctas, smem_sm, smem_block = _SM[90 if target.arch >= 90 else 80]
        regs = max(row["regs"], 1)
        per_warp = math.ceil(regs * 32 / 256) * 256
        ctas = min(max_ctas, max_warps // warps, (regfile // per_warp) // warps,
                   smem_sm // (smem + 1024) if smem else max_ctas)
        row["smem_limit"] = smem_block
    else:
        asm = ck.asm["amdgcn"]

        def grab(key):
            m = re.search(rf"\.{key}:\s+(\d+)", asm)
            return int(m.group(1)) if m else 0
        vgpr, agpr = grab("vgpr_count"), grab("agpr_count")
        row.update(regs=vgpr + agpr, spill_stores=grab("vgpr_spill_count") + grab("sgpr_spill_count"),
                   spill_loads=0, stack=grab("private_segment_fixed_size"))
        mfma = _count(r"v_mfma_\w+", asm)
        row["mma"] = "; ".join(f"{k} x{v}" for k, v in sorted(mfma.items())) or "none"
        row["mma_count"] = sum(mfma.values())
        row["fma"] = len(re.findall(r"\bv_(?:pk_)?fma_f(?:32|64)\b|\bv_fmac_f32\b", asm))
        lds = grab("group_segment_fixed_size") or smem
        row["shared"] = lds
        waves_simd = min(8, 512 // max(8, math.ceil(max(vgpr + agpr, 1) / 8) * 8))
        ctas = min((4 * waves_simd) // warps, 65536 // lds if lds else 32)
        row["smem_limit"] = 65536
    row["ctas_per_sm"] = int(ctas)
    return row


def grid_facts(row: dict, launch: Launch, target: tgt.Target) -> dict:
    """Programs of this launch and how many waves they make on the target (not cached: the grid is per launch)."""
    programs = math.prod(launch.grid)
    return dict(programs=programs, waves=round(programs / max(1, target.sms * max(1, row["ctas_per_sm"])), 2))


def tile_of(launch: Launch) -> str:
    kw = launch.kwargs
    if "BLOCK_C" not in kw:  # the element-wise kernels
        return "x".join(str(kw[k]) for k in ("BLOCK_N", "BLOCK_D", "BLOCK_M") if k in kw)
    lanes = kw["BLOCK_C"] * (kw["KA"] + kw["KB"])
    return (f"{kw['BLOCK_N']}x{lanes} (BC={kw['BLOCK_C']} KA={kw['KA']} KB={kw['KB']}) d{kw['BLOCK_D']} "
            f"w{kw['num_warps']} s{kw['num_stages']}")


class Cache:
    """JSON file of analyses, keyed by cache_key()."""

    def __init__(self, path: str | None):
        self.path = path
        self.data: dict = {}
        if path and os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)
        self.hits = self.misses = 0

    def get(self, launch: Launch, target: tgt.Target) -> dict:
        key = cache_key(launch, target)
        if key in self.data:
            self.hits += 1
        else:
            self.misses += 1
            self.data[key] = analyze(compile_launch(launch, target), launch, target)
        return dict(self.data[key], **grid_facts(self.data[key], launch, target))

    def save(self):
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "w") as f:
                json.dump(dict(sorted(self.data.items())), f, indent=0, sort_keys=True)


def violations(row: dict) -> list[str]:
    """What the CI check rejects in a default launch of a tensor-core configuration."""
    bad = []
    if row["spill_stores"] or row["spill_loads"]:
        bad.append(f"spills {row['spill_stores']}/{row['spill_loads']} bytes")
    if row["shared"] > row["smem_limit"]:
        bad.append(f"shared memory {row['shared']} > {row['smem_limit']}")
    has_dot = row["kernel"] in DOT_KERNELS
    if has_dot and row["config"] in TENSOR_CORE_CONFIGS and row["mma_count"] == 0:
        bad.append("no tensor-core MMA")
    if row["regs"] < 0:
        bad.append("ptxas report missing")
    return bad


def tile_rule(block_n: int, lanes: int, block_d: int, num_warps: int, num_stages: int):
    from softtriple_triton.kernels.config import TileRule
    return TileRule(block_n, lanes, block_d, num_warps, num_stages)
