"""Adaptive centers (the paper's regulariser pulls a class's centers together): count and merge near-duplicates.

Two centers of a class are *one* center when their column-normalised vectors are closer than ``threshold`` in
Euclidean distance (``||w/|w| - w'/|w'| ||``, = sqrt(2 - 2 cos) for unit vectors), and merging is transitive:
the distinct centers of a class are the connected components of the graph "distance < threshold" among its K
centers. Distances are computed in fp64 from the differences of the normalised vectors (not from 2 - 2 cos,
which cancels catastrophically for close centers), so a distance that is exactly representable is exact and the
comparison at the boundary is strict: a pair at exactly ``threshold`` is two centers.

Default threshold 0.1: for a unit embedding x, |x.a - x.b| <= ||a - b||, so centers closer than 0.1 give every
embedding similarities within 0.1 of each other, i.e. inner logits s/gamma within 1 at the default gamma = 0.1:
the inner softmax cannot tell them apart by more than a factor e. Unrelated centers sit far above that (random
directions in d dimensions are ~sqrt(2) = 1.41 apart), and the regulariser's own floor sqrt(1e-5) = 0.003 (the
value of its per-pair term at distance 0) and fp32 noise far below it. Measured on the quickstart's data
(20 classes of 3 modes, K = 10, 1500 Adam steps): with tau = 0.2 the same-class pair distances were 0.0003 to
0.003 (5% to 95%), every class one center; with tau = 0, 0.89 to 1.67; any threshold in [0.01, 0.5] gave the
same counts.

These functions are analysis / inference tools: no gradient flows through them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import check_positive_int

__all__ = ["DEFAULT_MERGE_THRESHOLD", "effective_centers", "center_components", "merge_centers"]

DEFAULT_MERGE_THRESHOLD = 0.1

# classes per block so that a block's [classes, K, K] fp64 distances / adjacency stay near 2^22 elements
_BLOCK_ELEMENTS = 1 << 22


def _check(fc: Tensor, centers_per_class: int, threshold: float) -> int:
    K = check_positive_int("centers_per_class", centers_per_class)
    if not isinstance(fc, Tensor):
        raise TypeError(f"fc must be a torch.Tensor, got {type(fc).__name__}")
    if fc.dim() != 2 or not fc.is_floating_point():
        raise ValueError(f"fc must be a 2-D floating-point tensor [embedding_size, num_classes * centers_per_class], "
                         f"got shape {tuple(fc.shape)} and dtype {fc.dtype}")
    if fc.shape[1] == 0 or fc.shape[1] % K:
        raise ValueError(f"fc has {fc.shape[1]} columns, which is not a positive multiple of centers_per_class={K}")
    if (not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not math.isfinite(threshold)
            or threshold < 0):
        raise ValueError(f"threshold must be a finite number >= 0 (a Euclidean distance between unit vectors, "
                         f"in [0, 2]), got {threshold!r}")
    return K


def _unit_blocks(fc: Tensor, K: int) -> Iterator[tuple[int, Tensor]]:
    """Yields (first class, [b, K, d] fp64 column-normalised centers) over blocks of classes (zero columns stay
    zero, as F.normalize does); a block's [b, K, max(K, d)] temporaries stay near 2^22 elements."""
    d, M = fc.shape
    step = max(1, _BLOCK_ELEMENTS // (K * max(K, d)))
    for c0 in range(0, M // K, step):
        block = fc.detach()[:, c0 * K:(c0 + step) * K].to(torch.float64)
        yield c0, F.normalize(block, p=2, dim=0).t().reshape(-1, K, d)


def _components(units: Tensor, threshold: float) -> Tensor:
    """[b, K] smallest index of each center's component, for a block of normalised centers [b, K, d]."""
    b, K, _ = units.shape
    # direct differences, not the Gram matrix: exact for representable distances, no cancellation
    adj = torch.cdist(units, units, compute_mode="donot_use_mm_for_euclid_dist") < threshold  # [b, K, K]
    lab = torch.arange(K, device=units.device).expand(b, K).clone()
    # min-label propagation: every center ends with the smallest index of its component (<= K rounds)
    for _ in range(K):
        new = torch.where(adj, lab.unsqueeze(1), K).amin(dim=2).minimum(lab)
        if torch.equal(new, lab):
            break
        lab = new
    return lab


def center_components(fc: Tensor, centers_per_class: int, threshold: float) -> Tensor:
    """[C, K] int64: for each center, the smallest index k (within its class) of its connected component.

    Components of the graph "Euclidean distance of the normalised centers < threshold" among each class's K
    centers (transitive merging). A center that is its own component's smallest index maps to itself.
    """
    K = _check(fc, centers_per_class, threshold)
    out = torch.empty((fc.shape[1] // K, K), dtype=torch.int64, device=fc.device)
    with torch.no_grad():
        for c0, units in _unit_blocks(fc, K):
            out[c0:c0 + units.shape[0]] = _components(units, threshold)
    return out


def effective_centers(fc: Tensor, centers_per_class: int, threshold: float) -> Tensor:
    """LongTensor [C]: per class, the number of distinct centers after merging those closer than ``threshold``.

    Centers are column-normalised; two are merged when their Euclidean distance (sqrt(2 - 2 cos)) is strictly
    below ``threshold``, transitively (connected components). ``threshold=0`` merges nothing (counts are K).
    """
    comp = center_components(fc, centers_per_class, threshold)
    return (comp == torch.arange(comp.shape[1], device=comp.device)).sum(dim=1)


def _copies(sizes: list[int], slots: int) -> list[int]:
    """Copies per component, at least one each, summing to ``slots``, as proportional to ``sizes`` as integers
    allow: each extra copy goes to the component with the largest size / copies (ties: the first). When an
    exactly proportional allocation exists (sizes[j] * slots / sum(sizes) all integers) this finds it."""
    copies = [1] * len(sizes)
    for _ in range(slots - len(sizes)):
        j = max(range(len(sizes)), key=lambda i: (sizes[i] / copies[i], -i))
        copies[j] += 1
    return copies


def merge_centers(fc: Tensor, centers_per_class: int, threshold: float) -> tuple[Tensor, int]:
    """Merged centers ``(fc_merged [d, C*K'], K')`` with K' = the largest number of distinct centers of a class.

    Each connected component (see ``center_components``) becomes one center: the normalised mean of its members'
    normalised vectors (unit columns, in fc's dtype and device). A class with m < K' components fills its K'
    columns with copies of its merged centers, allocated as proportionally to the component sizes as integers
    allow (see ``_copies``), because the inner softmax over a class's centers counts a center once per copy.
    Columns of class c are c*K' .. c*K'+K'-1, components in the order of their smallest original index.
    """
    K = _check(fc, centers_per_class, threshold)
    comp = center_components(fc, K, threshold).cpu()  # [C, K]
    C = comp.shape[0]
    roots = comp == torch.arange(K)
    k_new = int(roots.sum(dim=1).max().item())
    sizes = torch.zeros((C, K), dtype=torch.int64).scatter_add_(1, comp, torch.ones_like(comp))
    index = torch.empty((C, k_new), dtype=torch.int64)  # column k' of class c = merged center of root index[c, k']
    for c in range(C):
        r = torch.nonzero(roots[c]).flatten().tolist()
        index[c] = torch.tensor([k for k, n in zip(r, _copies([int(sizes[c, k]) for k in r], k_new))
                                 for _ in range(n)], dtype=torch.int64)
    d = fc.shape[0]
    out = torch.empty((C, k_new, d), dtype=fc.dtype, device=fc.device)
    with torch.no_grad():
        for c0, units in _unit_blocks(fc, K):
            b = units.shape[0]
            lab = comp[c0:c0 + b].to(fc.device)
            sums = torch.zeros_like(units).scatter_add_(1, lab.unsqueeze(2).expand(b, K, d), units)  # at roots
            pick = index[c0:c0 + b].to(fc.device).unsqueeze(2).expand(b, k_new, d)
            out[c0:c0 + b] = F.normalize(sums, p=2, dim=2).gather(1, pick).to(fc.dtype)
    return out.reshape(C * k_new, d).t().contiguous(), k_new
