"""Train a small CNN glyph embedding with SoftTriple on the first half of the classes, evaluate
retrieval on the unseen second half (Recall@1/2/4/8, MAP@R, NMI through pytorch-metric-learning's
AccuracyCalculator, see metrics.py).

    python train.py --set kanji --steps 600 --K 10 --tau 0.2 --seed 0
    python train.py --res 16 --aug strong --test-distort 1 --merge 4 --K 4   # the multi-modal protocol

Classes and identities: every character (glyph identity) of the first half of the code-point order is a
training identity, of the second half a test identity. With ``--merge m`` every class is the union of m
distinct identities (a random grouping within each half, drawn from the run seed), so a class has m
modes; the test metrics are reported for the union labels and (``id_*``) for the identities.

Losses (``--loss``):
* ``ours``      ``softtriple_triton.SoftTripleLoss`` (backend "auto").
* ``reference`` ``softtriple_triton.reference.reference_softtriple_loss`` (the plain formula, wrapped).
* ``pml``       ``pytorch_metric_learning.losses.SoftTripleLoss`` (+ ``SparseCentersRegularizer`` with
                weight tau when tau > 0 and K > 1). PML normalises embeddings and centers (cosine
                similarity) exactly like ours with ``normalize_embeddings=True``.

All three get the same initial centers (kaiming-uniform from a generator seeded by the run seed), the
same network init and the same batch / augmentation stream, so runs are comparable step by step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
_ROOT = os.path.dirname(os.path.dirname(HERE))
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

import build_dataset  # noqa: E402
import metrics  # noqa: E402


@dataclasses.dataclass
class Config:
    set: str = "kanji"
    num_classes: int = 1000          # kanji only: total classes; first half train, second half test
    size: int = 32
    loss: str = "ours"               # ours | reference | pml
    K: int = 10
    la: float = 20.0
    gamma: float = 0.1
    tau: float = 0.2
    margin: float = 0.01
    emb_dim: int = 64
    width: int = 16
    steps: int = 600
    batch: int = 256
    lr: float = 2e-3
    lr_centers: float = 1e-2
    weight_decay: float = 1e-4
    augment: bool = True
    aug: str = "light"               # light (small affine) | strong (see distort()); training batches
    res: int = 0                     # network input resolution (images downsampled from size); 0 = size
    test_distort: bool = False       # distort the test images once (fixed generator) like --aug strong
    merge: int = 1                   # m: identities per class (classes = unions of m random characters)
    seed: int = 0
    eval_every: int = 0              # >0: evaluate R@1 / MAP@R on a fixed test subset every n steps
    eval_subset_classes: int = 200   # identities of the learning-curve subset (whole unions)
    threads: int = 1
    init_perturb: float = 0.0        # >0: multiply the initial centers by (1 + this), e.g. 1 ulp (control)
    shadow_loss: str = ""            # "pml" / "reference": also evaluate this loss (same inputs, same centers)
    shadow_every: int = 10           # ... every n steps, recording loss and gradient differences


# ----------------------------------------------------------------------------------------------

class GlyphNet(nn.Module):
    """Five 3x3 conv layers (w, 2w, 2w, 4w, 4w channels; 3 max-pools), flatten, linear -> emb."""

    def __init__(self, emb_dim: int = 64, width: int = 32, size: int = 32):
        super().__init__()
        w = width

        def blk(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *blk(1, w), nn.MaxPool2d(2),
            *blk(w, 2 * w), *blk(2 * w, 2 * w), nn.MaxPool2d(2),
            *blk(2 * w, 4 * w), *blk(4 * w, 4 * w), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(4 * w * (size // 8) ** 2, emb_dim)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class ReferenceLoss(nn.Module):
    """The plain formula as a module with the same parameter layout as ours / PML."""

    def __init__(self, num_classes, embedding_size, centers_per_class, la, gamma, tau, margin):
        super().__init__()
        from softtriple_triton.reference import reference_softtriple_loss
        self._f = reference_softtriple_loss
        self.K, self.la, self.gamma, self.tau, self.margin = centers_per_class, la, gamma, tau, margin
        self.fc = nn.Parameter(torch.empty(embedding_size, num_classes * centers_per_class))

    def forward(self, emb, labels):
        return self._f(emb, self.fc, labels, self.K, self.la, self.gamma, self.tau, self.margin)


def make_loss(kind: str, C: int, d: int, K: int, la: float, gamma: float, tau: float, margin: float):
    if kind == "ours":
        import softtriple_triton
        loss = softtriple_triton.SoftTripleLoss(C, d, centers_per_class=K, la=la, gamma=gamma, tau=tau,
                                                margin=margin, normalize_embeddings=True)
    elif kind == "reference":
        loss = ReferenceLoss(C, d, K, la, gamma, tau, margin)
    elif kind == "pml":
        from pytorch_metric_learning import losses, regularizers
        kw = {}
        if tau > 0 and K > 1:
            kw = dict(weight_regularizer=regularizers.SparseCentersRegularizer(C, K), weight_reg_weight=tau)
        loss = losses.SoftTripleLoss(C, d, centers_per_class=K, la=la, gamma=gamma, margin=margin, **kw)
    else:
        raise ValueError(kind)
    return loss


def init_centers(fc: torch.Tensor, seed: int):
    """Same init as PML / ours (kaiming_uniform_(a=sqrt(5)) on the [d, C*K] tensor), but seeded
    independently so every loss implementation starts from identical centers."""
    g = torch.Generator().manual_seed(10_000 + seed)
    fan_in = fc.shape[1]
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))
    with torch.no_grad():
        fc.copy_(torch.rand(fc.shape, generator=g) * 2 * bound - bound)


def _affine(x: torch.Tensor, g: torch.Generator, scale, rot_deg, shear, shift_px, aspect=0.0) -> torch.Tensor:
    """Random affine per image: scale in [1-scale[0], 1+scale[1]], rotation +-rot_deg, shear +-shear,
    shift +-shift_px pixels, aspect ratio +-aspect."""
    n = x.shape[0]
    s = 1 - scale[0] + (scale[0] + scale[1]) * torch.rand(n, generator=g)
    a = 1 + (torch.rand(n, generator=g) - 0.5) * 2 * aspect
    r = (torch.rand(n, generator=g) - 0.5) * (2 * math.radians(rot_deg))
    sh = (torch.rand(n, generator=g) - 0.5) * 2 * shear
    t = (torch.rand(n, 2, generator=g) - 0.5) * (4.0 * shift_px / x.shape[-1])
    cos, sin = torch.cos(r) / s, torch.sin(r) / s
    theta = torch.stack([torch.stack([cos * a, -sin + sh, t[:, 0]], 1), torch.stack([sin, cos / a, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Light: small random affine (scale 0.9-1.1, rotation +-6 deg, shear +-0.1, shift +-2 px)."""
    return _affine(x, g, (0.1, 0.1), 6.0, 0.1, 2.0)


