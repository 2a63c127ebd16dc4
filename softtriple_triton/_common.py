"""Rules shared by every layer (and importable without triton)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Largest K the Triton kernels take (lanes per class are K rounded up to a power of two, one tile at least).
TRITON_MAX_CENTERS_PER_CLASS = 1024


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation / softmax dtype: fp64 when any operand is fp64, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
