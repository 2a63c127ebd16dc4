"""Argument checks of the user API: each error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import cpu_native
from ._common import TRITON_MAX_CENTERS_PER_CLASS, check_interpreter_mode, interpreting

BACKENDS = ("auto", "triton", "torch", "reference")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


_HYPER_OK: set = set()  # argument tuples (of plain Python scalars and strings) that passed check_hyper


def check_hyper(centers_per_class, la, gamma, tau, margin, reduction, backend, normalize_embeddings=True) -> None:
    args = (centers_per_class, la, gamma, tau, margin, reduction, backend, normalize_embeddings)
    key = tuple((type(a), a) for a in args)
    plain = all(type(a) in (int, float, str, bool) for a in args)
    if plain and key in _HYPER_OK:  # a training loop passes the same values every step
        return
    _check_hyper(*args)
    if plain and len(_HYPER_OK) < 1024:
        _HYPER_OK.add(key)


def _check_hyper(centers_per_class, la, gamma, tau, margin, reduction, backend, normalize_embeddings) -> None:
    check_positive_int("centers_per_class", centers_per_class)
    if not _is_real(la) or not math.isfinite(la) or la <= 0:
        raise ValueError(f"la must be a finite number > 0 (the paper uses 20), got {la!r}")
    if not _is_real(gamma) or not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a finite number > 0 (the inner-softmax temperature; the paper uses 0.1), "
                         f"got {gamma!r}")
    if not _is_real(tau) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0 (regulariser weight; 0 disables it), got {tau!r}")
    if not _is_real(margin) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0 (the paper uses 0.01), got {margin!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(normalize_embeddings, bool):
        raise ValueError(f"normalize_embeddings must be a bool, got {normalize_embeddings!r}")


def _check_dense(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with "
                        f".to_dense() first")


def check_centers(fc, centers_per_class) -> int:
    """fc [embedding_size, num_classes * K] floating, dense; returns K as an int."""
    K = check_positive_int("centers_per_class", centers_per_class)
    _check_dense("fc", fc)
    if fc.dim() != 2:
        raise ValueError(f"fc must be 2-D [embedding_size, num_classes * centers_per_class], got shape "
                         f"{tuple(fc.shape)}")
    if fc.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fc must be fp16, bf16, fp32 or fp64, got {fc.dtype}")
    if fc.shape[1] == 0 or fc.shape[1] % K:
        raise ValueError(f"fc has {fc.shape[1]} columns, which is not a positive multiple of "
                         f"centers_per_class={K}")
    return K


def check_embeddings_and_centers(embeddings, fc, centers_per_class: int, what: str = "loss") -> None:
    """``what``: "loss" (an empty batch is an error: its mean is undefined) or "logits" (empty is fine)."""
    _check_dense("embeddings", embeddings)
    _check_dense("fc", fc)
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D [batch, embedding_size], got shape {tuple(embeddings.shape)}")
    check_centers(fc, centers_per_class)
    if embeddings.dtype not in FLOAT_DTYPES:
        raise TypeError(f"embeddings must be fp16, bf16, fp32 or fp64, got {embeddings.dtype}")
    if embeddings.shape[0] == 0 and what == "loss":
        raise ValueError("embeddings has 0 rows: the loss of an empty batch is undefined")
    if embeddings.shape[1] == 0:
        raise ValueError("embeddings has 0 columns: the embedding size must be at least 1 (embeddings is "
                         "[batch, embedding_size])")
    if embeddings.shape[1] != fc.shape[0]:
        raise ValueError(f"embeddings width {embeddings.shape[1]} does not match fc height {fc.shape[0]} "
                         f"(fc is [embedding_size, num_classes * centers_per_class])")
    if fc.device != embeddings.device:
        raise ValueError(f"embeddings is on {embeddings.device} but fc is on {fc.device}")


def _plain(t: Tensor) -> Tensor:
    """The values under torch.func wrappers (vmap's batched / grad's tracking tensors), for checks on values."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def check_labels(labels, n: int, num_classes: int, device: torch.device) -> Tensor:
    """Returns labels as contiguous int64. The range check costs no host sync on CUDA (device-side assert)."""
    _check_dense("labels", labels)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor (class indices), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match embeddings, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but embeddings is on {device}")
    if labels.dtype != torch.int64 or not labels.is_contiguous():
        labels = labels.to(torch.int64).contiguous()
    if labels.device.type == "meta":  # no values to check
        return labels
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        plain = _plain(labels)  # under torch.func.vmap: all the batch's labels
        lib = cpu_native.loaded()  # one C loop instead of four small operations (when the kernels are loaded)
        if lib is not None and plain.dtype == torch.int64 and plain.is_contiguous() and not plain.is_sparse:
            i = cpu_native.labels_bad(lib, plain, num_classes)
            bad = None if i < 0 else plain.view(-1)[i].item()
        else:
            in_range = (plain >= 0) & (plain < num_classes)
            bad = None if bool(in_range.all()) else plain[~in_range][0].item()
        if bad is not None:
            raise ValueError(f"labels must be in [0, {num_classes}) (num_classes = fc.shape[1] // "
                             f"centers_per_class); found {bad}")
    else:
        in_range = (labels >= 0) & (labels < num_classes)
        # device-side check: raises at the next synchronisation, no host sync here
        torch._assert_async(in_range.all(), f"softtriple_triton: labels must be in [0, {num_classes})")
    return labels


def resolve_backend(backend: str, device: torch.device, centers_per_class: int) -> str:
    from .ops import TRITON_AVAILABLE

    if backend == "auto":
        ok = device.type == "cuda" and TRITON_AVAILABLE and centers_per_class <= TRITON_MAX_CENTERS_PER_CLASS
        return "triton" if ok else "torch"
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend='triton' needs the 'triton' package; install it or use backend='torch'")
        if device.type == "meta":  # shapes only: the ops' fake implementations answer
            pass
        elif device.type == "cpu":
            check_interpreter_mode()
            if not interpreting():
                raise RuntimeError("backend='triton' got CPU tensors: the Triton kernels run on CUDA tensors, or on "
                                   "CPU only through Triton's (slow, testing-only) interpreter with "
                                   "TRITON_INTERPRET=1 set before triton is imported. Use backend='torch' on CPU.")
        elif device.type == "cuda":
            check_interpreter_mode()
        else:
            raise RuntimeError(f"backend='triton' runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got "
                               f"{device.type}; use backend='torch'")
        if centers_per_class > TRITON_MAX_CENTERS_PER_CLASS:
            raise ValueError(f"backend='triton' supports centers_per_class <= {TRITON_MAX_CENTERS_PER_CLASS}, "
                             f"got {centers_per_class}; use backend='torch'")
    return backend