def distort(x: torch.Tensor, g: torch.Generator, res: int) -> torch.Tensor:
    """Strong distortion of [n, 1, S, S] glyphs in [0, 1] (S = the rendering size), then downsampled to
    res x res: affine (scale 0.8-1.15, aspect +-12%, rotation +-12 deg, shear +-0.2, shift +-3 px at 32),
    stroke weight (a random blend towards the 3x3 dilation or erosion, weight in [-0.6, 0.6]), contrast
    0.6-1.0 and Gaussian pixel noise (sigma 0.08) at the final resolution."""
    n = x.shape[0]
    x = _affine(x, g, (0.2, 0.15), 12.0, 0.2, 3.0 * x.shape[-1] / 32, aspect=0.12)
    b = ((torch.rand(n, generator=g) - 0.5) * 1.2).view(n, 1, 1, 1)
    dil = F.max_pool2d(x, 3, 1, 1)
    ero = -F.max_pool2d(-x, 3, 1, 1)
    x = x + b.clamp(min=0) * (dil - x) + (-b).clamp(min=0) * (ero - x)
    x = downsample(x, res)
    c = 0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    x = x * c + 0.08 * torch.randn(x.shape, generator=g)
    return x.clamp_(0.0, 1.0)


def downsample(x: torch.Tensor, res: int) -> torch.Tensor:
    """Area (box) downsampling of [n, 1, S, S] to res x res (no-op when res == S)."""
    return x if x.shape[-1] == res else F.adaptive_avg_pool2d(x, res)


def split(data: dict):
    """First half of the classes (in class order) -> train, second half -> test."""
    C = len(data["chars"])
    half = C // 2
    lab = data["labels"]
    tr, te = lab < half, lab >= half
    return (data["images"][tr], lab[tr]), (data["images"][te], lab[te] - half), half, C - half


def to_float(imgs) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(imgs)).float().div_(255.0).unsqueeze(1)


