"""``SoftTripleLoss``: the nn.Module that owns the centers (layer 3)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import check_hyper, check_positive_int
from .centers import DEFAULT_MERGE_THRESHOLD, effective_centers, merge_centers
from .compat import check_reference_set, config_from_official, config_from_pml, miner_weights
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

    In pytorch-metric-learning's trainers it replaces PML's loss as ``loss_funcs={"metric_loss": loss}`` (with
    ``optimizers["metric_loss_optimizer"]`` over ``loss.parameters()``): ``forward`` takes PML's arguments.
    ``from_pml`` / ``from_official`` convert existing loss objects; ``effective_centers`` / ``prune_centers``
    count and merge the centers that the regulariser pulled together.
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

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None, ref_emb: Tensor | None = None,
                ref_labels: Tensor | None = None) -> Tensor:
        """The loss of a batch; the arguments and their semantics are pytorch-metric-learning's (2.9).

        Args:
            embeddings: [N, embedding_size].
            labels: [N] class indices in [0, num_classes).
            indices_tuple: a PML miner's output (3 or 4 index tensors) or None. As PML's SoftTripleLoss does,
                sample i is weighted by (occurrences of i in the tuple) / (largest count), so samples the miner
                did not pick count 0; the mean still divides by N. None or an empty tuple: plain loss.
            ref_emb, ref_labels: a reference set is not supported (ValueError), except the batch itself.
        """
        check_reference_set(embeddings, labels, ref_emb, ref_labels)
        kwargs: dict[str, Any] = dict(la=self.la, gamma=self.gamma, tau=self.tau, margin=self.margin,
                      normalize_embeddings=self.normalize_embeddings, backend=self.backend)
        weights = miner_weights(indices_tuple, embeddings)
        if weights is None:
            return softtriple_loss(embeddings, self.fc, labels, self.centers_per_class, reduction=self.reduction,
                                   **kwargs)
        rows = softtriple_loss(embeddings, self.fc, labels, self.centers_per_class, reduction="none", **kwargs)
        rows = rows * weights.to(rows.dtype)
        if self.reduction == "none":
            return rows
        loss = rows.mean() if self.reduction == "mean" else rows.sum()
        if self.tau > 0 and self.centers_per_class > 1:
            loss = loss + self.tau * self.regularizer().to(loss.dtype)
        return loss

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """S [N, C]: relaxed similarity of each embedding to each class (no margin, no la)."""
        return softtriple_logits(embeddings, self.fc, self.centers_per_class, gamma=self.gamma,
                                 normalize_embeddings=self.normalize_embeddings, backend=self.backend)

    def regularizer(self) -> Tensor:
        """The center regulariser (without tau)."""
        return center_regularizer(self.fc, self.centers_per_class)

    def effective_centers(self, threshold: float = DEFAULT_MERGE_THRESHOLD) -> Tensor:
        """LongTensor [num_classes]: per class, the number of distinct centers (the paper's adaptive number).

        Centers (column-normalised) closer than ``threshold`` in Euclidean distance, sqrt(2 - 2 cos), are one
        center, transitively (connected components of the "distance < threshold" graph of each class's K
        centers; a pair at exactly ``threshold`` stays two). Default 0.1: such centers give every unit embedding
        similarities within 0.1, i.e. inner logits s/gamma within 1 at gamma = 0.1 (see
        ``softtriple_triton.centers``). Same as ``softtriple_triton.centers.effective_centers(fc, K, threshold)``.
        """
        return effective_centers(self.fc, self.centers_per_class, threshold)

    def prune_centers(self, threshold: float = DEFAULT_MERGE_THRESHOLD) -> SoftTripleLoss:
        """A new, smaller ``SoftTripleLoss`` (for inference / ``get_logits``) with the merged centers.

        Components as in ``effective_centers``; each becomes one center, the normalised mean of its members'
        normalised vectors. The new K' is the largest number of components of a class; a class with fewer fills
        its K' columns with copies of its merged centers, as proportionally to the component sizes as integers
        allow (the inner softmax counts a center once per copy). Hyper-parameters, dtype and device are kept.

        What holds (tested):
            * ``get_logits`` is unchanged (to rounding) when the centers of each component are identical and
              every class's component sizes are proportional to its copies: in particular when each class has
              collapsed to one center, when all classes have the same component sizes, and when nothing merges
              (then the columns are the normalised originals). Hence ``effective_centers`` of the original at a
              threshold equals that of the pruned module at the same threshold in these cases.
            * The largest similarity of an embedding to a class's centers (the gamma -> 0 limit of the relaxed
              similarity) moves by at most the largest distance of a center to its merged center.
        What does not: with near-but-not-identical centers ``get_logits`` moves by up to about that distance
        (more where the copies are not proportional to the component sizes: the inner softmax then weights the
        components differently); the regulariser (fewer pairs, divisor C K'(K'-1)) and therefore the training
        loss and its gradients differ. Do not train the pruned module expecting the original's trajectory.
        """
        fc, k_new = merge_centers(self.fc.detach(), self.centers_per_class, threshold)
        pruned = SoftTripleLoss(self.num_classes, self.embedding_size, k_new, la=self.la, gamma=self.gamma,
                                tau=self.tau, margin=self.margin, normalize_embeddings=self.normalize_embeddings,
                                reduction=self.reduction, backend=self.backend)
        pruned.fc = nn.Parameter(fc, requires_grad=self.fc.requires_grad)
        return pruned

    @classmethod
    def from_pml(cls, pml_loss: Any, tau: float | None = None, backend: str = "auto") -> SoftTripleLoss:
        """The equivalent of a live pytorch-metric-learning ``SoftTripleLoss`` (read from PML 2.9).

        Mapped: ``num_classes``, ``centers_per_class``, ``la``, ``margin``; ``gamma = 1 / pml_loss.gamma`` (PML
        stores the inverse temperature, like the official code); ``embedding_size = pml_loss.fc.shape[0]``;
        ``fc``: a copy of PML's centers (same layout [d, C*K], dtype and device); ``reduction`` from PML's
        reducer (MeanReducer -> "mean", SumReducer -> "sum"; others raise); ``normalize_embeddings=True``
        (PML's distance must be ``CosineSimilarity()``, which normalises embeddings and centers).

        ``tau=None`` takes the regulariser from PML: none -> 0; ``SparseCentersRegularizer`` with
        ``weight_reg_weight=w`` -> ``tau=w``; any other ``weight_regularizer`` (or an ``embedding_regularizer``)
        raises. A number replaces PML's regulariser, whatever it is.

        Difference that remains: PML's regulariser is sqrt(2 + eps - min(2 cos, 2)) with eps =
        ``torch.finfo(dtype).tiny`` (1.2e-38 in fp32), computed in the embeddings' dtype; ours and the official
        code's is sqrt(2 + 1e-5 - 2 cos), in fp32. Normalisation is the same (the sum over same-class pairs
        k < k' divided by C K (K-1); PML's divisor is 2 x the number of pairs, the same number). Per pair the
        two differ by about 1e-5 / (2 distance): ~3.5e-6 for unrelated centers (distance ~1.41), below fp32
        resolution of the total loss; for nearly coincident centers PML's gradient grows like 1 / distance
        (unbounded), ours stays below 1 / sqrt(1e-5) = 316. PML also casts its centers to the embeddings' dtype
        inside the loss; ours keeps ``fc``'s dtype and computes in fp32.
        """
        config, fc = config_from_pml(pml_loss, tau)
        return cls._with_centers(config, fc, backend)

    @classmethod
    def from_official(cls, module: Any, normalize_embeddings: bool = False, backend: str = "auto") -> SoftTripleLoss:
        """The equivalent of the official implementation's ``SoftTriple`` module (idstcv/SoftTriple).

        Mapped: ``la``, ``tau``, ``margin``; ``gamma = 1 / module.gamma`` (the official code stores the inverse
        temperature); ``num_classes = module.cN``, ``centers_per_class = module.K``, ``embedding_size`` and a
        copy of ``fc`` [dim, cN*K] (same layout, dtype, device); ``reduction="mean"``. The regulariser is the
        same formula (eps 1e-5, divisor cN K (K-1)). The official loss does not normalise its input (its network
        does), hence ``normalize_embeddings=False`` by default: the same loss and gradients on any input. With
        True and unit-norm input the loss and the centers' gradient are the same and the embeddings' gradient
        loses its radial part (x -> (I - x x^T) g), which changes nothing upstream of a network's own
        normalisation (that projection is idempotent).
        """
        config, fc = config_from_official(module, normalize_embeddings)
        return cls._with_centers(config, fc, backend)

    @classmethod
    def _with_centers(cls, config: dict[str, Any], fc: Tensor, backend: str) -> SoftTripleLoss:
        loss = cls(**config, backend=backend)
        loss.fc = nn.Parameter(fc.detach().clone())
        return loss

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, tau={self.tau}, "
                f"margin={self.margin}, normalize_embeddings={self.normalize_embeddings}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
