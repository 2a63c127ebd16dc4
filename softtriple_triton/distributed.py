"""SoftTriple with class centers sharded across the ranks of a ``torch.distributed`` process group.

Each rank owns a contiguous slice of classes ``[class_start, class_end)`` (uneven splits allowed) and
only the centers of those classes: a local ``fc`` of shape ``[d, C_local * K]``. One step:

1. The ranks ``all_gather`` their embeddings and labels, so every rank holds the global batch
   ``x [N, d]`` and ``y [N]`` (per-rank batch sizes may differ).
2. Each rank computes the relaxed class similarities of the global batch against its own classes,
   ``S_local = softtriple_logits(x, fc_local) [N, C_local]``, with the fused machinery of this
   package (no ``N x C*K`` tensor on the fused backends), and ``z_local = la * (S_local - margin *
   onehot)``.
3. The log-sum-exp over classes is assembled with collectives, as in a vocabulary-parallel
   cross-entropy: ``all_reduce(MAX)`` of the row maxima, then one ``all_reduce(SUM)`` of the
   stacked row sums of ``exp(z - max)`` and of the target logit (which exactly one rank owns).
   ``loss_i = max_i + log(sumexp_i) - z_{i, y_i}``.
4. The regulariser is per class, hence local: each rank sums its classes' terms, divides by the
   *global* ``C * K * (K - 1)``, and the parts are ``all_reduce``-summed.

Every rank ends with the same scalar: the loss of the global batch, as the single-process loss
would give it. Every rank must then call ``backward()`` on it (as with DDP). The backward is exact:

* ``fc_local.grad`` is the gradient of the global loss with respect to this rank's centers;
* ``embeddings.grad`` on each rank is the gradient of the global loss with respect to *that rank's*
  embeddings (the partial gradients that every rank's classes contribute to every embedding are
  summed with one ``all_reduce`` in the backward of the gather, and each rank keeps its rows).

Gradient convention: the gradient is that of the global loss (by default the mean over the global
batch), not of a per-rank loss. If the network that produces the embeddings is wrapped in
``DistributedDataParallel``, DDP *averages* its gradients over the ranks, which would divide them by
the world size; pass ``embedding_grad_scale=world_size`` to compensate (see docs/distributed.md).
The loss module itself must not be wrapped in DDP: its parameters differ from rank to rank.

Only ``torch.distributed`` collectives are used (``all_gather``, ``all_reduce``), so the same code
runs on gloo (CPU) and NCCL (CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .reference import reference_logits, reference_regularizer

__all__ = [
    "ShardedSoftTripleLoss",
    "sharded_softtriple_loss",
    "class_split_bounds",
    "gather_rows",
]

_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------
# dispatch to the core package (the fused logits / regulariser), or to the plain reference formula
# ----------------------------------------------------------------------------------------------

def _logits(x: torch.Tensor, fc: torch.Tensor, K: int, gamma: float, normalize: bool,
            backend: str) -> torch.Tensor:
    if backend == "reference":
        return reference_logits(x, fc, K, gamma, normalize)
    from . import softtriple_logits  # the fused op of the core package
    return softtriple_logits(x, fc, K, gamma=gamma, normalize_embeddings=normalize, backend=backend)


def _regularizer(fc: torch.Tensor, K: int, backend: str) -> torch.Tensor:
    if backend == "reference":
        return reference_regularizer(fc, K)
    from . import center_regularizer
    return center_regularizer(fc, K)


# ----------------------------------------------------------------------------------------------
# class split
# ----------------------------------------------------------------------------------------------

def class_split_bounds(num_classes: int, world_size: int,
                       class_split: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """``[(start, end)]`` per rank: the contiguous class slice each rank owns.

    ``class_split=None`` splits as evenly as possible (the first ``num_classes % world_size`` ranks
    get one class more). Otherwise ``class_split[r]`` is the number of classes of rank r; the counts
    must be positive and sum to ``num_classes``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if class_split is None:
        if num_classes < world_size:
            raise ValueError(f"cannot split {num_classes} classes over {world_size} ranks: every rank "
                             "needs at least one class")
        base, extra = divmod(num_classes, world_size)
        counts = [base + (1 if r < extra else 0) for r in range(world_size)]
    else:
        counts = [int(c) for c in class_split]
        if len(counts) != world_size:
            raise ValueError(f"class_split has {len(counts)} entries for {world_size} ranks")
        if any(c < 1 for c in counts):
            raise ValueError(f"every rank needs at least one class, got class_split={counts}")
        if sum(counts) != num_classes:
            raise ValueError(f"class_split sums to {sum(counts)}, expected num_classes={num_classes}")
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds


