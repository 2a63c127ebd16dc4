"""Functional API (layer 3): ``softtriple_loss`` and ``softtriple_logits``."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import acc_dtype, inverse_column_norms, no_autocast, pow2_scale, unit_rows
from ._validation import check_embeddings_and_centers, check_hyper, check_labels, resolve_backend
from .cpu import torch_logits, torch_loss_rows
from .reference import reference_logits, reference_softtriple_loss
from .regularizer import center_regularizer
from .triton_autograd import triton_logits, triton_loss_rows


def _normalized_rows(embeddings: Tensor, fc: Tensor, normalize: bool, acc: torch.dtype) -> Tensor:
    """Embeddings as the kernels consume them: normalised in the accumulation dtype, then stored in the
    promotion of both input dtypes (one rounding; bf16 embeddings with fp32 centers stay fp32)."""
    dt = torch.promote_types(embeddings.dtype, fc.dtype)
    if not normalize:
        return embeddings.to(dt)
    return unit_rows(embeddings.to(acc)).to(dt)  # F.normalize without overflow for any finite entries


def _inverse_norms(fc: Tensor, dtype: torch.dtype) -> Tensor:
    # differentiable; same semantics as F.normalize: 1 / max(||w_j||, 1e-12), no overflow for any finite fc
    return inverse_column_norms(fc.to(dtype))


def _reference_inputs(embeddings: Tensor, fc: Tensor, normalize: bool, acc: torch.dtype):
    """The reference's inputs in the accumulation dtype, rows (when normalised) and columns divided by exact
    powers of two so that its F.normalize cannot overflow; the normalised vectors are unchanged."""
    x, w = embeddings.to(acc), fc.to(acc)
    return (x / pow2_scale(x, 1) if normalize else x), w / pow2_scale(w, 0)


def softtriple_loss(embeddings: Tensor, fc: Tensor, labels: Tensor, centers_per_class: int, la: float = 20.0,
                    gamma: float = 0.1, tau: float = 0.2, margin: float = 0.01, normalize_embeddings: bool = True,
                    reduction: str = "mean", backend: str = "auto") -> Tensor:
    """SoftTriple loss (Qian et al., ICCV 2019).

    Args:
        embeddings: [N, d] fp16/bf16/fp32/fp64.
        fc: centers [d, C*K]; column ``c*K + k`` is center k of class c (normalised per column here).
        labels: [N] integer class indices in [0, C).
        centers_per_class: K.
        la: scale of the class logits (lambda in the paper).
        gamma: temperature of the inner softmax over the K centers (0.1 multiplies by 10).
        tau: weight of the center regulariser (skipped when 0 or K == 1).
        margin: subtracted from the true class's similarity (delta in the paper).
        normalize_embeddings: L2-normalise the rows of ``embeddings`` first.
        reduction: "mean" | "sum" | "none". With "none" the per-sample classification losses [N] are
            returned and the regulariser is not included (it belongs to the centers, not to a sample;
            add ``tau * center_regularizer(fc, K)`` yourself).
        backend: "auto" (triton on CUDA, torch elsewhere) | "triton" | "torch" | "reference".

    Returns the loss in fp32 (fp64 when an input is fp64), whatever the input dtypes; autocast is
    disabled inside. Non-finite inputs propagate (NaN/inf in, NaN out), like PyTorch's losses.
    """
    check_hyper(centers_per_class, la, gamma, tau, margin, reduction, backend, normalize_embeddings)
    check_embeddings_and_centers(embeddings, fc, centers_per_class)
    K = int(centers_per_class)
    C = fc.shape[1] // K
    labels = check_labels(labels, embeddings.shape[0], C, embeddings.device)
    be = resolve_backend(backend, embeddings.device, K)
    la, gamma, tau, margin = float(la), float(gamma), float(tau), float(margin)
    acc = acc_dtype(embeddings.dtype, fc.dtype)

    with no_autocast(embeddings.device):
        if be == "reference":
            meta = embeddings.device.type == "meta"  # the Gram mask's nonzero has no meta kernel: shapes only
            loss = reference_softtriple_loss(*_reference_inputs(embeddings, fc, normalize_embeddings, acc), labels,
                                             K, la, gamma, 0.0 if meta else tau, margin, normalize_embeddings,
                                             reduction)
            if meta and tau > 0 and K > 1 and reduction != "none":
                loss = loss + tau * center_regularizer(fc, K)
            return loss
        x = _normalized_rows(embeddings, fc, normalize_embeddings, acc)
        if be == "triton":
            rows = triton_loss_rows(x, fc, _inverse_norms(fc, acc), labels, K, la, gamma, margin)
        else:
            rows = torch_loss_rows(x, fc, labels, K, la, gamma, margin, normalize_embeddings)
        if reduction == "none":
            return rows
        loss = rows.mean() if reduction == "mean" else rows.sum()
        if tau > 0 and K > 1:
            loss = loss + tau * center_regularizer(fc, K)
        return loss


def softtriple_logits(embeddings: Tensor, fc: Tensor, centers_per_class: int, gamma: float = 0.1,
                      normalize_embeddings: bool = True, backend: str = "auto") -> Tensor:
    """Relaxed class similarities S [N, C] = sum_k softmax_k(s/gamma) * s (no margin, no la); differentiable.

    Computed by the same fused machinery as the loss (no N x C*K tensor on the triton/torch backends).
    fp32 output (fp64 for fp64 inputs). An empty batch gives an empty [0, C] tensor.
    """
    check_hyper(centers_per_class, 1.0, gamma, 0.0, 0.0, "mean", backend, normalize_embeddings)
    check_embeddings_and_centers(embeddings, fc, centers_per_class, what="logits")
    K = int(centers_per_class)
    be = resolve_backend(backend, embeddings.device, K)
    acc = acc_dtype(embeddings.dtype, fc.dtype)
    gamma = float(gamma)
    with no_autocast(embeddings.device):
        if embeddings.shape[0] == 0:  # no rows: [0, C], still attached to the inputs' graph
            return (embeddings.to(acc) @ fc.to(acc)).view(0, fc.shape[1] // K, K).sum(dim=2)
        if be == "reference":
            return reference_logits(*_reference_inputs(embeddings, fc, normalize_embeddings, acc), K, gamma,
                                    normalize_embeddings)
        x = _normalized_rows(embeddings, fc, normalize_embeddings, acc)
        if be == "triton":
            return triton_logits(x, fc, _inverse_norms(fc, acc), K, gamma)
        return torch_logits(x, fc, K, gamma, normalize_embeddings)
