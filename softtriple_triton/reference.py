"""Plain-PyTorch SoftTriple loss: the paper's formula written the obvious way.

This is the test oracle and the "eager" baseline of the benchmark. It materialises the N x (C*K)
similarity matrix (several times, through autograd) and, for the regulariser, the full
(C*K) x (C*K) Gram matrix of the centers, exactly as the official implementation does. Do not use
it for large C*K; use ``backend="torch"`` or ``backend="triton"``.

Notation (shared by every backend of this package):
    x   embeddings [N, d] (L2-normalised when ``normalize_embeddings``)
    W   centers ``fc`` [d, C*K], column ``c*K + k`` is center k of class c, normalised per column
    s   = x @ W                                  [N, C*K]
    p   = softmax_k(s / gamma)                   inner softmax over the K centers of a class
    S   = sum_k p * s                            [N, C]   relaxed class similarity
    z   = la * (S - margin * onehot(y))          [N, C]
    loss_i = logsumexp_c z_ic - z_{i, y_i}
    reg = sum_c sum_{k<k'} sqrt(2 + 1e-5 - 2 <w_ck, w_ck'>) / (C*K*(K-1))
    loss = reduce(loss_i) + tau * reg            (reg only when tau > 0 and K > 1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REG_EPS = 1e-5  # the official code's constant under the square root: sqrt(2 + 1e-5 - 2 <w, w'>)


def reference_logits(embeddings: torch.Tensor, fc: torch.Tensor, centers_per_class: int, gamma: float,
                     normalize_embeddings: bool = True) -> torch.Tensor:
    """S [N, C]: the relaxed similarity of every embedding to every class (no margin, no la)."""
    x = F.normalize(embeddings, p=2, dim=1) if normalize_embeddings else embeddings
    w = F.normalize(fc, p=2, dim=0)
    sim = x.matmul(w)
    sim = sim.reshape(sim.shape[0], -1, centers_per_class)
    prob = F.softmax(sim / gamma, dim=2)
    return (prob * sim).sum(dim=2)


def reference_regularizer(fc: torch.Tensor, centers_per_class: int) -> torch.Tensor:
    """The official (C*K) x (C*K) Gram-matrix regulariser (without tau). Quadratic memory in C*K."""
    K = centers_per_class
    M = fc.shape[1]
    C = M // K
    if K <= 1:
        return fc.new_zeros(())
    w = F.normalize(fc, p=2, dim=0)
    gram = w.t().matmul(w)
    # the official code's boolean mask of same-class pairs (c*K + k, c*K + k'), k < k', built vectorised
    mask = torch.zeros(M, M, dtype=torch.bool, device=fc.device)
    i, j = torch.triu_indices(K, K, offset=1, device=fc.device)
    base = (torch.arange(C, device=fc.device) * K)[:, None]
    mask[(base + i).reshape(-1), (base + j).reshape(-1)] = True
    return torch.sqrt(2.0 + REG_EPS - 2.0 * gram[mask]).sum() / (C * K * (K - 1.0))


def reference_softtriple_loss(embeddings: torch.Tensor, fc: torch.Tensor, labels: torch.Tensor,
                              centers_per_class: int, la: float = 20.0, gamma: float = 0.1,
                              tau: float = 0.2, margin: float = 0.01, normalize_embeddings: bool = True,
                              reduction: str = "mean") -> torch.Tensor:
    """The loss exactly as the paper / official code define it (see module docstring).

    ``reduction="none"`` returns the per-sample classification losses; the regulariser is then not
    included (it is a property of the centers, not of a sample).
    """
    S = reference_logits(embeddings, fc, centers_per_class, gamma, normalize_embeddings)
    margin_m = torch.zeros_like(S)
    margin_m[torch.arange(S.shape[0], device=S.device), labels] = margin
    per_sample = F.cross_entropy(la * (S - margin_m), labels, reduction="none")
    if reduction == "none":
        return per_sample
    cls = per_sample.mean() if reduction == "mean" else per_sample.sum()
    if tau > 0 and centers_per_class > 1:
        cls = cls + tau * reference_regularizer(fc, centers_per_class).to(cls.dtype)
    return cls