# ----------------------------------------------------------------------------------------------
# autograd-aware collectives
# ----------------------------------------------------------------------------------------------

def _gather_sizes(n: int, device: torch.device, group) -> list[int]:
    world = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


def _all_gather_padded(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate the first-dimension blocks of every rank (sizes may differ) in rank order."""
    max_n = max(sizes)
    t = t.contiguous()
    if t.shape[0] < max_n:
        pad = t.new_zeros((max_n - t.shape[0],) + tuple(t.shape[1:]))
        t = torch.cat([t, pad], dim=0)
    out = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(out, t, group=group)
    if all(n == max_n for n in sizes):
        return torch.cat(out, dim=0)
    return torch.cat([o[:n] for o, n in zip(out, sizes)], dim=0)


class _GatherRows(torch.autograd.Function):
    """Forward: all_gather of the rows of every rank. Backward: every rank holds a partial gradient
    for all rows (from its own classes); they are summed with all_reduce and each rank keeps its
    own rows, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x, sizes, group, grad_scale):
        rank = dist.get_rank(group)
        ctx.group = group
        ctx.start = sum(sizes[:rank])
        ctx.end = ctx.start + sizes[rank]
        ctx.grad_scale = grad_scale
        return _all_gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        g = grad[ctx.start:ctx.end]
        if ctx.grad_scale != 1.0:
            g = g * ctx.grad_scale
        return g, None, None, None


def gather_rows(x: torch.Tensor, group=None, sizes: list[int] | None = None,
                grad_scale: float = 1.0) -> torch.Tensor:
    """Autograd-aware all_gather along dim 0 (per-rank sizes may differ).

    The backward sums the gradients of all ranks (all_reduce) and returns this rank's rows: the
    right rule when every rank computes the same replicated loss from its own share of the work.
    """
    if sizes is None:
        sizes = _gather_sizes(x.shape[0], x.device, group)
    return _GatherRows.apply(x, sizes, group, float(grad_scale))


