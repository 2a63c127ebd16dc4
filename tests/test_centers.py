"""Adaptive centers: effective_centers / center_components / merge_centers and the module's prune_centers, on
constructed centers with known clusters (exact counts), at the threshold boundary, against a union-find oracle
written here, and the equivalences prune_centers documents."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softtriple_triton as st
from softtriple_triton.centers import DEFAULT_MERGE_THRESHOLD, center_components, effective_centers, merge_centers


def clustered_fc(sizes_per_class, d=16, noise=0.0, seed=0):
    """fc [d, C*K]: class c's K = sum(sizes) centers are len(sizes) random directions, each repeated size times
    (+ noise, then a random positive scale per column: the loss normalises columns). Returns (fc, component id
    of every center as (class, cluster))."""
    g = torch.Generator().manual_seed(seed)
    cols, truth = [], []
    for c, sizes in enumerate(sizes_per_class):
        for j, n in enumerate(sizes):
            u = F.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
            for _ in range(n):
                v = u + noise * torch.randn(d, generator=g, dtype=torch.float64)
                cols.append(v * (0.5 + torch.rand((), generator=g, dtype=torch.float64)))
                truth.append((c, j))
    return torch.stack(cols, 1), truth


def union_find_counts(fc, K, threshold):
    """The oracle: per class, union-find over all pairs with numpy distances of the normalised columns."""
    w = fc.detach().double().numpy()
    w = w / np.maximum(np.linalg.norm(w, axis=0), 1e-12)
    counts = []
    for c in range(fc.shape[1] // K):
        parent = list(range(K))

        def find(i, parent=parent):
            while parent[i] != i:
                i = parent[i]
            return i

        for i in range(K):
            for j in range(i + 1, K):
                if np.linalg.norm(w[:, c * K + i] - w[:, c * K + j]) < threshold:
                    parent[find(i)] = find(j)
        counts.append(len({find(i) for i in range(K)}))
    return counts


# --------------------------------------------------------------------------- counts

@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_known_clusters_exact_counts(noise):
    sizes = [[6], [3, 3], [2, 2, 2], [1, 1, 1, 1, 1, 1], [4, 1, 1]]
    fc, _ = clustered_fc(sizes, noise=noise)
    expected = [len(s) for s in sizes]
    for t in (0.05, DEFAULT_MERGE_THRESHOLD, 0.5):
        assert effective_centers(fc, 6, t).tolist() == expected
        assert effective_centers(fc.float(), 6, t).tolist() == expected  # fp32 centers: computed in fp64
    assert effective_centers(fc, 6, 0.0).tolist() == [6] * 5  # nothing is closer than 0
    assert effective_centers(fc, 6, 2.5).tolist() == [1] * 5  # unit vectors are at most 2 apart
    out = effective_centers(fc, 6, 0.1)
    assert out.dtype == torch.int64 and out.shape == (5,)


def test_components_are_transitive():
    """A chain of centers, each 0.1 rad from the next: merged at a threshold above one step's chord, even though
    the ends are far apart; split into singletons below it."""
    K, step = 8, 0.1
    ang = torch.arange(K, dtype=torch.float64) * step
    fc = torch.zeros(3, K, dtype=torch.float64)
    fc[0], fc[1] = torch.cos(ang), torch.sin(ang)
    chord = 2 * math.sin(step / 2)
    assert center_components(fc, K, chord * 1.001).tolist() == [[0] * K]
    assert effective_centers(fc, K, chord * 0.999).tolist() == [K]
    assert 2 * math.sin((K - 1) * step / 2) > 0.6  # the ends are far apart: only transitivity joins them


def test_threshold_boundary_is_strict():
    """Distances that are exact in binary: e0, (1,1,1,1)/2 and (1,1,1,-1)/2 are pairwise at distance exactly 1,
    e0 and e1 at sqrt(2). A pair at exactly the threshold stays two centers; one ulp more merges it."""
    e = torch.eye(4, dtype=torch.float64)
    h1 = torch.tensor([1.0, 1, 1, 1], dtype=torch.float64)   # normalises to (1,1,1,1)/2 exactly
    h2 = torch.tensor([1.0, 1, 1, -1], dtype=torch.float64) * 3
    fc = torch.stack([e[0], h1, h2, e[0] * 7], 1)  # one class, K = 4; columns 0 and 3 coincide
    assert center_components(fc, 4, 1.0).tolist() == [[0, 1, 2, 0]]
    assert effective_centers(fc, 4, 1.0).tolist() == [3]
    assert effective_centers(fc, 4, math.nextafter(1.0, 2.0)).tolist() == [1]
    pair = torch.stack([e[0], e[1]], 1)
    assert effective_centers(pair, 2, math.sqrt(2)).tolist() == [2]
    assert effective_centers(pair, 2, math.nextafter(math.sqrt(2), 2.0)).tolist() == [1]
    assert effective_centers(fc, 4, 0.0).tolist() == [4]  # identical columns: distance 0 is not < 0
    assert effective_centers(fc, 4, 1e-300).tolist() == [3]


@pytest.mark.parametrize("seed", range(4))
def test_counts_match_a_union_find_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    C, K, d = 12, 8, 5
    fc = torch.randn(d, C * K, generator=g, dtype=torch.float64)
    fc[:, 1::2] = fc[:, 0::2] + 0.3 * torch.randn(d, C * K // 2, generator=g, dtype=torch.float64)  # near pairs
    for t in (0.3, 0.7, 1.0, 1.3):
        assert effective_centers(fc, K, t).tolist() == union_find_counts(fc, K, t), t


def test_module_effective_centers_and_bad_arguments():
    fc, _ = clustered_fc([[2, 1], [3]], d=8)
    m = st.SoftTripleLoss(2, 8, 3)
    m.load_state_dict({"fc": fc.float()})
    assert m.effective_centers().tolist() == [2, 1]
    assert m.effective_centers(0.0).tolist() == [3, 3]
    for bad in (-0.1, float("nan"), float("inf"), True, "0.1", None):
        with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
            effective_centers(fc, 3, bad)
    with pytest.raises(ValueError, match="not a positive multiple of centers_per_class=4"):
        effective_centers(fc, 4, 0.1)
    with pytest.raises(ValueError, match="fc must be a 2-D floating-point tensor"):
        effective_centers(fc[0], 3, 0.1)
    with pytest.raises(ValueError, match="fc must be a 2-D floating-point tensor"):
        effective_centers(fc.long(), 3, 0.1)
    with pytest.raises(ValueError, match="centers_per_class must be a positive integer"):
        effective_centers(fc, 0, 0.1)


def test_many_classes_in_blocks(monkeypatch):
    """More classes than one block holds: the blocks are stitched correctly (oracle: the known clusters)."""
    import softtriple_triton.centers as centers

    monkeypatch.setattr(centers, "_BLOCK_ELEMENTS", 5 * 4 * 4)  # 5 classes per block, 35 classes
    sizes = [[2, 2], [4], [1, 3], [1, 1, 1, 1], [2, 1, 1], [3, 1], [1, 2, 1]] * 5
    fc, _ = clustered_fc(sizes, d=4, noise=1e-4, seed=3)
    assert effective_centers(fc, 4, 0.1).tolist() == [len(s) for s in sizes]
    out, k = merge_centers(fc, 4, 0.1)
    assert k == 4 and torch.equal(effective_centers(out, 4, 0.1), effective_centers(fc, 4, 0.1))


# --------------------------------------------------------------------------- prune_centers

def module_with(fc, K, **kw):
    m = st.SoftTripleLoss(fc.shape[1] // K, fc.shape[0], K, backend="reference", **kw).double()
    m.load_state_dict({"fc": fc})
    return m


@pytest.mark.parametrize("sizes,k_new", [
    ([[6], [6], [6]], 1),                       # every class collapsed to one center
    ([[3, 3], [6], [3, 3]], 2),                 # component sizes proportional to the copies (1:1, 2)
    ([[2, 2, 2, 2], [6, 2], [8], [4, 4]], 4),   # copies (1,1,1,1), (3,1), (4), (2,2): proportional again
])
def test_prune_is_exact_for_identical_centers_with_proportional_copies(sizes, k_new):
    fc, _ = clustered_fc(sizes, d=12, noise=0.0, seed=1)
    K = sum(sizes[0])
    m = module_with(fc, K, gamma=0.1)
    before = fc.clone()
    p = m.prune_centers(0.1)
    assert torch.equal(m.fc.data, before)  # the original is not modified
    assert p.centers_per_class == k_new and p.fc.shape == (12, len(sizes) * k_new)
    assert (p.num_classes, p.la, p.gamma, p.tau, p.margin, p.backend) == (m.num_classes, m.la, m.gamma, m.tau,
                                                                          m.margin, m.backend)
    assert p.fc.dtype == torch.float64
    x = torch.randn(40, 12, dtype=torch.float64)
    assert (m.get_logits(x) - p.get_logits(x)).abs().max() < 1e-12
    assert p.effective_centers(0.1).tolist() == m.effective_centers(0.1).tolist()
    y = torch.randint(0, len(sizes), (40,))
    m.tau = p.tau = 0.0  # without the regulariser (which counts pairs) the classification loss is the same too
    assert abs(m(x, y).item() - p(x, y).item()) < 1e-12


def test_prune_with_nothing_merged_keeps_the_normalised_centers():
    fc, _ = clustered_fc([[1] * 5, [1] * 5], d=9, seed=2)
    m = module_with(fc, 5)
    p = m.prune_centers(0.0)
    assert p.centers_per_class == 5
    assert torch.allclose(p.fc, F.normalize(fc, dim=0), rtol=0, atol=1e-15)
    x = torch.randn(7, 9, dtype=torch.float64)
    assert (m.get_logits(x) - p.get_logits(x)).abs().max() < 1e-12


def test_prune_near_identical_centers_bounds_the_largest_similarity():
    """Not identical (noise 1e-3): the largest similarity to a class's centers moves by at most the largest
    distance of a center to its merged center; and proportions that integers cannot hold ((4, 1, 1) in 3 slots)
    are what makes get_logits differ more."""
    sizes = [[4, 1, 1], [2, 2, 2], [6]]
    fc, truth = clustered_fc(sizes, d=10, noise=1e-3, seed=4)
    K = 6
    m = module_with(fc, K)
    p = m.prune_centers(0.1)
    assert p.centers_per_class == 3
    w = F.normalize(fc, dim=0)
    merged = {}
    for (c, j) in set(truth):
        cols = [i for i, t in enumerate(truth) if t == (c, j)]
        merged[(c, j)] = F.normalize(w[:, cols].sum(1), dim=0)
    r = max((w[:, i] - merged[t]).norm().item() for i, t in enumerate(truth))
    assert 0 < r < 0.01
    x = F.normalize(torch.randn(50, 10, dtype=torch.float64), dim=1)
    s_before = (x @ w).view(50, 3, K).amax(2)
    s_after = (x @ F.normalize(p.fc, dim=0)).view(50, 3, 3).amax(2)
    assert (s_before - s_after).abs().max() <= r + 1e-12
    # the classes whose copies are proportional stay within ~r in get_logits too; class 0 (4:1:1 -> 1:1:1) not
    diff = (m.get_logits(x) - p.get_logits(x)).abs().amax(0)
    assert diff[1] <= r and diff[2] <= r
    assert diff[0] > 10 * r


def test_merge_centers_functional_layout():
    """Columns of class c are c*K'..c*K'+K'-1, components in the order of their smallest original index."""
    e = torch.eye(3, dtype=torch.float64)
    fc = torch.stack([e[1], e[0], e[1] * 2, e[2], e[2], e[2]], 1)  # class 0: e1, e0, e1; class 1: e2 x 3
    out, k = merge_centers(fc, 3, 0.1)
    assert k == 2
    expect = torch.stack([e[1], e[0], e[2], e[2]], 1)
    assert torch.equal(out, expect)
