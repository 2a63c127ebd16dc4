"""pytorch-metric-learning (PML) and official-code compatibility: PML's call semantics and the conversions.

PML 2.9's ``SoftTripleLoss`` (losses/soft_triple_loss.py), read for this module:
    * forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None);
    * ``indices_tuple`` (a miner's output) is not ignored: each sample is weighted by how often its index occurs
      in the concatenated tuple, divided by the largest count (samples absent from it get weight 0; an empty or
      missing tuple weights every sample 1), then the weighted per-sample losses are averaged over the batch;
    * a reference set is refused unless it is the batch itself;
    * ``gamma`` is stored inverted (``self.gamma = 1 / gamma``), as in the official code;
    * the regulariser is separate: ``weight_regularizer=SparseCentersRegularizer(C, K)`` with weight
      ``weight_reg_weight`` computes sum_{same class, k<k'} sqrt(2 + eps - min(2 cos, 2)) / (C K (K-1)) with
      eps = torch.finfo(dtype).tiny (1.2e-38 in fp32) in the embeddings' dtype, where ours (and the official
      code) use eps = 1e-5 in fp32.
The official module (idstcv/SoftTriple, loss/SoftTriple.py) stores la, gamma (inverted), tau, margin, cN, K and
fc [dim, cN*K]; it does not normalise its input (its network does) and always averages over the batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def check_reference_set(embeddings: Tensor, labels: Tensor, ref_emb: Any, ref_labels: Any) -> None:
    """PML's rule: a reference set is accepted only when it is the batch itself (the same tensor objects)."""
    if (ref_emb is not None and ref_emb is not embeddings) or (ref_labels is not None and ref_labels is not labels):
        raise ValueError("ref_emb / ref_labels: SoftTripleLoss does not support a reference set (it compares "
                         "embeddings with the class centers, not with other embeddings); pass None, as for "
                         "pytorch-metric-learning's SoftTripleLoss")


def miner_weights(indices_tuple: Any, embeddings: Tensor) -> Tensor | None:
    """PML's per-sample weights from a miner's ``indices_tuple``; None when every weight is 1 (no tuple, or an
    empty one): weight_i = count of i in the concatenated tuple / the largest count."""
    if indices_tuple is None:
        return None
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    n, device = embeddings.shape[0], embeddings.device
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must be None or a miner's tuple of 3 (anchors, positives, negatives) or 4 "
                         f"(anchors, positives, anchors, negatives) index tensors, got {type(indices_tuple).__name__}"
                         + (f" of length {len(indices_tuple)}" if isinstance(indices_tuple, (tuple, list)) else ""))
    parts = []
    for i, t in enumerate(indices_tuple):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype == torch.bool or t.is_floating_point() \
                or t.is_complex():
            raise ValueError(f"indices_tuple[{i}] must be a 1-D integer tensor of batch indices, got "
                             + (f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__))
        parts.append(t.to(device=device, dtype=torch.int64))
    idx = torch.cat(parts)
    if idx.numel() == 0:
        return None
    if bool(idx.min() < 0) or bool(idx.max() >= n):
        raise ValueError(f"indices_tuple holds indices outside the batch [0, {n}): min {int(idx.min())}, "
                         f"max {int(idx.max())}")
    counts = torch.bincount(idx, minlength=n).to(torch.float64)  # fp64: exact counts, one rounding per weight
    return counts / counts.max()


def _pml_modules() -> Any:
    try:
        import pytorch_metric_learning as pml
        from pytorch_metric_learning import distances, losses, reducers, regularizers  # noqa: F401
    except ImportError as e:
        raise ImportError("from_pml needs pytorch-metric-learning installed") from e
    return pml