class _AllReduceSumLocalGrad(torch.autograd.Function):
    """Sum of a per-rank partial value; the backward passes the gradient to the local part only
    (each rank differentiates the same replicated total, so each local part is counted once)."""

    @staticmethod
    def forward(ctx, t, group):
        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Per-sample ``logsumexp_c z_ic - z_{i, y_i}`` with ``z = la * (S - margin * onehot(y))`` over
    class-sharded similarities ``S_local [N, C_local]``.

    ``target`` [N] holds the local column of the label where this rank owns it (0 elsewhere),
    ``owned`` [N] whether it does. The result [N] is the same on every rank. Collectives: one
    all_reduce(MAX) of the row maxima, one all_reduce(SUM) of the stacked [sum-exp, target logit].
    The backward is local: ``dS = la * g * (softmax(z) - onehot)``, with the global normaliser saved
    in the forward. One [N, C_local] tensor is kept for the backward.
    """

    @staticmethod
    def forward(ctx, S, target, owned, la, margin, group):
        rows = torch.nonzero(owned).squeeze(1)
        z = S.detach() * la
        if margin != 0.0:
            z[rows, target[rows]] -= la * margin
        row_max = z.max(dim=1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        tgt = torch.zeros_like(row_max)
        tgt[rows] = z[rows, target[rows]]
        e = z.sub_(row_max[:, None]).exp_()  # z is not needed any more: reuse its memory
        buf = torch.stack([e.sum(dim=1), tgt])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        sumexp, tgt = buf[0], buf[1]
        ctx.save_for_backward(e, sumexp, target, rows)
        ctx.la = la
        return row_max + torch.log(sumexp) - tgt

    @staticmethod
    def backward(ctx, g):
        e, sumexp, target, rows = ctx.saved_tensors
        dz = e / sumexp[:, None]
        dz[rows, target[rows]] -= 1.0
        dz.mul_((g * ctx.la)[:, None])
        return dz, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# functional form
# ----------------------------------------------------------------------------------------------

def sharded_softtriple_loss(embeddings: torch.Tensor, labels: torch.Tensor, fc_local: torch.Tensor,
                            class_start: int, num_classes: int, centers_per_class: int,
                            la: float = 20.0, gamma: float = 0.1, tau: float = 0.2,
                            margin: float = 0.01, normalize_embeddings: bool = True,
                            reduction: str = "mean", backend: str = "auto", group=None,
                            embedding_grad_scale: float = 1.0,
                            check_labels: bool = True) -> torch.Tensor:
    """SoftTriple loss of the global batch with the centers sharded by class over ``group``.

    Call it on every rank of ``group`` with that rank's ``embeddings [n_r, d]``, ``labels [n_r]``
    (global class indices) and centers ``fc_local [d, C_local * K]`` of classes
    ``[class_start, class_start + C_local)``. The slices of all ranks must tile ``[0, num_classes)``.

    Returns the same value on every rank: ``reduction="mean"``/``"sum"`` a scalar over the global
    batch (plus ``tau`` times the regulariser of all the centers), ``"none"`` the per-sample losses
    of the global batch ``[N]``, in rank order (no regulariser). Any upstream gradient must be the
    same on every rank, and every rank must run the backward.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    K = int(centers_per_class)
    if fc_local.dim() != 2 or fc_local.shape[1] % K != 0:
        raise ValueError(f"fc_local must be [d, C_local * K] with K={K}, got {tuple(fc_local.shape)}")
    c_local = fc_local.shape[1] // K
    if c_local < 1:
        raise ValueError("every rank needs at least one class")
    if embeddings.dim() != 2 or embeddings.shape[1] != fc_local.shape[0]:
        raise ValueError(f"embeddings must be [n, {fc_local.shape[0]}], got {tuple(embeddings.shape)}")
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels must be [{embeddings.shape[0]}], got {tuple(labels.shape)}")

    sizes = _gather_sizes(embeddings.shape[0], embeddings.device, group)
    x = _GatherRows.apply(embeddings, sizes, group, float(embedding_grad_scale))
    y = _all_gather_padded(labels.to(torch.int64), sizes, group)
    n_global = y.shape[0]
    if check_labels and n_global > 0:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")

    S = _logits(x, fc_local, K, gamma, normalize_embeddings, backend)  # [N, C_local]
    owned = (y >= class_start) & (y < class_start + c_local)
    target = torch.where(owned, y - class_start, torch.zeros_like(y))
    per_sample = _ShardedCrossEntropy.apply(S, target, owned, float(la), float(margin), group)

    if reduction == "none":
        return per_sample
    if n_global == 0:
        raise ValueError("the global batch is empty")
    loss = per_sample.mean() if reduction == "mean" else per_sample.sum()
    if tau > 0 and K > 1:
        # center_regularizer(fc_local) = local_sum / (C_local K (K-1)); the global normaliser is
        # C K (K-1), hence the factor C_local / C before summing the parts of all ranks.
        reg_part = _regularizer(fc_local, K, backend).to(loss.dtype) * (c_local / num_classes)
        loss = loss + tau * _AllReduceSumLocalGrad.apply(reg_part, group)
    return loss


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------

