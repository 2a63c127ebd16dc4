"""Retrieval / clustering metrics of the deep-metric-learning protocol, own implementation.

Every test sample is a query against all the other test samples (leave-one-out), cosine similarity.

* Recall@k: fraction of queries with at least one same-class sample among their k nearest neighbours.
* MAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020): for a query with R other samples of
  its class, mean over i <= R of precision@i counted only where the i-th neighbour is relevant:
  MAP@R = (1/R) * sum_{i=1..R} P(i) * rel(i).
* NMI: k-means (k = number of classes, k-means++ init) on the embeddings, then normalised mutual
  information between cluster ids and labels with the arithmetic-mean normaliser
  (I / ((H(y) + H(c)) / 2), scikit-learn's default).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _neighbours(emb: torch.Tensor, kmax: int, chunk: int = 1024) -> torch.Tensor:
    """Indices [N, kmax] of the kmax nearest other samples (cosine), self excluded."""
    x = F.normalize(emb.float(), dim=1)
    N = x.shape[0]
    out = torch.empty(N, kmax, dtype=torch.long)
    for s in range(0, N, chunk):
        sim = x[s:s + chunk] @ x.t()
        idx = torch.arange(s, min(s + chunk, N))
        sim[idx - s, idx] = -float("inf")
        out[s:s + chunk] = sim.topk(kmax, dim=1).indices
    return out


def retrieval_metrics(emb: torch.Tensor, labels: torch.Tensor, ks=(1, 2, 4, 8)) -> dict:
    labels = torch.as_tensor(labels).long()
    counts = torch.bincount(labels)
    R = counts[labels] - 1  # other samples of the query's class
    kmax = int(max(max(ks), int(R.max())))
    kmax = min(kmax, emb.shape[0] - 1)
    nn_idx = _neighbours(emb, kmax)
    rel = (labels[nn_idx] == labels[:, None]).float()  # [N, kmax]
    out = {f"R@{k}": float(rel[:, :k].max(1).values.mean()) for k in ks}
    ranks = torch.arange(1, kmax + 1, dtype=torch.float32)
    prec = rel.cumsum(1) / ranks
    within = ranks[None, :] <= R[:, None].float()
    valid = R > 0
    ap = (prec * rel * within).sum(1)[valid] / R[valid].float()
    out["MAP@R"] = float(ap.mean())
    return out


def entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(a, b) -> float:
    """Normalised mutual information, arithmetic normaliser. 1.0 when both partitions are trivial."""
    a = np.unique(np.asarray(a), return_inverse=True)[1]
    b = np.unique(np.asarray(b), return_inverse=True)[1]
    n = len(a)
    cont = np.bincount(a * (b.max() + 1) + b, minlength=(a.max() + 1) * (b.max() + 1)).reshape(a.max() + 1, -1)
    ha, hb = entropy(cont.sum(1)), entropy(cont.sum(0))
    if ha == 0 and hb == 0:
        return 1.0
    nz = cont > 0
    pij = cont[nz] / n
    pi = (cont.sum(1, keepdims=True) / n).repeat(cont.shape[1], 1)[nz]
    pj = (cont.sum(0, keepdims=True) / n).repeat(cont.shape[0], 0)[nz]
    mi = float((pij * np.log(pij / (pi * pj))).sum())
    return max(0.0, mi / ((ha + hb) / 2))


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ init (squared Euclidean). Returns cluster ids [N]."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    N = x.shape[0]
    sq = (x * x).sum(1)
    centers = torch.empty(k, x.shape[1])
    i0 = int(torch.randint(N, (1,), generator=g))
    centers[0] = x[i0]
    d2 = (sq - 2 * x @ x[i0] + sq[i0]).clamp_min(0)
    for j in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / N)
        i = int(torch.multinomial(p, 1, generator=g))
        centers[j] = x[i]
        d2 = torch.minimum(d2, (sq - 2 * x @ x[i] + sq[i]).clamp_min(0))
    assign = None
    for _ in range(iters):
        dist = sq[:, None] - 2 * x @ centers.t() + (centers * centers).sum(1)[None]
        new = dist.argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        cnt = torch.bincount(assign, minlength=k).float()
        nonempty = cnt > 0
        centers[nonempty] = sums[nonempty] / cnt[nonempty, None]
    return assign


def all_metrics(emb: torch.Tensor, labels, seed: int = 0, with_nmi: bool = True) -> dict:
    labels = torch.as_tensor(labels).long()
    out = retrieval_metrics(emb, labels)
    if with_nmi:
        x = F.normalize(emb.float(), dim=1)
        k = int(torch.unique(labels).numel())
        out["NMI"] = nmi(labels.numpy(), kmeans(x, k, seed=seed).numpy())
    return out
