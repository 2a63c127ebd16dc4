#!/usr/bin/env python
"""Would gradient filtering pay? Measured on trained glyph embeddings, before anything is built.

Gradient filtering (as in Cut Cross-Entropy) skips the backward work of a (row block x class tile) tile whose
dL/ds is negligible. This script trains the glyph model of examples/glyphs (SoftTriple, K centers per class), then,
on training batches at the trained state, computes dL/ds exactly (fp64, the plain formula) and reports per
threshold t in 2^-24 .. 2^-8:

- the fraction of tiles (BLOCK_N rows x BLOCK_C classes, the kernels' default GPU tile) whose largest |dL/ds_ij|
  is below t times the row's gradient scale max_j |dL/ds_ij|, for every row of the tile;
- the error of dL/dx and dL/dwn if those tiles are skipped (max-abs and Frobenius, relative to the exact gradient).

    python bench/grad_filter.py --set kanji --steps 400      # needs the glyph dataset (examples/glyphs/run.sh)
    python bench/grad_filter.py --set mpl --steps 200        # matplotlib's fonts, offline

Writes bench/results/grad_filter.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples", "glyphs"))

THRESHOLDS = [2.0 ** -e for e in (24, 20, 16, 12, 8)]


def exact_ds(emb, fc, y, K, la, gamma, margin):
    """dL/ds [N, C*K] of the mean loss in fp64, with the normalised embeddings x and centers wn."""
    x = F.normalize(emb.double(), dim=1)
    wn = F.normalize(fc.double(), dim=0)
    s = (x @ wn).requires_grad_(True)
    N, C = s.shape[0], s.shape[1] // K
    s3 = s.view(N, C, K)
    S = (torch.softmax(s3 / gamma, dim=2) * s3).sum(2)
    z = la * (S - margin * F.one_hot(y, C).double())
    (torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0]).mean().backward()
    return s.grad, x, wn


def filtering(ds, x, wn, K, block_n, block_c):
    N, M = ds.shape
    C = M // K
    nb, nt = -(-N // block_n), -(-C // block_c)
    pad = torch.zeros(nb * block_n, nt * block_c * K, dtype=ds.dtype)
    pad[:N, :M] = ds.abs()
    rel = pad / pad.amax(dim=1, keepdim=True).clamp_min(1e-300)          # |ds_ij| / the row's gradient scale
    tile_max = rel.view(nb, block_n, nt, block_c * K).amax(dim=(1, 3))   # [row blocks, class tiles]
    dx_ref, dw_ref = ds @ wn.t(), x.t() @ ds
    rows = []
    for t in THRESHOLDS:
        skip = tile_max < t
        keep = (~skip).repeat_interleave(block_n, 0).repeat_interleave(block_c * K, 1)[:N, :M]
        dsf = ds * keep
        dx, dw = dsf @ wn.t(), x.t() @ dsf
        rows.append(dict(threshold=f"2^{int(round(torch.log2(torch.tensor(t)).item()))}",
                         skipped=float(skip.double().mean()),
                         dx_max=float((dx - dx_ref).abs().max() / dx_ref.abs().max()),
                         dx_fro=float((dx - dx_ref).norm() / dx_ref.norm()),
                         dw_max=float((dw - dw_ref).abs().max() / dw_ref.abs().max()),
                         dw_fro=float((dw - dw_ref).norm() / dw_ref.norm())))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="kanji")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--tau", type=float, default=0.2)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    import train as glyph_train

    cfg = glyph_train.Config(set=a.set, K=a.K, tau=a.tau, steps=a.steps, threads=a.threads, loss="ours")
    r = glyph_train.train(cfg, return_model=True)
    model, loss_fn = r["model"].eval(), r["loss_fn"]
    data = glyph_train.build_dataset.load_or_build(cfg.set, cfg.size, cfg.num_classes)
    (xtr, ytr), _, _, _ = glyph_train.split(data)
    g = torch.Generator().manual_seed(1)
    results = {"config": {"set": a.set, "steps": a.steps, "K": a.K, "tau": a.tau, "final": r["final"]}, "tiles": {}}
    fc = loss_fn.fc.detach()
    for block_n, block_c in ((64, 16), (128, 16), (64, 8)):
        acc = None
        for _ in range(a.batches):
            idx = torch.randperm(len(ytr), generator=g)[:256]
            with torch.no_grad():
                emb = model(torch.from_numpy(xtr[idx]).float().div_(255.0).unsqueeze(1))
            ds, x, wn = exact_ds(emb, fc, torch.from_numpy(ytr[idx]).long(), a.K, cfg.la, cfg.gamma, cfg.margin)
            rows = filtering(ds, x, wn, a.K, block_n, block_c)
            acc = rows if acc is None else [{k: (v if k == "threshold" else max(v, w[k]) if k != "skipped"
                                                 else v + w[k]) for k, v in r0.items()} for r0, w in zip(acc, rows)]
        for row in acc:
            row["skipped"] /= a.batches
        results["tiles"][f"{block_n}x{block_c} classes"] = acc
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "grad_filter.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"# Gradient filtering, measured (`python bench/grad_filter.py --set {a.set} --steps {a.steps}`)", "",
             f"Glyph model trained with SoftTriple (K={a.K}, tau={a.tau}, {a.steps} steps; final test MAP@R "
             f"{r['final'].get('MAP@R', float('nan')):.4f}); {a.batches} training batches of 256 at the trained "
             "state, dL/ds exact in fp64. skipped = fraction of tiles whose every |dL/ds_ij| is below the threshold "
             "times its row's largest; errors of dx and dL/dwn with those tiles skipped (worst batch), relative "
             "to the exact gradient.", ""]
    for tile, rows in results["tiles"].items():
        lines += [f"#### tile {tile}", "", "| threshold | tiles skipped | dx max-abs | dx Frobenius | dwn max-abs | "
                  "dwn Frobenius |", "|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['threshold']} | {row['skipped']:.1%} | {row['dx_max']:.1e} | {row['dx_fro']:.1e} | "
                         f"{row['dw_max']:.1e} | {row['dw_fro']:.1e} |")
        lines.append("")
    with open(os.path.join(a.out, "grad_filter.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
