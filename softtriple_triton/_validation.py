"""Argument checks of the user API: each error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._common import TRITON_MAX_CENTERS_PER_CLASS, interpreting

BACKENDS = ("auto", "triton", "torch", "reference")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_hyper(centers_per_class, la, gamma, tau, margin, reduction, backend, normalize_embeddings=True) -> None:
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


def check_embeddings_and_centers(embeddings, fc, centers_per_class: int) -> None:
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if not isinstance(fc, Tensor):
        raise TypeError(f"fc must be a torch.Tensor, got {type(fc).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D [batch, embedding_size], got shape {tuple(embeddings.shape)}")
    if fc.dim() != 2:
        raise ValueError(f"fc must be 2-D [embedding_size, num_classes * centers_per_class], got shape "
                         f"{tuple(fc.shape)}")
    if embeddings.dtype not in FLOAT_DTYPES:
        raise TypeError(f"embeddings must be fp16, bf16, fp32 or fp64, got {embeddings.dtype}")
    if fc.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fc must be fp16, bf16, fp32 or fp64, got {fc.dtype}")
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings has 0 rows: the loss of an empty batch is undefined")
    if embeddings.shape[1] != fc.shape[0]:
        raise ValueError(f"embeddings width {embeddings.shape[1]} does not match fc height {fc.shape[0]} "
                         f"(fc is [embedding_size, num_classes * centers_per_class])")
    if fc.shape[1] == 0 or fc.shape[1] % centers_per_class:
        raise ValueError(f"fc has {fc.shape[1]} columns, which is not a positive multiple of "
                         f"centers_per_class={centers_per_class}")
    if fc.device != embeddings.device:
        raise ValueError(f"embeddings is on {embeddings.device} but fc is on {fc.device}")


def check_labels(labels, n: int, num_classes: int, device: torch.device) -> Tensor:
    """Returns labels as contiguous int64. The range check costs no host sync on CUDA (device-side assert)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor (class indices), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match embeddings, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but embeddings is on {device}")
    labels = labels.to(torch.int64).contiguous()
    in_range = (labels >= 0) & (labels < num_classes)
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(in_range.all()):
            bad = labels[~in_range][0].item()
            raise ValueError(f"labels must be in [0, {num_classes}) (num_classes = fc.shape[1] // "
                             f"centers_per_class); found {bad}")
    else:
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
        if device.type == "cpu":
            if not interpreting():
                raise RuntimeError("backend='triton' got CPU tensors: the Triton kernels run on CUDA tensors, or on "
                                   "CPU only through Triton's (slow, testing-only) interpreter with "
                                   "TRITON_INTERPRET=1 set before triton is imported. Use backend='torch' on CPU.")
        elif device.type != "cuda":
            raise RuntimeError(f"backend='triton' runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got "
                               f"{device.type}; use backend='torch'")
        if centers_per_class > TRITON_MAX_CENTERS_PER_CLASS:
            raise ValueError(f"backend='triton' supports centers_per_class <= {TRITON_MAX_CENTERS_PER_CLASS}, "
                             f"got {centers_per_class}; use backend='torch'")
    return backend
