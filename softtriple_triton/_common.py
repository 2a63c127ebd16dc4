"""Rules shared by every layer (and importable without triton)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

# Largest K the Triton kernels take (lanes per class are K rounded up to a power of two, one tile at least).
TRITON_MAX_CENTERS_PER_CLASS = 1024


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation / softmax dtype: fp64 when any operand is fp64, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def no_autocast(device: torch.device):
    """Autocast disabled for ``device`` (a no-op where the device type has no autocast, e.g. meta, or where it is
    not enabled now)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- norms without overflow

def pow2_scale(t: Tensor, dim: int) -> Tensor:
    """Per-slice power of two s >= 1 with max |t / s| < 2 (detached; 1 for slices with max < 2 or non-finite).

    Dividing by a power of two is exact, so t / s has the same rounding as t, and its sum of squares cannot
    overflow for any finite t (fp32 entries up to 3.4e38). s is a power of two built without exp2 rounding:
    m = mant * 2^e exactly (frexp), so (m / 2) / mant = 2^(e-1) exactly.
    """
    m = t.detach().abs().amax(dim=dim, keepdim=True)
    mant, _ = torch.frexp(m)
    return torch.where(torch.isfinite(m) & (m >= 2), (m * 0.5) / mant, torch.ones_like(m))


def unit_rows(x: Tensor) -> Tensor:
    """F.normalize(x, dim=1) (x / max(||x||, 1e-12)) for any finite x: rows are scaled by an exact power of two
    first, so entries up to the dtype's maximum neither overflow the sum of squares nor change the rounding
    (equal to F.normalize wherever F.normalize does not overflow). Non-finite entries propagate as in F.normalize."""
    return torch.nn.functional.normalize(x / pow2_scale(x, 1), p=2, dim=1)


def inverse_column_norms(w: Tensor) -> Tensor:
    """1 / max(||w_j||, 1e-12) per column (F.normalize's semantics) for any finite w, differentiable.

    With s the column's power-of-two scale, ||w_j|| = s ||w_j / s|| and ||w_j / s|| >= 1/2 when s > 1, so
    1 / (s ||w_j / s||) is computed as reciprocal(clamp(n)) / s: no overflow of the squares, and the backward
    (g / s, then through n = O(1)) never squares a tiny reciprocal (rw^2 underflows in fp32 for ||w|| > 1e19).
    """
    s = pow2_scale(w, 0)
    n = torch.linalg.vector_norm(w / s, dim=0, keepdim=True)
    return (n.clamp_min(1e-12).reciprocal() / s).squeeze(0)


# --------------------------------------------------------------------------- Triton's interpreter

def parse_interpret(value: str | None) -> bool:
    """A TRITON_INTERPRET value read as Triton reads it (knobs.runtime.interpret = env_bool -> getenv_bool): on for
    1/true/on/yes/y in any case, off for anything else or unset ("false", "off", "no", "0", "", "2", " 1")."""
    return value is not None and value.lower() in ("1", "true", "on", "yes", "y")


def interpret_env() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter now. With triton imported its own knob is asked (that
    also sees ``triton.knobs.runtime.interpret = True`` set from Python)."""
    knobs = None if torch.compiler.is_compiling() else sys.modules.get("triton.knobs")  # dynamo cannot trace it
    if knobs is not None:
        try:
            return bool(knobs.runtime.interpret)
        except AttributeError:  # a triton without this knob: fall back to the variable
            pass
    return parse_interpret(os.environ.get("TRITON_INTERPRET"))


def _imported_interpreted() -> bool | None:
    """Whether the imported triton built its own @jit functions for the interpreter (it decides once, at
    import); None if triton (its language module) is not imported yet."""
    std = sys.modules.get("triton.language.standard")
    fn = getattr(std, "cdiv", None)
    if fn is None:
        return None
    interp = sys.modules.get("triton.runtime.interpreter")
    return interp is not None and isinstance(fn, interp.InterpretedFunction)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter: the mode triton was imported with, or, before
    triton is imported, the mode TRITON_INTERPRET will give it (see check_interpreter_mode for a late change)."""
    imported = _imported_interpreted()
    return interpret_env() if imported is None else imported


def check_interpreter_mode() -> None:
    """Raise if TRITON_INTERPRET was changed after triton was imported (Triton reads it once, when imported:
    kernels built after the change and triton's own functions would then disagree, which fails deep inside)."""
    imported = None if torch.compiler.is_compiling() else _imported_interpreted()  # checked by the eager call
    if imported is None:
        return
    now = interpret_env()
    ours = sys.modules.get("softtriple_triton.kernels.forward")
    kernel = getattr(ours, "softtriple_fwd_kernel", None)
    if kernel is not None:
        interp = sys.modules.get("triton.runtime.interpreter")
        kernels_interpreted = interp is not None and isinstance(kernel, interp.InterpretedFunction)
        if kernels_interpreted != imported:
            now = kernels_interpreted  # the package's kernels were built after a change: report that
    if now == imported:
        return
    value = os.environ.get("TRITON_INTERPRET")
    if now:
        raise RuntimeError(
            f"TRITON_INTERPRET={value!r} was set after triton was imported without it: Triton reads the variable "
            "only when it is imported, so its kernels cannot run through the interpreter in this process. Set "
            "TRITON_INTERPRET=1 before anything imports triton (in the shell: TRITON_INTERPRET=1 python ..., or "
            "os.environ['TRITON_INTERPRET'] = '1' at the very top of the script), or use backend='torch' on CPU.")
    raise RuntimeError(
        f"TRITON_INTERPRET is now {value!r} (off) but triton was imported with the interpreter on: Triton reads the "
        "variable only when it is imported. Keep TRITON_INTERPRET=1 for the whole process (or start a new process "
        "without it to run the compiled kernels on CUDA), or use backend='torch' on CPU.")


_interpreter_lock = threading.RLock()


def interpreter_serialised():
    """Held around a kernel launch under the interpreter: it patches triton.language module-wide while a kernel
    runs, so two threads interpreting at once break each other. A no-op for compiled kernels."""
    return _interpreter_lock if interpreting() else contextlib.nullcontext()


@dataclass(frozen=True)
class LossParams:
    """The hyper-parameters of one SoftTriple loss, validated once by the API and passed down as one record.

    K: centers per class; la: scale of the class logits (lambda); gamma: temperature of the inner softmax over a
    class's centers; margin: subtracted from the true class's similarity (delta)."""

    K: int
    la: float = 20.0
    gamma: float = 0.1
    margin: float = 0.01

    def astuple(self) -> tuple[int, float, float, float]:
        """(K, la, gamma, margin): the scalar arguments of the torch.library ops."""
        return (self.K, self.la, self.gamma, self.margin)
