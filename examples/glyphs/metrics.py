"""Retrieval / clustering metrics of the deep-metric-learning protocol, computed by
pytorch-metric-learning's ``AccuracyCalculator`` (the reference implementation of "A Metric Learning
Reality Check", Musgrave et al. 2020).

Every test sample is a query against all the other test samples (leave-one-out, ``reference=None``),
cosine similarity.

* ``R@1`` = PML's ``precision_at_1``; ``R@2/4/8``: fraction of queries with at least one same-class
  sample among their k nearest neighbours (added to the calculator as ``recall_at_k`` below, on the
  calculator's own k-NN labels).
* ``MAP@R`` = PML's ``mean_average_precision_at_r``.
* ``NMI`` = PML's ``NMI``: k-means with k = number of classes on the (L2-normalised) embeddings, then
  scikit-learn's ``normalized_mutual_info_score``. The k-means is PML's default ``FaissKMeans`` (20
  iterations) when faiss is installed (``pip install faiss-cpu``), else scikit-learn's ``KMeans``
  (k-means++, one init); ``backend()`` says which.

The k-NN search is PML's ``FaissKNN`` with an inner-product index on the normalised embeddings (=
cosine) when faiss is installed, else PML's ``CustomKNN`` over ``CosineSimilarity`` in blocks (plain
torch); ``all_metrics(..., extra_labels=...)`` scores several labelings of the same embeddings with
one k-NN search.
``tests/test_glyphs.py`` checks these numbers against hand-computed cases and an independent
hand-written implementation of Recall@k and MAP@R.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

try:
    import faiss  # noqa: F401  (PML's FaissKMeans needs it)
    from pytorch_metric_learning.utils.inference import FaissKMeans
    HAVE_FAISS = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_FAISS = False

KS = (1, 2, 4, 8)


def backend() -> str:
    return "pml-accuracy-calculator+" + ("faiss-kmeans" if HAVE_FAISS else "sklearn-kmeans")


def set_threads(n: int) -> None:
    """Threads of faiss' k-means (OpenMP), to match torch's."""
    if HAVE_FAISS:
        import faiss
        faiss.omp_set_num_threads(int(n))


class _SklearnKMeans:
    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, x: torch.Tensor, k: int) -> torch.Tensor:
        from sklearn.cluster import KMeans
        lab = KMeans(n_clusters=k, n_init=1, random_state=self.seed).fit_predict(x.cpu().double().numpy())
        return torch.from_numpy(lab).long()


class GlyphAccuracyCalculator(AccuracyCalculator):
    """PML's calculator plus Recall@k (any relevant sample among the k nearest) for k = 2, 4, 8."""

    def _recall(self, k, knn_labels, query_labels, not_lone_query_mask):
        hit = (knn_labels[not_lone_query_mask, :k] == query_labels[not_lone_query_mask, None]).any(1)
        return float(hit.double().mean())

    def calculate_recall_at_2(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
        return self._recall(2, knn_labels, query_labels, not_lone_query_mask)

    def calculate_recall_at_4(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
        return self._recall(4, knn_labels, query_labels, not_lone_query_mask)

    def calculate_recall_at_8(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
        return self._recall(8, knn_labels, query_labels, not_lone_query_mask)

    def requires_knn(self):
        return super().requires_knn() + ["recall_at_2", "recall_at_4", "recall_at_8"]


_NAMES = {"precision_at_1": "R@1", "recall_at_2": "R@2", "recall_at_4": "R@4", "recall_at_8": "R@8",
          "mean_average_precision_at_r": "MAP@R", "NMI": "NMI"}


def _knn_search():
    if HAVE_FAISS:
        import faiss
        from pytorch_metric_learning.utils.inference import FaissKNN
        return FaissKNN(index_init_fn=faiss.IndexFlatIP)
    return CustomKNN(CosineSimilarity(), batch_size=2048)


class _SharedKNN:
    """One k-NN search reused for every labeling of the same embeddings: the first call (largest k)
    searches, later calls with k' <= k take the first k' neighbours."""

    def __init__(self):
        self.search, self.cached = _knn_search(), None

    def __call__(self, query, k, reference, ref_includes_query=False):
        if self.cached is None or self.cached[0] < k or self.cached[1] is not query:
            d, i = self.search(query, k, reference, ref_includes_query)
            self.cached = (k, query, d, i)
        return self.cached[2][:, :k], self.cached[3][:, :k]


def all_metrics(emb: torch.Tensor, labels, seed: int = 0, with_nmi: bool = True,
                extra_labels: dict | None = None) -> dict:
    """R@1/2/4/8, MAP@R (and NMI) of the leave-one-out retrieval of emb [N, d] with labels [N];
    extra_labels {prefix: labels [N]}: the same metrics for other labelings, keys prefixed."""
    sets = {"": torch.as_tensor(labels).long()}
    sets.update({p: torch.as_tensor(v).long() for p, v in (extra_labels or {}).items()})
    for p, lab in sets.items():
        if emb.ndim != 2 or lab.shape != (len(emb),):
            raise ValueError(f"emb / labels{p and ' ' + p}: expected emb [N, d] and labels [N], got "
                             f"{tuple(emb.shape)} and {tuple(lab.shape)}")
    include = tuple(k for k in _NAMES if with_nmi or k != "NMI")
    knn = _SharedKNN()
    x = F.normalize(emb.detach().float(), dim=1)
    out = {}
    # largest class first: its k (max class size - 1) is the largest, the others reuse its neighbours
    for p, lab in sorted(sets.items(), key=lambda t: -int(torch.bincount(t[1] - t[1].min()).max())):
        km = (FaissKMeans(niter=20, seed=1234 + seed) if HAVE_FAISS else _SklearnKMeans(seed)) if with_nmi else None
        # k = largest class size - 1 (what MAP@R needs), at least max(KS) for R@8, at most N - 1
        need = int(torch.bincount(lab - lab.min()).max()) - 1
        k = "max_bin_count" if need >= max(KS) or need >= len(lab) - 1 else min(max(KS), len(lab) - 1)
        calc = GlyphAccuracyCalculator(include=include, k=k, device=torch.device("cpu"), knn_func=knn,
                                       kmeans_func=km)
        acc = calc.get_accuracy(x, lab)
        out.update({p + _NAMES[k]: float(acc[k]) for k in include})
    return out


def retrieval_metrics(emb: torch.Tensor, labels) -> dict:
    """R@k and MAP@R only (no clustering)."""
    return all_metrics(emb, labels, with_nmi=False)


def neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [N, k] of the k nearest other samples (cosine), self excluded."""
    x = F.normalize(emb.detach().float(), dim=1)
    return _knn_search()(x, k, x, ref_includes_query=True)[1]
