"""Tests of the glyph-retrieval example (examples/glyphs): the metrics (PML's AccuracyCalculator) on
hand-checkable cases and against an independent hand-written implementation, the distinct-centers count
against scipy's connected components, the union classes, the font filters, and offline smoke runs on the
fonts that ship inside matplotlib (no network, no apt)."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")
pytest.importorskip("fontTools")
pytest.importorskip("pytorch_metric_learning")  # the metrics are PML's AccuracyCalculator

GLYPHS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "glyphs")
sys.path.insert(0, GLYPHS)

import build_dataset  # noqa: E402
import metrics  # noqa: E402
import train  # noqa: E402


def _unit(deg):
    r = np.radians(np.asarray(deg, float))
    return torch.tensor(np.stack([np.cos(r), np.sin(r)], 1), dtype=torch.float32)


def _hand_retrieval(emb, labels, ks=(1, 2, 4, 8)):
    """Independent brute-force Recall@k / MAP@R (cosine, leave-one-out; queries without another sample
    of their class are left out, as in PML)."""
    x = emb.double() / emb.double().norm(dim=1, keepdim=True)
    sim = x @ x.t()
    sim.fill_diagonal_(-math.inf)
    order = sim.argsort(1, descending=True)
    out = {f"R@{k}": [] for k in ks}
    out["MAP@R"] = []
    for i in range(len(labels)):
        rel = (labels[order[i, :-1]] == labels[i]).double()
        R = int(rel.sum())
        if R == 0:
            continue
        for k in ks:
            out[f"R@{k}"].append(float(rel[:k].max()))
        prec = rel.cumsum(0) / torch.arange(1, len(rel) + 1)
        out["MAP@R"].append(float((prec * rel)[:R].sum() / R))
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_retrieval_metrics_hand_case():
    # class 0 at 0, 20, 80 degrees; class 1 at 90, 110 degrees. Neighbour lists by angle:
    #   0: 20(+) 80(+)           -> R=2, AP@R 1,   R@1 1
    #  20: 0(+) 80(+)            -> R=2, AP@R 1,   R@1 1
    #  80: 90(-) 110(-) 20 0     -> R=2, AP@R 0,   R@1 0, R@2 0, R@4 1
    #  90: 80(-) 110(+)          -> R=1, AP@R 0,   R@1 0, R@2 1
    # 110: 90(+)                 -> R=1, AP@R 1,   R@1 1
    emb = _unit([0, 20, 80, 90, 110]) * torch.tensor([[1.0], [3.0], [0.5], [2.0], [1.0]])  # cosine: scale-free
    lab = torch.tensor([0, 0, 0, 1, 1])
    m = metrics.retrieval_metrics(emb, lab)
    assert m["R@1"] == pytest.approx(0.6)
    assert m["R@2"] == pytest.approx(0.8)
    assert m["R@4"] == pytest.approx(1.0)
    assert m["MAP@R"] == pytest.approx(0.6)


def test_map_at_r_partial_credit_and_lone_query():
    # angles 0(a) 10(b) 25(a) 45(a). Class a has R=2; b is alone (no other b): left out, as PML does.
    #   0: 10(-) 25(+) 45(+) -> AP@R (0 + 1/2) / 2 = 0.25, R@1 0
    #  25: 10(-) 45(+) 0(+)  -> 0.25, R@1 0
    #  45: 25(+) 10(-) 0(+)  -> (1 + 0) / 2 = 0.5, R@1 1
    m = metrics.retrieval_metrics(_unit([0, 10, 25, 45]), torch.tensor([0, 1, 0, 0]))
    assert m["MAP@R"] == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    assert m["R@1"] == pytest.approx(1 / 3)


def test_metrics_match_hand_written_implementation():
    g = torch.Generator().manual_seed(0)
    lid = torch.arange(40).repeat_interleave(12)[torch.randperm(480, generator=g)]
    emb = torch.randn(40, 8, generator=g)[lid] * 0.7 + torch.randn(480, 8, generator=g)
    union = torch.randperm(40, generator=g)[lid] // 4  # unions of 4 identities, as with merge=4
    got = metrics.all_metrics(emb, union, with_nmi=False, extra_labels={"id_": lid})
    for prefix, lab in (("", union), ("id_", lid)):
        ref = _hand_retrieval(emb, lab)
        for k, v in ref.items():
            assert got[prefix + k] == pytest.approx(v, abs=1e-6), (prefix, k)
    assert got["MAP@R"] != pytest.approx(got["id_MAP@R"])  # the two labelings are really scored apart


def test_nmi_separates_structure_from_noise():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 8, generator=g) * 10
    lab = torch.arange(6).repeat_interleave(20)
    x = centers[lab] + 0.1 * torch.randn(120, 8, generator=g)
    noise = torch.randn(120, 8, generator=g)
    # PML's default FaissKMeans (random init, one run) may merge two blobs (NMI ~0.90), hence > 0.85
    assert metrics.all_metrics(x, lab)["NMI"] > 0.85
    assert metrics.all_metrics(noise, lab)["NMI"] < 0.3
    sk = pytest.importorskip("sklearn.metrics")  # the fallback k-means (k-means++) finds all six blobs
    pred = metrics._SklearnKMeans(0)(torch.nn.functional.normalize(x, dim=1), 6)
    assert sk.normalized_mutual_info_score(lab.numpy(), pred.numpy()) == pytest.approx(1.0)


def test_effective_centers_constructed_and_vs_scipy():
    K, d = 6, 5
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=1)
    # class 0: three well-separated directions, each twice (copies 1e-3 apart);
    # class 1: a chain a-b-c with steps of ~0.08 (a-c ~0.16) plus three far centers
    c0 = torch.cat([base, base + 1e-3 * torch.randn(3, d, generator=g)])
    e = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    r = torch.randn(d, generator=g)
    f = torch.nn.functional.normalize(r - (r @ e) * e, dim=0)  # orthogonal to e
    chain = torch.stack([torch.cos(torch.tensor(t)) * e + torch.sin(torch.tensor(t)) * f for t in (0.0, 0.08, 0.16)])
    c1 = torch.cat([chain, -chain[:1], torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=1)])
    fc = torch.cat([c0, c1]).t() * 3.0  # column norms do not matter
    n = train.effective_centers(fc, K, 0.05)
    assert n[0] == 3  # copies merged, directions apart
    assert train.effective_centers(fc, K, 1e-5)[0] == 6
    assert train.effective_centers(fc, K, 2.01).tolist() == [1, 1]
    assert train.effective_centers(fc, K, 0.1)[1] <= 4  # the chain a-b-c is one center (transitive)
    assert train.effective_centers(fc, K, 0.07)[1] == 6
    # random centers, random thresholds: same count as scipy's connected components
    csgraph = pytest.importorskip("scipy.sparse.csgraph")
    for seed in range(5):
        gg = torch.Generator().manual_seed(seed)
        C, K2 = 7, 8
        fc = torch.randn(4, C * K2, generator=gg)
        thr = float(0.3 + 1.2 * torch.rand(1, generator=gg))
        got = train.effective_centers(fc, K2, thr)
        w = torch.nn.functional.normalize(fc, dim=0).t().reshape(C, K2, 4)
        for c in range(C):
            adj = (torch.cdist(w[c], w[c]) < thr).numpy()
            assert got[c] == csgraph.connected_components(adj, directed=False)[0]


def test_center_stats_own_centers():
    # 2 classes x K=3; class 0 = identities 0, 1 on centers 0 and 1; class 1 = identities 2, 3 both on center 0
    K = 3
    w = torch.eye(6)  # centers: class 0 -> e0 e1 e2, class 1 -> e3 e4 e5
    y_id = np.repeat([0, 1, 2, 3], 10)
    y = y_id // 2
    emb = torch.stack([w[:, {0: 0, 1: 1, 2: 3, 3: 3}[i]] for i in y_id]) + 0.01
    s = train.center_stats(w, K, emb, y, y_id)
    assert s["used"] == pytest.approx((2 + 1) / 2)
    assert s["identities_with_own_center"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert s["distinct@0.4"] == 3.0


def test_union_labels():
    cls = train.union_labels(12, 4, np.random.default_rng(0))
    assert sorted(np.bincount(cls).tolist()) == [4, 4, 4]
    assert not np.array_equal(cls, np.arange(12) // 4)  # a random grouping
    with pytest.raises(ValueError, match="merge"):
        train.union_labels(10, 4, np.random.default_rng(0))


def test_distort_is_seeded_and_bounded():
    x = torch.rand(5, 1, 32, 32)
    a = train.distort(x, torch.Generator().manual_seed(3), 16)
    b = train.distort(x, torch.Generator().manual_seed(3), 16)
    assert a.shape == (5, 1, 16, 16) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, train.distort(x, torch.Generator().manual_seed(4), 16))


def test_ci95_hand_value():
    import multimodal
    m, h, n = multimodal.ci95([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.3027
    assert (m, n) == (2.0, 3) and h == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)


@pytest.fixture(scope="module")
def mpl_data(tmp_path_factory):
    return build_dataset.load_or_build("mpl", size=32, cache=str(tmp_path_factory.mktemp("glyphcache")),
                                       verbose=False)


def test_mpl_dataset_filters(mpl_data):
    fonts = [os.path.basename(f) for f in mpl_data["fonts"]]
    assert len(mpl_data["chars"]) == 62
    assert len(fonts) >= 10
    for bad in ("cmsy10.ttf", "cmex10.ttf", "LastResortHE-Regular.ttf"):  # symbol / fallback fonts
        assert bad not in fonts
    imgs, lab, fid = mpl_data["images"], mpl_data["labels"], mpl_data["font_ids"]
    assert imgs.dtype == np.uint8 and imgs.shape[1:] == (32, 32)
    chars = "".join(mpl_data["chars"])
    # fixed baseline and per-font scale: the lower-case c, o, s, x differ from their capitals
    for f in np.unique(fid):
        for ch in "cosx":
            lo = imgs[(fid == f) & (lab == chars.index(ch))][0].astype(float)
            up = imgs[(fid == f) & (lab == chars.index(ch.upper()))][0].astype(float)
            assert np.abs(lo - up).sum() / (lo.sum() + up.sum()) > 0.1
    # no two kept fonts are near-duplicates
    assert build_dataset.near_duplicates(np.stack([imgs[fid == f] for f in np.unique(fid)]), 0.05).all()


def test_our_loss_matches_pml_and_reference():
    torch.manual_seed(0)
    emb, y = torch.randn(32, 16, dtype=torch.float64), torch.randint(0, 7, (32,))
    vals = {}
    for kind in ("ours", "reference", "pml"):
        L = train.make_loss(kind, 7, 16, 3, 20.0, 0.1, 0.2, 0.01).double()
        train.init_centers(L.fc, 0)
        L.fc.data = L.fc.data.double()
        vals[kind] = float(L(emb, y).detach())
    assert vals["ours"] == pytest.approx(vals["reference"], rel=1e-9)
    assert vals["ours"] == pytest.approx(vals["pml"], rel=1e-6)


def test_coincident_centers_keep_finite_gradients():
    # the adaptive-centers regime: two centers of a class coincide. Our regulariser's 1e-5 under the square
    # root keeps the gradient finite (PML's float-tiny one is absorbed by 2 + tiny == 2 in fp32 and gives
    # NaN gradients in such cases: its SoftTriple run diverged in the multi-modal experiment)
    for t in range(20):
        torch.manual_seed(t)
        L = train.make_loss("ours", 3, 8, 4, 20.0, 0.1, 0.2, 0.01)
        with torch.no_grad():
            L.fc[:, 1] = L.fc[:, 0]
        L(torch.randn(16, 8), torch.randint(0, 3, (16,))).backward()
        assert torch.isfinite(L.fc.grad).all()


def test_smoke_training_on_matplotlib_fonts(mpl_data):
    cfg = train.Config(set="mpl", loss="ours", K=3, steps=40, batch=64, width=8, emb_dim=32, seed=0,
                       lr=3e-3, eval_every=0)
    r = train.train(cfg, mpl_data, log_every=0)
    loss = np.array(r["history"]["loss"])
    assert np.isfinite(loss).all()
    assert loss[-8:].mean() < 0.8 * loss[:8].mean()
    chance = 1.0 / r["classes_test"]
    assert r["final"]["R@1"] > max(0.3, 5 * chance)
    assert 0.0 < r["final"]["MAP@R"] <= 1.0 and 0.0 < r["final"]["NMI"] <= 1.0


def test_smoke_multimodal_protocol(mpl_data):
    # unions of 2 characters on 60 of the 62 characters (30 train / 30 test identities), 16 x 16 pixels
    # (light augmentation: the strong distortion needs far more than a smoke run's steps to learn)
    keep = mpl_data["labels"] < 60
    data = dict(mpl_data, images=mpl_data["images"][keep], labels=mpl_data["labels"][keep],
                font_ids=mpl_data["font_ids"][keep], chars=mpl_data["chars"][:60])
    cfg = train.Config(set="mpl", loss="ours", K=2, tau=0.2, merge=2, res=16, steps=40, batch=64, width=8,
                       emb_dim=32, seed=0, lr=3e-3, eval_every=20, eval_subset_classes=10)
    r = train.train(cfg, data, log_every=0)
    assert r["classes_train"] == 15 and r["classes_test"] == 15
    loss = np.array(r["history"]["loss"])
    assert loss[-8:].mean() < 0.8 * loss[:8].mean()
    f = r["final"]
    assert f["id_R@1"] > max(0.3, 5 / 30)  # identities: 30 test characters
    assert f["MAP@R"] < f["id_MAP@R"]  # unions of unseen characters cannot be learned: lower MAP@R
    assert r["history"]["eval_step"] == [20, 40] and len(r["history"]["eval_id_MAP@R"]) == 2
    c = r["centers"]
    assert 1 <= c["distinct@0.01"] <= 2 and sum(c["distinct@0.01_hist"]) == 15
