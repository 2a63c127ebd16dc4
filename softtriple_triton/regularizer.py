"""The center regulariser in O(C*K^2*d) by per-class blocks (never the (C*K) x (C*K) Gram matrix).

reg = sum_c sum_{k<k'} sqrt(2 + 1e-5 - 2 <w_ck, w_ck'>) / (C*K*(K-1)), centers column-normalised.
Computed in fp32 (fp64 for fp64 centers) whatever the parameter dtype: in fp16, 2 + 1e-5 rounds to 2
and the square root of a rounding error would give NaN gradients. Classes are processed in chunks so
the temporaries stay below ``chunk_bytes`` (the per-class Gram blocks are C x K x K).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import REG_EPS

_CHUNK_BYTES = 64 << 20


def center_regularizer(fc: Tensor, centers_per_class: int) -> Tensor:
    """sum_c sum_{k<k'} sqrt(2 + 1e-5 - 2 <w_ck, w_ck'>) / (C*K*(K-1)) over the classes of ``fc`` [d, C*K].

    Differentiable; returns 0 when K == 1. The result is fp32 (fp64 for fp64 centers).
    """
    K = int(centers_per_class)
    d, M = fc.shape
    C = M // K
    acc = torch.float64 if fc.dtype == torch.float64 else torch.float32
    if K <= 1 or C == 0:
        return fc.new_zeros((), dtype=acc)
    iu0, iu1 = torch.triu_indices(K, K, offset=1, device=fc.device)
    # classes per chunk: the chunk's normalised copy (d*K) and its Gram blocks (K*K) per class
    step = max(1, _CHUNK_BYTES // (max(1, (d + K) * K) * 8))
    total = fc.new_zeros((), dtype=acc)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        w = fc[:, c0 * K:c1 * K].to(acc)
        w = w / torch.linalg.vector_norm(w, dim=0, keepdim=True).clamp_min(1e-12)
        blocks = w.t().reshape(c1 - c0, K, d)
        gram = torch.bmm(blocks, blocks.transpose(1, 2))
        total = total + torch.sqrt(2.0 + REG_EPS - 2.0 * gram[:, iu0, iu1]).sum()
    return total / (C * K * (K - 1.0))
