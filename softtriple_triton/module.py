"""``SoftTripleLoss``: the nn.Module that owns the centers (layer 3)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._validation import check_hyper, check_positive_int
from .functional import softtriple_logits, softtriple_loss
from .regularizer import center_regularizer


class SoftTripleLoss(nn.Module):
    """SoftTriple loss with learnable centers.

    Drop-in for pytorch-metric-learning's ``SoftTripleLoss`` and the official implementation: the
    centers are the parameter ``fc`` of shape [embedding_size, num_classes * centers_per_class],
    column ``c*K + k`` being center k of class c, initialised with ``kaiming_uniform_(a=sqrt(5))``;
    their state dicts load unchanged. ``gamma`` is the paper's temperature (0.1 => logits x 10).

    The loss never changes the dtype of ``fc``: keep it fp32 under AMP or with low-precision
    embeddings; the arithmetic is fp32 inside (fp64 when an input is fp64).
    """

    def __init__(self, num_classes: int, embedding_size: int, centers_per_class: int = 10, la: float = 20.0,
                 gamma: float = 0.1, tau: float = 0.2, margin: float = 0.01, normalize_embeddings: bool = True,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.embedding_size = check_positive_int("embedding_size", embedding_size)
        check_hyper(centers_per_class, la, gamma, tau, margin, reduction, backend, normalize_embeddings)
        self.centers_per_class = int(centers_per_class)
        self.la, self.gamma, self.tau, self.margin = float(la), float(gamma), float(tau), float(margin)
        self.normalize_embeddings = normalize_embeddings
        self.reduction = reduction
        self.backend = backend
        self.fc = nn.Parameter(torch.empty(self.embedding_size, self.num_classes * self.centers_per_class))
        nn.init.kaiming_uniform_(self.fc, a=math.sqrt(5))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return softtriple_loss(embeddings, self.fc, labels, self.centers_per_class, la=self.la, gamma=self.gamma,
                               tau=self.tau, margin=self.margin, normalize_embeddings=self.normalize_embeddings,
                               reduction=self.reduction, backend=self.backend)

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """S [N, C]: relaxed similarity of each embedding to each class (no margin, no la)."""
        return softtriple_logits(embeddings, self.fc, self.centers_per_class, gamma=self.gamma,
                                 normalize_embeddings=self.normalize_embeddings, backend=self.backend)

    def regularizer(self) -> Tensor:
        """The center regulariser (without tau)."""
        return center_regularizer(self.fc, self.centers_per_class)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, tau={self.tau}, "
                f"margin={self.margin}, normalize_embeddings={self.normalize_embeddings}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