class ShardedSoftTripleLoss(nn.Module):
    """SoftTriple loss whose centers are split by class across the ranks of ``group``.

    The process group must be initialised before construction. Rank r owns the classes
    ``[class_start, class_end)`` given by :func:`class_split_bounds` (even split, or
    ``class_split=[n_0, n_1, ...]``) and holds the parameter ``fc`` of shape
    ``[embedding_size, (class_end - class_start) * centers_per_class]``: the columns
    ``class_start*K : class_end*K`` of the single-process ``SoftTripleLoss.fc``.

    ``forward(embeddings, labels)`` takes this rank's batch and returns the loss of the global batch
    (same value on every rank). Every rank must call ``backward()``. See the module docstring for the
    gradient convention and ``embedding_grad_scale``. Do not wrap this module in DDP.
    """

    def __init__(self, num_classes: int, embedding_size: int, centers_per_class: int = 10,
                 la: float = 20.0, gamma: float = 0.1, tau: float = 0.2, margin: float = 0.01,
                 normalize_embeddings: bool = True, reduction: str = "mean", backend: str = "auto",
                 group=None, class_split: Sequence[int] | None = None,
                 embedding_grad_scale: float = 1.0, check_labels: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedSoftTripleLoss needs an initialised torch.distributed process "
                               "group (torch.distributed.init_process_group)")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if centers_per_class < 1:
            raise ValueError("centers_per_class must be >= 1")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.centers_per_class = int(centers_per_class)
        self.la, self.gamma, self.tau, self.margin = float(la), float(gamma), float(tau), float(margin)
        self.normalize_embeddings = bool(normalize_embeddings)
        self.reduction = reduction
        self.backend = backend
        self.embedding_grad_scale = float(embedding_grad_scale)
        self.check_labels = bool(check_labels)
        self.bounds = class_split_bounds(self.num_classes, self.world_size, class_split)
        self.class_start, self.class_end = self.bounds[self.rank]
        self.num_local_classes = self.class_end - self.class_start
        K = self.centers_per_class
        self.fc = nn.Parameter(torch.empty(self.embedding_size, self.num_local_classes * K,
                                           device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as kaiming_uniform_(a=sqrt(5)) on the full [d, C*K] matrix (bound
        # 1/sqrt(fan_in), fan_in = C*K), which is the single-process initialisation. The ranks draw
        # from their own generators; use load_full_fc for bit-identical starting points.
        bound = 1.0 / math.sqrt(self.num_classes * self.centers_per_class)
        with torch.no_grad():
            self.fc.uniform_(-bound, bound)

    @property
    def local_columns(self) -> slice:
        """The columns of the full ``fc`` [d, C*K] that this rank holds."""
        K = self.centers_per_class
        return slice(self.class_start * K, self.class_end * K)

    @torch.no_grad()
    def load_full_fc(self, fc_full: torch.Tensor) -> None:
        """Copy this rank's columns out of a full ``[d, C*K]`` centers matrix."""
        expected = (self.embedding_size, self.num_classes * self.centers_per_class)
        if tuple(fc_full.shape) != expected:
            raise ValueError(f"fc_full must be {expected}, got {tuple(fc_full.shape)}")
        self.fc.copy_(fc_full[:, self.local_columns])

    @torch.no_grad()
    def gather_full_fc(self) -> torch.Tensor:
        """The full ``[d, C*K]`` centers matrix, assembled on every rank (for checkpoints or
        evaluation; it needs the memory of the whole matrix)."""
        K = self.centers_per_class
        sizes = [(e - s) * K for s, e in self.bounds]
        cols = _all_gather_padded(self.fc.detach().t(), sizes, self.group)
        return cols.t().contiguous()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sharded_softtriple_loss(
            embeddings, labels, self.fc, self.class_start, self.num_classes,
            self.centers_per_class, la=self.la, gamma=self.gamma, tau=self.tau, margin=self.margin,
            normalize_embeddings=self.normalize_embeddings, reduction=self.reduction,
            backend=self.backend, group=self.group,
            embedding_grad_scale=self.embedding_grad_scale, check_labels=self.check_labels)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, local_classes=[{self.class_start}, {self.class_end}), "
                f"rank={self.rank}/{self.world_size}, embedding_size={self.embedding_size}, "
                f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
                f"tau={self.tau}, margin={self.margin}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