def union_labels(num_identities: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """identity -> class map for classes made of m random distinct identities each."""
    if m < 1 or num_identities % m:
        raise ValueError(f"merge: expected a divisor of the identity count {num_identities}, got {m}")
    cls = np.empty(num_identities, np.int64)
    cls[rng.permutation(num_identities)] = np.arange(num_identities) // m
    return cls


_TEST_CACHE: dict = {}


def test_images(cfg: Config, xte: np.ndarray) -> torch.Tensor:
    """The test images as the network sees them: downsampled to res, and (test_distort) distorted once
    with a fixed generator, so every run evaluates on the very same images."""
    res = cfg.res or cfg.size
    key = (xte.shape, int(xte[::97].sum()), res, cfg.test_distort)
    if key not in _TEST_CACHE:
        _TEST_CACHE.clear()
        g = torch.Generator().manual_seed(20_240)
        out = []
        for i in range(0, len(xte), 4096):
            x = to_float(xte[i:i + 4096])
            out.append(distort(x, g, res) if cfg.test_distort else downsample(x, res))
        _TEST_CACHE[key] = torch.cat(out)
    return _TEST_CACHE[key]


@torch.no_grad()
def embed(model: nn.Module, imgs, bs: int = 1024) -> torch.Tensor:
    """Embeddings of uint8 [N, S, S] images or float [N, 1, r, r] tensors."""
    was = model.training
    model.eval()
    conv = (lambda b: b) if torch.is_tensor(imgs) else to_float
    out = torch.cat([model(conv(imgs[i:i + bs])) for i in range(0, len(imgs), bs)])
    model.train(was)
    return out


def subset_classes(labels: np.ndarray, n: int) -> np.ndarray:
    keep = np.unique(labels)[:: max(1, len(np.unique(labels)) // n)][:n]
    return np.isin(labels, keep)


def effective_centers(fc: torch.Tensor, centers_per_class: int, threshold: float) -> torch.Tensor:
    """Per class, the number of distinct centers: connected components of the graph that links two
    column-normalised centers of the class when their Euclidean distance is below threshold.
    LongTensor [C]. (Local version of softtriple_triton.centers.effective_centers, same definition.)"""
    K = centers_per_class
    d, CK = fc.shape
    w = F.normalize(fc.detach().double(), dim=0).t().reshape(CK // K, K, d)
    reach = torch.cdist(w, w) < threshold
    reach |= torch.eye(K, dtype=torch.bool)
    for _ in range(max(1, math.ceil(math.log2(max(K, 2))))):  # transitive closure by repeated squaring
        reach = torch.bmm(reach.double(), reach.double()) > 0
    first = reach.double().argmax(2)  # lowest-index member of each center's component
    return (first == torch.arange(K)).sum(1)


CENTER_THRESHOLDS = (0.01, 0.05, 0.1, 0.2, 0.4)


@torch.no_grad()
def center_stats(fc: torch.Tensor, K: int, emb: torch.Tensor, y: np.ndarray, y_id: np.ndarray,
                 share: float = 0.05) -> dict:
    """After training: distinct centers per class at several thresholds (mean and histogram over the
    classes), the centers in use (argmax over the class's own K centers for at least `share` of its
    training images), and how many of a class's identities have their own majority center."""
    C = fc.shape[1] // K
    out = {"thresholds": list(CENTER_THRESHOLDS)}
    for t in CENTER_THRESHOLDS:
        n = effective_centers(fc, K, t)
        out[f"distinct@{t}"] = float(n.double().mean())
        out[f"distinct@{t}_hist"] = torch.bincount(n, minlength=K + 1)[1:].tolist()
    w = F.normalize(fc.detach().float(), dim=0).t().reshape(C, K, -1)
    x = F.normalize(emb.float(), dim=1)
    yt = torch.from_numpy(y)
    best = torch.einsum("nd,nkd->nk", x, w[yt]).argmax(1)  # winning own-class center per image
    hits = torch.zeros(C, K).index_put_((yt, best), torch.ones(len(yt)), accumulate=True)
    used = (hits >= share * hits.sum(1, keepdim=True)).sum(1)
    out["used"] = float(used.double().mean())
    out["used_hist"] = torch.bincount(used, minlength=K + 1)[1:].tolist()
    ids = np.unique(y_id)
    maj = {}
    for i in ids:  # majority center of each identity
        sel = torch.from_numpy(y_id == i)
        maj[int(i)] = (int(yt[sel][0]), int(torch.bincount(best[sel], minlength=K).argmax()))
    per_class: dict = {}
    for c, k in maj.values():
        per_class.setdefault(c, set()).add(k)
    m = len(ids) // C
    out["identities_with_own_center"] = float(np.mean([len(v) for v in per_class.values()])) / m
    return out


def shadow_compare(loss_fn, shadow, emb, y) -> dict:
    """Evaluate two loss implementations on identical embeddings and centers: |loss diff| and the
    max-abs gradient differences relative to the gradient's max-abs value."""
    grads = []
    for L in (loss_fn, shadow):
        if L is shadow:
            with torch.no_grad():
                shadow.fc.data = loss_fn.fc.data.clone()
        e = emb.detach().clone().requires_grad_(True)
        val = L(e, y)
        ge, gw = torch.autograd.grad(val, [e, L.fc])
        grads.append((float(val.detach()), ge, gw))
    (l1, e1, w1), (l2, e2, w2) = grads
    return {"loss_absdiff": abs(l1 - l2),
            "grad_emb_reldiff": float((e1 - e2).abs().max() / e2.abs().max().clamp_min(1e-30)),
            "grad_fc_reldiff": float((w1 - w2).abs().max() / w2.abs().max().clamp_min(1e-30))}


def prepare(cfg: Config, data: dict) -> dict:
    """Training / test arrays of a run: identity split, union labels (merge), test images as the
    network sees them."""
    (xtr, ytr_id), (xte, yte_id), Ctr, Cte = split(data)
    rng = np.random.default_rng(1_000 + cfg.seed)
    m = cfg.merge
    gtr, gte = union_labels(Ctr, m, rng), union_labels(Cte, m, rng)
    return dict(xtr=xtr, ytr=gtr[ytr_id], ytr_id=ytr_id, xte=test_images(cfg, xte), yte=gte[yte_id],
                yte_id=yte_id, Ctr=Ctr // m, Cte=Cte // m, m=m)


def evaluate(model, P: dict, sel=None, seed: int = 0, with_nmi: bool = True) -> dict:
    """Metrics on the test set (or the rows `sel`): union labels, plus id_* for the identities when m > 1."""
    x, y, yi = P["xte"], P["yte"], P["yte_id"]
    if sel is not None:
        x, y, yi = x[torch.from_numpy(sel)], y[sel], yi[sel]
    extra = {"id_": torch.from_numpy(yi)} if P["m"] > 1 else None
    return metrics.all_metrics(embed(model, x), torch.from_numpy(y), seed=seed, with_nmi=with_nmi,
                               extra_labels=extra)


def train(cfg: Config, data: dict | None = None, log_every: int = 50, return_model: bool = False) -> dict:
    torch.set_num_threads(cfg.threads)
    metrics.set_threads(cfg.threads)
    t_start = time.time()
    if data is None:
        data = build_dataset.load_or_build(cfg.set, cfg.size, cfg.num_classes)
    res = cfg.res or cfg.size
    P = prepare(cfg, data)
    Ctr = P["Ctr"]
    torch.manual_seed(cfg.seed)
    model = GlyphNet(cfg.emb_dim, cfg.width, res)
    loss_fn = make_loss(cfg.loss, Ctr, cfg.emb_dim, cfg.K, cfg.la, cfg.gamma, cfg.tau, cfg.margin)
    init_centers(loss_fn.fc, cfg.seed)
    if cfg.init_perturb:
        with torch.no_grad():
            loss_fn.fc.mul_(1.0 + cfg.init_perturb)
    shadow = (make_loss(cfg.shadow_loss, Ctr, cfg.emb_dim, cfg.K, cfg.la, cfg.gamma, cfg.tau, cfg.margin)
              if cfg.shadow_loss else None)
    opt = torch.optim.AdamW([
        {"params": model.parameters(), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": loss_fn.parameters(), "lr": cfg.lr_centers, "weight_decay": 0.0},
    ])
    base = [cfg.lr, cfg.lr_centers]
    g = torch.Generator().manual_seed(cfg.seed)
    xtr_t = torch.from_numpy(P["xtr"])
    ytr_t = torch.from_numpy(P["ytr"])
    N = len(ytr_t)
    perm, pos = torch.randperm(N, generator=g), 0
    sub = None
    if cfg.eval_every:  # learning-curve subset: whole test classes covering ~eval_subset_classes identities
        ncls = max(1, cfg.eval_subset_classes // cfg.merge)
        sub = subset_classes(P["yte"], ncls)
    hist = {"step": [], "loss": [], "time": [], "eval_step": [], "eval_R@1": [], "eval_MAP@R": [],
            "eval_id_R@1": [], "eval_id_MAP@R": [],
            "shadow_step": [], "shadow_loss_absdiff": [], "shadow_grad_emb_reldiff": [], "shadow_grad_fc_reldiff": []}
    t_train = t_eval = 0.0
    diverged = None
    t0 = time.time()
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch > N:
            perm, pos = torch.randperm(N, generator=g), 0
        idx = perm[pos:pos + cfg.batch]
        pos += cfg.batch
        x = xtr_t[idx].float().div_(255.0).unsqueeze(1)
        if cfg.aug == "strong":
            x = distort(x, g, res)
        else:
            if cfg.augment:
                x = augment(x, g)
            x = downsample(x, res)
        y = ytr_t[idx]
        frac = (step - 1) / cfg.steps
        warm = min(1.0, step / 50)
        for grp, b in zip(opt.param_groups, base):
            grp["lr"] = b * warm * 0.5 * (1 + math.cos(math.pi * frac))
        ts = time.perf_counter()
        emb = model(x)
        if shadow is not None and (step == 1 or step % cfg.shadow_every == 0):
            t_sh = time.perf_counter()
            hist["shadow_step"].append(step)
            for k, v in shadow_compare(loss_fn, shadow, emb, y).items():
                hist["shadow_" + k].append(v)
            ts += time.perf_counter() - t_sh  # not counted in the step time
        loss = loss_fn(emb, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t_train += time.perf_counter() - ts
        hist["step"].append(step)
        hist["loss"].append(float(loss.detach()))
        hist["time"].append(time.time() - t0)
        if not math.isfinite(hist["loss"][-1]):  # diverged (NaN / inf): stop, report the step, no metrics
            diverged = step
            print(f"  step {step:5d}  loss {hist['loss'][-1]} (non-finite): training stopped", file=sys.stderr)
            break
        if log_every and (step % log_every == 0 or step == 1):
            print(f"  step {step:5d}  loss {hist['loss'][-1]:.4f}  {time.time() - t0:6.1f}s", file=sys.stderr, flush=True)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            te = time.perf_counter()
            m = evaluate(model, P, sub, with_nmi=False)
            hist["eval_step"].append(step)
            for k in ("R@1", "MAP@R", "id_R@1", "id_MAP@R"):
                hist["eval_" + k].append(m.get(k, m[k.replace("id_", "")]))
            t_eval += time.perf_counter() - te
    te0 = time.time()
    final, centers = None, None
    if diverged is None:
        final = evaluate(model, P, seed=cfg.seed)
        g_eval = torch.Generator().manual_seed(30_000 + cfg.seed)  # training images as seen in training
        xs = torch.cat([(distort(to_float(P["xtr"][i:i + 4096]), g_eval, res) if cfg.aug == "strong"
                         else downsample(to_float(P["xtr"][i:i + 4096]), res)) for i in range(0, N, 4096)])
        centers = center_stats(loss_fn.fc, cfg.K, embed(model, xs), P["ytr"], P["ytr_id"])
    out = {"config": dataclasses.asdict(cfg), "final": final, "centers": centers, "history": hist,
           "diverged_step": diverged, "train_s": te0 - t0 - t_eval, "step_s": t_train / len(hist["step"]),
           "curve_eval_s": t_eval,
           "eval_s": time.time() - te0, "wall_s": time.time() - t_start, "n_train": int(N),
           "n_test": int(len(P["yte"])), "classes_train": Ctr, "classes_test": P["Cte"],
           "metrics_backend": metrics.backend()}
    if return_model:
        out["model"] = model
        out["loss_fn"] = loss_fn
    return out


def baselines(data: dict, seed: int = 0, emb_dim: int = 64, width: int = 32, size: int = 32,
              cfg: Config | None = None) -> dict:
    """Raw-pixel nearest neighbour and the untrained (random-init) network; with cfg: on the test
    images of that protocol (resolution, distortion) and its union labels (merge)."""
    if cfg is None:
        _, (xte, yte), _, _ = split(data)
        x, res = to_float(xte), size
    else:
        P = prepare(cfg, data)
        x, yte, res = P["xte"], P["yte"], cfg.res or cfg.size
    yt = torch.from_numpy(yte)
    raw = x.flatten(1)
    out = {"raw pixels": metrics.all_metrics(raw - raw.mean(0), yt, seed=seed)}
    torch.manual_seed(seed)
    out["untrained CNN"] = metrics.all_metrics(embed(GlyphNet(emb_dim, width, res), x), yt, seed=seed)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        t = f.type if not isinstance(f.type, str) else eval(f.type)
        if t is bool:
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=lambda s: s.lower() in ("1", "true", "yes"),
                            default=f.default)
        else:
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=t, default=f.default)
    a = ap.parse_args()
    cfg = Config(**vars(a))
    r = train(cfg)
    print(json.dumps({k: r[k] for k in ("final", "step_s", "train_s", "eval_s", "n_train", "n_test")}, indent=1))


if __name__ == "__main__":
    main()
