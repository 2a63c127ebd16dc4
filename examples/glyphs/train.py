"""Train a small CNN glyph embedding with SoftTriple on the first half of the classes, evaluate
retrieval on the unseen second half (Recall@1/2/4/8, MAP@R, NMI).

    python train.py --set kanji --steps 600 --K 10 --tau 0.2 --seed 0

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
    seed: int = 0
    eval_every: int = 0              # >0: evaluate R@1 / MAP@R on a fixed test subset every n steps
    eval_subset_classes: int = 200
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


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small random affine (scale 0.9-1.1, rotation +-6 deg, shear +-0.1, shift +-2 px)."""
    n = x.shape[0]
    s = 0.9 + 0.2 * torch.rand(n, generator=g)
    r = (torch.rand(n, generator=g) - 0.5) * (2 * math.radians(6))
    sh = (torch.rand(n, generator=g) - 0.5) * 0.2
    t = (torch.rand(n, 2, generator=g) - 0.5) * (4.0 / x.shape[-1]) * 2
    cos, sin = torch.cos(r) / s, torch.sin(r) / s
    theta = torch.stack([torch.stack([cos, -sin + sh, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def split(data: dict):
    """First half of the classes (in class order) -> train, second half -> test."""
    C = len(data["chars"])
    half = C // 2
    lab = data["labels"]
    tr, te = lab < half, lab >= half
    return (data["images"][tr], lab[tr]), (data["images"][te], lab[te] - half), half, C - half


def to_float(imgs) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(imgs)).float().div_(255.0).unsqueeze(1)


@torch.no_grad()
def embed(model: nn.Module, imgs, bs: int = 1024) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(to_float(imgs[i:i + bs])) for i in range(0, len(imgs), bs)])
    model.train(was)
    return out


def subset_classes(labels: np.ndarray, n: int) -> np.ndarray:
    keep = np.unique(labels)[:: max(1, len(np.unique(labels)) // n)][:n]
    return np.isin(labels, keep)


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


def train(cfg: Config, data: dict | None = None, log_every: int = 50, return_model: bool = False) -> dict:
    torch.set_num_threads(cfg.threads)
    if data is None:
        data = build_dataset.load_or_build(cfg.set, cfg.size, cfg.num_classes)
    (xtr, ytr), (xte, yte), Ctr, Cte = split(data)
    torch.manual_seed(cfg.seed)
    model = GlyphNet(cfg.emb_dim, cfg.width, cfg.size)
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
    xtr_t = torch.from_numpy(xtr)
    ytr_t = torch.from_numpy(ytr)
    N = len(ytr)
    perm, pos = torch.randperm(N, generator=g), 0
    sub = subset_classes(yte, cfg.eval_subset_classes) if cfg.eval_every else None
    hist = {"step": [], "loss": [], "time": [], "eval_step": [], "eval_R@1": [], "eval_MAP@R": [],
            "shadow_step": [], "shadow_loss_absdiff": [], "shadow_grad_emb_reldiff": [], "shadow_grad_fc_reldiff": []}
    t_train = 0.0
    t0 = time.time()
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch > N:
            perm, pos = torch.randperm(N, generator=g), 0
        idx = perm[pos:pos + cfg.batch]
        pos += cfg.batch
        x = xtr_t[idx].float().div_(255.0).unsqueeze(1)
        if cfg.augment:
            x = augment(x, g)
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
        if log_every and (step % log_every == 0 or step == 1):
            print(f"  step {step:5d}  loss {hist['loss'][-1]:.4f}  {time.time() - t0:6.1f}s", file=sys.stderr, flush=True)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            m = metrics.retrieval_metrics(embed(model, xte[sub]), torch.from_numpy(yte[sub]))
            hist["eval_step"].append(step)
            hist["eval_R@1"].append(m["R@1"])
            hist["eval_MAP@R"].append(m["MAP@R"])
    te0 = time.time()
    final = metrics.all_metrics(embed(model, xte), torch.from_numpy(yte), seed=cfg.seed)
    out = {"config": dataclasses.asdict(cfg), "final": final, "history": hist,
           "train_s": time.time() - t0 - (time.time() - te0), "step_s": t_train / cfg.steps,
           "eval_s": time.time() - te0, "n_train": int(N), "n_test": int(len(yte)),
           "classes_train": Ctr, "classes_test": Cte}
    if return_model:
        out["model"] = model
        out["loss_fn"] = loss_fn
    return out


def baselines(data: dict, seed: int = 0, emb_dim: int = 64, width: int = 32, size: int = 32) -> dict:
    """Raw-pixel nearest neighbour and the untrained (random-init) network."""
    _, (xte, yte), _, _ = split(data)
    yt = torch.from_numpy(yte)
    raw = to_float(xte).flatten(1)
    out = {"raw pixels": metrics.all_metrics(raw - raw.mean(0), yt, seed=seed)}
    torch.manual_seed(seed)
    out["untrained CNN"] = metrics.all_metrics(embed(GlyphNet(emb_dim, width, size), xte), yt, seed=seed)
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
