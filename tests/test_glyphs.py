"""Tests of the glyph-retrieval example (examples/glyphs): metrics on hand-checkable cases, the font
filters, and an offline smoke run on the fonts that ship inside matplotlib (no network, no apt)."""

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

GLYPHS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "glyphs")
sys.path.insert(0, GLYPHS)

import build_dataset  # noqa: E402
import metrics  # noqa: E402
import train  # noqa: E402


def _unit(deg):
    r = np.radians(np.asarray(deg, float))
    return torch.tensor(np.stack([np.cos(r), np.sin(r)], 1), dtype=torch.float32)


def test_retrieval_metrics_hand_case():
    # class 0 at 0, 20, 80 degrees; class 1 at 90, 110 degrees. Neighbour lists by angle:
    #   0: 20(+) 80(+)           -> R=2, AP@R 1,   R@1 1
    #  20: 0(+) 80(+)            -> R=2, AP@R 1,   R@1 1
    #  80: 90(-) 110(-) 20 0     -> R=2, AP@R 0,   R@1 0, R@2 0, R@4 1
    #  90: 80(-) 110(+)          -> R=1, AP@R 0,   R@1 0, R@2 1
    # 110: 90(+)                 -> R=1, AP@R 1,   R@1 1
    emb = _unit([0, 20, 80, 90, 110]) * torch.tensor([[1.0], [3.0], [0.5], [2.0], [1.0]])  # cosine: scale-free
    lab = torch.tensor([0, 0, 0, 1, 1])
    m = metrics.retrieval_metrics(emb, lab, ks=(1, 2, 4))
    assert m["R@1"] == pytest.approx(0.6)
    assert m["R@2"] == pytest.approx(0.8)
    assert m["R@4"] == pytest.approx(1.0)
    assert m["MAP@R"] == pytest.approx(0.6)


def test_map_at_r_partial_credit():
    # angles 0(a) 10(b) 25(a) 45(a). Class a has R=2, class b R=0 (no MAP@R term, but counts in R@k).
    #   0: 10(-) 25(+) 45(+) -> (0 + 1/2) / 2 = 0.25
    #  25: 10(-) 45(+) 0(+)  -> 0.25
    #  45: 25(+) 10(-) 0(+)  -> (1 + 0) / 2 = 0.5
    #  10: 0(-)              -> R@1 0
    m = metrics.retrieval_metrics(_unit([0, 10, 25, 45]), torch.tensor([0, 1, 0, 0]), ks=(1,))
    assert m["MAP@R"] == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    assert m["R@1"] == pytest.approx(0.25)


def test_nmi_hand_cases():
    assert metrics.nmi([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    assert metrics.nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # a = 000111, b = 001122: I = (2/3) ln 2, H(a) = ln 2, H(b) = ln 3
    expected = (2 / 3) * math.log(2) / ((math.log(2) + math.log(3)) / 2)
    assert metrics.nmi([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(expected)


def test_nmi_matches_sklearn_if_available():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 7, 300), rng.integers(0, 5, 300)
    b[:150] = a[:150] % 5
    assert metrics.nmi(a, b) == pytest.approx(sk.normalized_mutual_info_score(a, b), abs=1e-10)


def test_kmeans_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 8, generator=g) * 10
    lab = torch.arange(6).repeat_interleave(20)
    x = centers[lab] + 0.1 * torch.randn(120, 8, generator=g)
    assert metrics.nmi(lab.numpy(), metrics.kmeans(x, 6, seed=1).numpy()) == pytest.approx(1.0)


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
    pml = pytest.importorskip("pytorch_metric_learning")  # noqa: F841
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
