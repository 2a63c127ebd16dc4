"""Functional API (layer 3): ``softtriple_loss`` and ``softtriple_logits``."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import LossParams, acc_dtype, no_autocast, pow2_scale, unit_rows
from ._validation import check_embeddings_and_centers, check_hyper, check_labels, resolve_backend
from .cpu import torch_logits, torch_loss_rows, unit_rows_fast
from .reference import reference_logits, reference_softtriple_loss
from .regularizer import center_regularizer
from .triton_autograd import triton_logits, triton_loss_rows


def product_dtype(emb_dtype: torch.dtype, fc_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype in which the fused (Triton) backend multiplies embeddings and centers (always accumulating in
    fp32; the softmaxes, log-sum-exps and reductions are fp32 too):

    - fp64 when either input is fp64 (exact);
    - under ``torch.autocast`` on that device: the autocast dtype, as a matmul would run there;
    - bf16 / fp16 embeddings with fp32 (or same-dtype) centers: the embeddings' dtype, on tensor cores;
    - otherwise the promotion of both: fp32 with fp32 follows ``torch.get_float32_matmul_precision()`` as
      ``torch.mm`` does ("highest": IEEE fp32; "high" / "medium": TF32).

    The centers' dtype never changes: they are normalised into a transient copy in this dtype for each step.
    """
    if torch.float64 in (emb_dtype, fc_dtype):
        return torch.float64
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if emb_dtype in (torch.float16, torch.bfloat16) and fc_dtype in (emb_dtype, torch.float32):
        return emb_dtype
    return torch.promote_types(emb_dtype, fc_dtype)


def _normalized_rows(embeddings: Tensor, dt: torch.dtype, normalize: bool, acc: torch.dtype,
                     native: bool = False) -> Tensor:
    """Embeddings as the kernels consume them: normalised in the accumulation dtype, then stored in ``dt``
    (one rounding). F.normalize without overflow for any finite entries; ``native``: by the CPU C kernels where
    they apply (the torch backend)."""
    if not normalize:
        return embeddings if embeddings.dtype == dt else embeddings.to(dt)
    x = (unit_rows_fast if native else unit_rows)(embeddings if embeddings.dtype == acc else embeddings.to(acc))
    return x if x.dtype == dt else x.to(dt)


def _reference_inputs(embeddings: Tensor, fc: Tensor, normalize: bool, acc: torch.dtype) -> tuple[Tensor, Tensor]:
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
    # under the caller's autocast, if any (no_autocast turns it off below)
    prod = product_dtype(embeddings.dtype, fc.dtype, embeddings.device.type) if be == "triton" else None

    with no_autocast(embeddings.device):
        if be == "reference":
            meta = embeddings.device.type == "meta"  # the Gram mask's nonzero has no meta kernel: shapes only
            loss = reference_softtriple_loss(*_reference_inputs(embeddings, fc, normalize_embeddings, acc), labels,
                                             K, la, gamma, 0.0 if meta else tau, margin, normalize_embeddings,
                                             reduction)
            if meta and tau > 0 and K > 1 and reduction != "none":
                loss = loss + tau * center_regularizer(fc, K)
            return loss
        if be == "triton":
            x = _normalized_rows(embeddings, acc, normalize_embeddings, acc)
            keep = torch.is_grad_enabled() and (embeddings.requires_grad or fc.requires_grad)
            assert prod is not None
            rows = triton_loss_rows(x, fc, labels, LossParams(K, la, gamma, margin), prod, keep)
        else:
            x = _normalized_rows(embeddings, torch.promote_types(embeddings.dtype, fc.dtype), normalize_embeddings,
                                 acc, native=True)
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
    prod = product_dtype(embeddings.dtype, fc.dtype, embeddings.device.type)
    with no_autocast(embeddings.device):
        if embeddings.shape[0] == 0:  # no rows: [0, C], still attached to the inputs' graph
            return (embeddings.to(acc) @ fc.to(acc)).view(0, fc.shape[1] // K, K).sum(dim=2)
        if be == "reference":
            return reference_logits(*_reference_inputs(embeddings, fc, normalize_embeddings, acc), K, gamma,
                                    normalize_embeddings)
        if be == "triton":
            return triton_logits(_normalized_rows(embeddings, acc, normalize_embeddings, acc), fc,
                                 LossParams(K, 1.0, gamma, 0.0), prod)
        x = _normalized_rows(embeddings, torch.promote_types(embeddings.dtype, fc.dtype), normalize_embeddings, acc,
                             native=True)
        return torch_logits(x, fc, K, gamma, normalize_embeddings)