def config_from_pml(pml_loss: Any, tau: float | None) -> tuple[dict[str, Any], Tensor]:
    """(constructor arguments of our ``SoftTripleLoss``, centers) equivalent to a PML ``SoftTripleLoss``."""
    pml = _pml_modules()
    if not isinstance(pml_loss, pml.losses.SoftTripleLoss):
        raise TypeError(f"pml_loss must be a pytorch_metric_learning.losses.SoftTripleLoss, got "
                        f"{type(pml_loss).__name__}")
    dist = pml_loss.distance
    if not isinstance(dist, pml.distances.DotProductSimilarity) or dist.power != 1 or dist.p != 2 \
            or not dist.normalize_embeddings:
        raise ValueError(f"pml_loss.distance must be CosineSimilarity() (dot products of L2-normalised embeddings "
                         f"and centers; SoftTripleLoss always normalises the centers, as the paper does), got "
                         f"{type(dist).__name__}(normalize_embeddings={dist.normalize_embeddings}, p={dist.p}, "
                         f"power={dist.power})")
    if pml_loss.embedding_regularizer is not None:
        raise ValueError(f"pml_loss has an embedding_regularizer ({type(pml_loss.embedding_regularizer).__name__}), "
                         "which SoftTripleLoss has no equivalent for")
    reducer = pml_loss.reducer
    if isinstance(reducer, pml.reducers.MultipleReducers):
        reducer = reducer.reducers["loss"] if "loss" in reducer.reducers else reducer.default_reducer
    kinds = {pml.reducers.MeanReducer: "mean", pml.reducers.SumReducer: "sum"}
    if type(reducer) not in kinds:
        raise ValueError(f"pml_loss.reducer {type(reducer).__name__} has no equivalent reduction "
                         "(MeanReducer -> 'mean' and SumReducer -> 'sum' do)")
    if tau is None:
        reg = pml_loss.weight_regularizer
        if reg is None:
            tau = 0.0
        elif isinstance(reg, pml.regularizers.SparseCentersRegularizer):
            if type(reg.reducer) is not pml.reducers.DivisorReducer or \
                    not isinstance(reg.distance, pml.distances.CosineSimilarity):
                raise ValueError("pml_loss.weight_regularizer is a SparseCentersRegularizer with a non-default "
                                 "reducer or distance, which tau cannot represent; pass tau= explicitly")
            n_centers = pml_loss.num_classes * pml_loss.centers_per_class
            if tuple(reg.same_class_mask.shape) != (n_centers, n_centers):
                raise ValueError(f"pml_loss.weight_regularizer was built for {reg.same_class_mask.shape[0]} "
                                 f"centers, the loss has {pml_loss.num_classes} x {pml_loss.centers_per_class} = "
                                 f"{n_centers}")
            tau = float(pml_loss.weight_reg_weight)
        else:
            raise ValueError(f"pml_loss.weight_regularizer {type(reg).__name__} has no equivalent (only "
                             "SparseCentersRegularizer maps to tau); pass tau= explicitly to replace it")
    return dict(num_classes=int(pml_loss.num_classes), embedding_size=int(pml_loss.fc.shape[0]),
                centers_per_class=int(pml_loss.centers_per_class), la=float(pml_loss.la),
                gamma=1.0 / float(pml_loss.gamma), tau=float(tau), margin=float(pml_loss.margin),
                normalize_embeddings=True, reduction=kinds[type(reducer)]), pml_loss.fc


def config_from_official(module: Any, normalize_embeddings: bool) -> tuple[dict[str, Any], Tensor]:
    """(constructor arguments of our ``SoftTripleLoss``, centers) equivalent to the official ``SoftTriple``."""
    missing = [a for a in ("la", "gamma", "tau", "margin", "cN", "K", "fc") if not hasattr(module, a)]
    if missing:
        raise TypeError(f"module must be the official implementation's SoftTriple (attributes la, gamma, tau, "
                        f"margin, cN, K, fc); {type(module).__name__} lacks {missing}")
    fc = module.fc
    K, C = int(module.K), int(module.cN)
    if not isinstance(fc, Tensor) or fc.dim() != 2 or fc.shape[1] != C * K:
        raise ValueError(f"module.fc must be a [dim, cN*K] = [dim, {C * K}] tensor, got "
                         f"{tuple(fc.shape) if isinstance(fc, Tensor) else type(fc).__name__}")
    inv_gamma = float(module.gamma)
    if not math.isfinite(inv_gamma) or inv_gamma <= 0:
        raise ValueError(f"module.gamma (the official code stores 1/gamma) must be a finite number > 0, got "
                         f"{module.gamma!r}")
    return dict(num_classes=C, embedding_size=int(fc.shape[0]), centers_per_class=K, la=float(module.la),
                gamma=1.0 / inv_gamma, tau=float(module.tau), margin=float(module.margin),
                normalize_embeddings=normalize_embeddings, reduction="mean"), fc
