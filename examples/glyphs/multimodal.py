"""The multi-modal experiment: does SoftTriple with K > 1 centers beat K = 1 when every class is known to
consist of m separate clusters, and does the regulariser (tau > 0) leave about m distinct centers?

    python multimodal.py --preset mm-quick --workers 2   # K in {1, 8}, m in {1, 4}, 3 seeds (13 min here)
    python multimodal.py --preset mm --workers 2         # the committed grid (2 h 26 min here)

Protocol ("discriminative setting", see README.md for the reasons): kanji set (1,000 characters, 62
fonts), the first 500 characters are the training identities, the last 500 the test identities;
16 x 16 pixels; every training batch and (once, with a fixed generator) every test image is strongly
distorted (train.distort: affine, stroke weight, contrast, noise). Classes are unions of m random
distinct characters (m in {1, 2, 4}: 500 / 250 / 125 training classes, as many test classes; the
grouping is drawn from the seed). K in {1, 2, 4, 8}, tau in {0.2, 0} (K = 1 has no regulariser, one
run serves both), seeds 0-4, 800 steps x 256, 64-d embedding. Metrics (PML's AccuracyCalculator) on
the union labels and, for m > 1, on the identities (id_*); distinct centers per class after training
(train.center_stats). Ours vs pytorch-metric-learning's loss along the same trajectory at m = 4, K = 8.

Every run is stored as results/mm/runs/<name>.json and skipped when present (delete to redo); with
--workers N, N processes (1 torch thread each) take the runs from one list (lock files), so an
interrupted grid resumes where it stopped. Tables and plots: results/mm/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import build_dataset  # noqa: E402
import train  # noqa: E402
from train import Config  # noqa: E402

OUT = os.path.join(HERE, "results", "mm")
BASE = Config(set="kanji", num_classes=1000, size=32, res=16, aug="strong", test_distort=True, width=16,
              emb_dim=64, batch=256, steps=800, eval_every=100, eval_subset_classes=100)
PRESETS = {
    "mm": dict(Ks=[1, 2, 4, 8], ms=[1, 2, 4], taus=[0.2, 0.0], seeds=[0, 1, 2, 3, 4], steps=800,
               pml=dict(m=4, K=8, taus=[0.2, 0.0], seeds=[0])),
    "mm-quick": dict(Ks=[1, 8], ms=[1, 4], taus=[0.2], seeds=[0, 1, 2], steps=800,
                     pml=dict(m=4, K=8, taus=[0.2], seeds=[0])),
    # pipeline check only (python multimodal.py --preset mm-tiny --out /tmp/mm-tiny)
    "mm-tiny": dict(Ks=[1, 2], ms=[1, 2], taus=[0.2, 0.0], seeds=[0, 1], steps=6,
                    pml=dict(m=2, K=2, taus=[0.2], seeds=[0])),
}
KEYS = ["R@1", "R@2", "R@4", "R@8", "MAP@R", "NMI"]
# rounding-noise controls of the PML check: ours started from centers x (1 + eps)
ULP_CONTROLS = (("_1ulp", 2.0 ** -23), ("_m1ulp", -(2.0 ** -24)), ("_2ulp", 2.0 ** -22))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def grid_name(m, K, tau, s, steps, loss="ours", extra=""):
    return f"mm_m{m}_K{K}_tau{0.0 if K == 1 else tau}_s{s}_n{steps}" + ("" if loss == "ours" else f"_{loss}") + extra


def run_list(P) -> list[tuple[str, Config | str]]:
    """(name, config) of every run of the preset, most important first (seed-major: an interrupted grid
    has whole seeds), the PML check last; ("baselines_m<m>", "baselines") for the untrained baselines."""
    runs = [(f"baselines_m{m}", "baselines") for m in P["ms"]]
    seen = set()
    for s in P["seeds"]:
        for m in P["ms"]:
            for K in P["Ks"]:
                for tau in P["taus"]:
                    name = grid_name(m, K, tau, s, P["steps"])
                    if name not in seen:
                        seen.add(name)
                        runs.append((name, dataclasses.replace(BASE, merge=m, K=K, tau=0.0 if K == 1 else tau,
                                                               seed=s, steps=P["steps"])))
    q = P["pml"]
    for s in q["seeds"]:
        for tau in q["taus"]:
            cfg = dataclasses.replace(BASE, merge=q["m"], K=q["K"], tau=tau, seed=s, steps=P["steps"])
            base = grid_name(q["m"], q["K"], tau, s, P["steps"])
            if base not in seen:
                seen.add(base)
                runs.append((base, cfg))
            runs.append((base + "_pml", dataclasses.replace(cfg, loss="pml")))
            for suffix, eps in ULP_CONTROLS:
                runs.append((base + suffix, dataclasses.replace(cfg, init_perturb=eps)))
            runs.append((base + "_shadowpml", dataclasses.replace(cfg, shadow_loss="pml", shadow_every=10)))
    return runs


def _path(name):
    return os.path.join(OUT, "runs", f"{name}.json")


def _save(name, obj):
    os.makedirs(os.path.join(OUT, "runs"), exist_ok=True)
    tmp = _path(name) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, _path(name))


def do_run(name, cfg, data):
    t0 = time.time()
    if cfg == "baselines":
        m = int(name.rsplit("_m", 1)[1])
        r = {"metrics": train.baselines(data, width=BASE.width, cfg=dataclasses.replace(BASE, merge=m)),
             "wall_s": None}
        r["wall_s"] = time.time() - t0
    else:
        r = train.train(cfg, data, log_every=200)
        h = r["history"]
        h["loss"] = [float(f"{v:.6g}") for v in h["loss"]]
        del h["time"]
    r["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _save(name, r)
    log(f"[done] {name} in {time.time() - t0:.0f}s: "
        + json.dumps({k: round(v, 4) for k, v in (r.get("final") or {}).items()})
        + (f" diverged at step {r['diverged_step']}" if r.get("diverged_step") else ""))


def worker(P):
    torch.set_num_threads(1)
    data = build_dataset.load_or_build("kanji", BASE.size, BASE.num_classes)
    for name, cfg in run_list(P):
        if os.path.exists(_path(name)):
            continue
        lock = _path(name) + ".lock"
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue  # another worker has it
        try:
            log(f"[run] {name}")
            do_run(name, cfg, data)
        finally:
            os.remove(lock)


# ----------------------------------------------------------------------------------------------
# tables and plots


def _load(name):
    p = _path(name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def ci95(d):
    """mean, half-width of the 95% t interval, n of the paired differences d."""
    from scipy import stats
    d = np.asarray(d, float)
    n = len(d)
    if n < 2:
        return float(d.mean()) if n else float("nan"), float("nan"), n
    return float(d.mean()), float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n)), n


def collect(P):
    import pandas as pd
    rows = []
    for s in P["seeds"]:
        for m in P["ms"]:
            for K in P["Ks"]:
                for tau in (P["taus"] if K > 1 else [0.0]):  # K = 1: no regulariser, one run
                    r = _load(grid_name(m, K, tau, s, P["steps"]))
                    if r is None:
                        continue
                    row = dict(m=m, K=K, tau=tau, seed=s, wall_s=r["wall_s"], step_s=r["step_s"],
                               eval_s=r["eval_s"], classes_train=r["classes_train"])
                    f = r["final"]
                    for k in KEYS:
                        row[k] = f[k]
                        row["id_" + k] = f.get("id_" + k, f[k])
                    for k, v in r["centers"].items():
                        if k != "thresholds" and not k.endswith("_hist"):
                            row["centers_" + k] = v
                    rows.append(row)
    return pd.DataFrame(rows)


def summarize(df, P):
    """Per (m, K, tau): mean and sd of the metrics; paired difference to K = 1 (same m, same seed)
    with its 95% interval."""
    import pandas as pd
    out = []
    for (m, K, tau), g in df.groupby(["m", "K", "tau"]):
        row = dict(m=m, K=K, tau=tau, seeds=len(g))
        for k in ["MAP@R", "R@1", "NMI", "id_MAP@R", "id_R@1", "id_NMI"]:
            row[k] = g[k].mean()
            row[k + "_sd"] = g[k].std(ddof=1) if len(g) > 1 else float("nan")
        base = df[(df.m == m) & (df.K == 1)].set_index("seed")
        gg = g.set_index("seed")
        common = sorted(set(gg.index) & set(base.index))
        for k in ["MAP@R", "R@1", "id_MAP@R", "id_R@1", "NMI"]:
            d, h, n = ci95((gg.loc[common, k] - base.loc[common, k]).values) if K > 1 else (0.0, 0.0, len(common))
            row["d_" + k], row["d_" + k + "_ci"], row["d_n"] = d, h, n
        for c in [c for c in df.columns if c.startswith("centers_")]:
            row[c] = g[c].mean()
        row["wall_s"] = g.wall_s.mean()
        out.append(row)
    return pd.DataFrame(out)


def _ordered(sm, by_tau=True):
    """Rows of the summary as tuples, per m: K = 1 first, then (by_tau) tau = 0.2 before 0 or (not by_tau)
    K ascending with tau = 0.2 before 0."""
    keys = ["m", "tau", "K"] if by_tau else ["m", "K", "tau"]
    sm = sm.assign(first=(sm.K > 1).astype(int)).sort_values(["m", "first"] + keys[1:],
                                                             ascending=[True, True] + ([False, True] if by_tau else [True, False]))
    return [_Row(r, m=int(r["m"]), K=int(r["K"]), seeds=int(r["seeds"])) for r in sm.to_dict("records")]


class _Row(dict):
    __getattr__ = dict.__getitem__


def _pm(v, sd, nd=4):
    return f"{v:.{nd}f} ± {sd:.{nd}f}" if np.isfinite(sd) else f"{v:.{nd}f}"


def _ci(d, h, nd=4):
    if not np.isfinite(h):
        return f"{d:+.{nd}f}"
    mark = " **" if (d - h > 0 or d + h < 0) else ""
    return f"{d:+.{nd}f} [{d - h:+.{nd}f}, {d + h:+.{nd}f}]{mark}"


def write_tables(df, sm, P, preset, meta):
    L = [f"# Multi-modal glyph experiment (preset `{preset}`)", "",
         f"Machine: {meta['machine']}, shared with other sessions' jobs; torch {torch.__version__}, 1 thread per run, "
         f"{meta['workers']} runs at a time, `nice -n 19`; repository at `{meta['rev']}`. Metrics: "
         f"{meta['metrics']}.", "",
         f"Protocol: kanji, 500 training / 500 test identities (62 fonts), {BASE.res} x {BASE.res} pixels, strong "
         f"distortion of training batches and of the test images; classes = unions of m random identities; "
         f"{P['steps']} steps x {BASE.batch}, {BASE.emb_dim}-d, width {BASE.width}; la={BASE.la}, gamma={BASE.gamma}, "
         f"margin={BASE.margin}. Mean ± sample sd over seeds {P['seeds']}; Δ = mean paired difference to K = 1 "
         "(same m, same seed) with its 95% t interval; ** = the interval excludes 0.", ""]
    bl = {m: _load(f"baselines_m{m}") for m in P["ms"]}
    if any(bl.values()):
        L += ["## Baselines (no training), test set of the protocol", "",
              "| m | method | R@1 | MAP@R | NMI |", "|---|---|---|---|---|"]
        for m, b in bl.items():
            if b:
                for meth, v in b["metrics"].items():
                    L.append(f"| {m} | {meth} | {v['R@1']:.4f} | {v['MAP@R']:.4f} | {v['NMI']:.4f} |")
        L.append("")
    for lab, key in (("union labels (the training labels)", ""), ("identity labels (the characters)", "id_")):
        L += [f"## MAP@R and R@1 on {lab}", "",
              "| m | K | tau | seeds | MAP@R | ΔMAP@R vs K=1 [95% CI] | R@1 | ΔR@1 vs K=1 [95% CI] |",
              "|---|---|---|---|---|---|---|---|"]
        for r in _ordered(sm):
            tau = "-" if r.K == 1 else f"{r.tau:g}"
            L.append(f"| {r.m} | {r.K} | {tau} | {r.seeds} | {_pm(r[key + 'MAP@R'], r[key + 'MAP@R_sd'])} | "
                     + ("—" if r.K == 1 else _ci(r['d_' + key + 'MAP@R'], r['d_' + key + 'MAP@R_ci']))
                     + f" | {_pm(r[key + 'R@1'], r[key + 'R@1_sd'])} | "
                     + ("—" if r.K == 1 else _ci(r['d_' + key + 'R@1'], r['d_' + key + 'R@1_ci'])) + " |")
        L.append("")
    thr = train.CENTER_THRESHOLDS
    L += ["## Distinct centers per class after training (mean over classes and seeds)", "",
          "Distinct at t: connected components of the graph linking two column-normalised centers of a class at "
          "Euclidean distance < t. Used: centers that are the nearest own-class center for >= 5% of the class's "
          "training images. Own center: fraction of a class's m identities whose majority center is not shared "
          "with another identity of the class (1 = every mode has its own center).", "",
          "| m | K | tau | " + " | ".join(f"distinct @{t}" for t in thr) + " | used | own center |",
          "|---|---|---|" + "---|" * (len(thr) + 2)]
    for r in _ordered(sm[sm.K > 1], by_tau=False):
        L.append(f"| {r.m} | {r.K} | {r.tau:g} | " + " | ".join(f"{r[f'centers_distinct@{t}']:.2f}" for t in thr)
                 + f" | {r.centers_used:.2f} | {r.centers_identities_with_own_center:.2f} |")
    L.append("")
    pm = pml_rows(P)
    if pm:
        L += ["## Ours vs pytorch-metric-learning along the same training trajectory", "",
              f"m = {P['pml']['m']}, K = {P['pml']['K']}; identical init, batches and augmentation. Separate: the two "
              "losses trained separately. 1-ulp: ours started from centers x (1 + 2^-23), x (1 - 2^-24), x (1 + 2^-22) "
              "(rounding-noise controls; the largest difference of the three). "
              "Shadow: ours with PML evaluated on the identical embeddings and centers every 10 steps (gradients: "
              "max-abs difference / max-abs value).", "",
              "| tau | seed | steps | loss diff step 1 | max loss diff: PML | : 1-ulp | max metric diff: PML | : 1-ulp | "
              "shadow loss diff | shadow grad emb | shadow grad centers | PML non-finite | MAP@R ours / PML | "
              "identity MAP@R ours / PML / 1-ulp controls |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def e(v):
            return "—" if v is None else f"{v:.1e}"

        for r in pm:
            div = (f"trained: NaN loss at step {r['pml_diverged_step']}; " if r["pml_diverged_step"] else "") + \
                f"shadow: {r['shadow_nonfinite']} of {r['shadow_points']} gradients" + \
                (f" (first at step {r['shadow_first_nonfinite_step']})" if r["shadow_nonfinite"] else "")
            mp = "—" if r["map_pml"] is None else f"{r['map_pml']:.4f}"
            L.append(f"| {r['tau']:g} | {r['seed']} | {r['steps']} | {r['loss_diff_step1']:.1e} | {r['pml_loss']:.1e} | "
                     f"{r['ulp_loss']:.1e} | {e(r['pml_metric'])} | {e(r['ulp_metric'])} | {r['shadow_loss']:.1e} | "
                     f"{r['shadow_ge']:.1e} | {r['shadow_gw']:.1e} | {div} | {r['map_ours']:.4f} / {mp} | "
                     + " / ".join("—" if v is None else f"{v:.4f}" for v in [r["id_map_ours"], r["id_map_pml"]] + r["id_map_ulp"])
                     + " |")
        L.append("")
    L += ["## Time", "", f"Runs: {len(df)} grid runs, mean wall per run {df.wall_s.mean():.0f} s "
          f"(step {df.step_s.mean():.3f} s, final evaluation {df.eval_s.mean():.0f} s); sum of run walls "
          f"{df.wall_s.sum() / 3600:.2f} h. Elapsed of the launches that produced them: {meta['elapsed']}.", ""]
    with open(os.path.join(OUT, f"results_{preset}.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    return "\n".join(L)


def pml_rows(P):
    """Ours vs PML: the separately trained pair (up to PML's divergence, if any), the 1-ulp control and
    the shadow evaluation along ours' trajectory (non-finite PML gradients counted, not maximised)."""
    q, out = P["pml"], []
    for s in q["seeds"]:
        for tau in q["taus"]:
            base = grid_name(q["m"], q["K"], tau, s, P["steps"])
            o, p, sh = (_load(base + x) for x in ("", "_pml", "_shadowpml"))
            us = [r for r in (_load(base + x) for x, _ in ULP_CONTROLS) if r]
            if not all((o, p, sh)) or not us:
                continue
            u = us[0]
            lo, lp, lu = (np.array(r["history"]["loss"]) for r in (o, p, u))
            n = min(len(lp), len(lo))
            fin = np.isfinite(lp[:n])
            h = sh["history"]
            ge, gw = np.array(h["shadow_grad_emb_reldiff"]), np.array(h["shadow_grad_fc_reldiff"])
            bad = ~(np.isfinite(ge) & np.isfinite(gw))

            def mdiff(a, b):
                return max(abs(a["final"][k] - b["final"][k]) for k in a["final"]) if a["final"] and b["final"] else None

            out.append(dict(tau=tau, seed=s, steps=P["steps"], loss_diff_step1=abs(lo[0] - lp[0]),
                            pml_diverged_step=p.get("diverged_step"),
                            pml_loss=float(np.abs(lo[:n] - lp[:n])[fin].max()),
                            ulp_loss=max(float(np.abs(lo - np.array(x["history"]["loss"])).max()) for x in us),
                            pml_metric=mdiff(o, p), ulp_metric=max(mdiff(o, x) for x in us), ulp_controls=len(us),
                            id_map_ours=o["final"].get("id_MAP@R"),
                            id_map_pml=p["final"].get("id_MAP@R") if p["final"] else None,
                            id_map_ulp=[x["final"].get("id_MAP@R") for x in us],
                            shadow_loss=float(np.nanmax(h["shadow_loss_absdiff"])),
                            shadow_ge=float(ge[~bad].max()), shadow_gw=float(gw[~bad].max()),
                            shadow_points=len(ge), shadow_nonfinite=int(bad.sum()),
                            shadow_first_nonfinite_step=(int(np.array(h["shadow_step"])[bad][0]) if bad.any() else None),
                            map_ours=o["final"]["MAP@R"], map_pml=p["final"]["MAP@R"] if p["final"] else None,
                            shadow_reproduces_ours=bool(np.array_equal(lo, np.array(h["loss"]))),
                            curves=dict(step=o["history"]["step"], ours=lo.tolist(), pml=lp.tolist(), ulp=lu.tolist(),
                                        shadow_step=h["shadow_step"], shadow_loss=h["shadow_loss_absdiff"],
                                        shadow_gw=gw.tolist())))
    return out


def plot_heatmap(sm, P, preset):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    taus = [t for t in P["taus"]]
    fig, axes = plt.subplots(len(taus), 2, figsize=(11, 3.6 * len(taus)), squeeze=False)
    for i, tau in enumerate(taus):
        for j, (key, title) in enumerate((("MAP@R", "MAP@R, union labels"), ("id_MAP@R", "MAP@R, identities"))):
            ax = axes[i, j]
            M = np.full((len(P["ms"]), len(P["Ks"])), np.nan)
            txt = [["" for _ in P["Ks"]] for _ in P["ms"]]
            for a, m in enumerate(P["ms"]):
                for b, K in enumerate(P["Ks"]):
                    r = sm[(sm.m == m) & (sm.K == K) & ((sm.tau == tau) | (sm.K == 1))]
                    if r.empty:
                        continue
                    r = r.iloc[0]
                    M[a, b] = r[key]
                    txt[a][b] = f"{r[key]:.3f}" + ("" if K == 1 else "\nΔ " + _ci(r['d_' + key], r['d_' + key + '_ci'], 3)
                                                   .replace(" [", "\n[").replace(" **", "*"))
            im = ax.imshow(M, cmap="viridis", aspect="auto")
            mid = np.nanmean([np.nanmin(M), np.nanmax(M)])
            for a in range(len(P["ms"])):
                for b in range(len(P["Ks"])):
                    ax.text(b, a, txt[a][b], ha="center", va="center", fontsize=7,
                            color="w" if M[a, b] < mid else "k")
            ax.set_xticks(range(len(P["Ks"])), [f"K={K}" for K in P["Ks"]])
            ax.set_yticks(range(len(P["ms"])), [f"m={m}" for m in P["ms"]])
            ax.set_title(f"{title}, tau={tau:g} (K=1: no regulariser)", fontsize=9)
            fig.colorbar(im, ax=ax, label="mean MAP@R")
    fig.suptitle("Mean MAP@R on unseen classes over K x m; Δ = paired difference to K=1, [95% CI], * = excludes 0",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, f"heatmap_{preset}.png"), dpi=80)
    plt.close(fig)


def plot_curves(P, preset, pm):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ms = P["ms"]
    fig, axes = plt.subplots(2, len(ms) + 1, figsize=(4.2 * (len(ms) + 1), 7), squeeze=False)
    cols = {1: "k", 2: "tab:blue", 4: "tab:orange", 8: "tab:red"}
    for j, m in enumerate(ms):
        for K in P["Ks"]:
            for tau in (P["taus"] if K > 1 else [0.0]):
                rs = [r for r in (_load(grid_name(m, K, tau, s, P["steps"])) for s in P["seeds"]) if r]
                if not rs:
                    continue
                ls = "-" if (tau > 0 or K == 1) else "--"
                lab = f"K={K}" + ("" if K == 1 else f", tau={tau:g}")
                L = np.array([r["history"]["loss"] for r in rs])
                w = min(20, L.shape[1])
                sm_ = np.array([np.convolve(v, np.ones(w) / w, mode="valid") for v in L]).mean(0)
                axes[0, j].plot(np.arange(w, L.shape[1] + 1), sm_, ls, color=cols.get(K), lw=1, label=lab)
                es = rs[0]["history"]["eval_step"]
                E = np.array([r["history"]["eval_id_MAP@R"] for r in rs])
                axes[1, j].errorbar(es, E.mean(0), yerr=E.std(0), fmt="o" + ls, ms=3, color=cols.get(K), lw=1,
                                    capsize=2, label=lab)
        axes[0, j].set(xlabel="step", yscale="log")
        axes[0, j].set_title(f"m={m}: training loss (moving avg 20, mean of seeds)", fontsize=8)
        axes[1, j].set(xlabel="step")
        axes[1, j].set_title(f"m={m}: MAP@R, identities (100-identity test subset)", fontsize=8)
        axes[0, j].legend(fontsize=7)
        axes[1, j].legend(fontsize=7)
    ax0, ax1 = axes[0, -1], axes[1, -1]
    for r in pm:
        c = r["curves"]
        lo, lp, lu = (np.array(c[k]) for k in ("ours", "pml", "ulp"))
        n = min(len(lo), len(lp))
        ln, = ax0.plot(c["step"][:n], np.abs(lo[:n] - lp[:n]) + 1e-9, "-", lw=1, label=f"|ours - PML|, tau={r['tau']:g}")
        ax0.plot(c["step"], np.abs(lo - lu) + 1e-9, ":", lw=1.2, color=ln.get_color(),
                 label=f"|ours - ours(1-ulp start)|, tau={r['tau']:g}")
        if r["pml_diverged_step"]:
            ax0.axvline(r["pml_diverged_step"], color=ln.get_color(), lw=0.8, ls="--")
        ax1.plot(c["shadow_step"], np.array(c["shadow_loss"]) + 1e-12, "-", color=ln.get_color(), lw=1,
                 label=f"loss |diff|, tau={r['tau']:g}")
        gw = np.array(c["shadow_gw"])
        ax1.plot(c["shadow_step"], gw + 1e-12, ":", color=ln.get_color(), lw=1.2,
                 label=f"grad centers rel. diff, tau={r['tau']:g}")
        bad = ~np.isfinite(gw)
        if bad.any():
            ax1.plot(np.array(c["shadow_step"])[bad], np.full(bad.sum(), 1.0), "x", color=ln.get_color(),
                     label=f"PML gradient non-finite, tau={r['tau']:g}")
    if pm:
        ax0.set(xlabel="step", ylabel="|loss difference| + 1e-9", yscale="log")
        ax0.set_title(f"trained apart (m={P['pml']['m']}, K={P['pml']['K']}, seed {pm[0]['seed']}); "
                      "dashed line: PML's loss NaN", fontsize=8)
        ax1.set(xlabel="step", yscale="log")
        ax1.set_title("shadow: PML on ours' embeddings and centers", fontsize=8)
        ax0.legend(fontsize=6)
        ax1.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, f"curves_{preset}.png"), dpi=75)
    plt.close(fig)


def report(P, preset, workers, elapsed):
    df = collect(P)
    if df.empty:
        log("no runs yet")
        return
    sm = summarize(df, P)
    df.to_csv(os.path.join(OUT, f"runs_{preset}.csv"), index=False)
    sm.to_csv(os.path.join(OUT, f"summary_{preset}.csv"), index=False)
    pm = pml_rows(P)
    with open(os.path.join(OUT, f"pml_check_{preset}.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "curves"} for r in pm], f, indent=1)
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True,
                         text=True).stdout.strip()
    import metrics
    meta = dict(machine=f"{os.cpu_count()}-core CPU", rev=rev or "unknown", workers=workers, elapsed=elapsed,
                metrics=metrics.backend())
    log(write_tables(df, sm, P, preset, meta))
    plot_heatmap(sm, P, preset)
    plot_curves(P, preset, pm)


def main():
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mm-quick")
    ap.add_argument("--workers", type=int, default=2, help="runs at a time (1 torch thread each)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true", help="only write the tables / plots of finished runs")
    ap.add_argument("--out", default=OUT, help="results folder (default results/mm)")
    ap.add_argument("--elapsed", default="not recorded", help="text for the time section (wall of the launches)")
    a = ap.parse_args()
    OUT = a.out
    P = PRESETS[a.preset]
    if a.worker:
        return worker(P)
    t0 = time.time()
    if not a.report_only:
        os.makedirs(os.path.join(OUT, "runs"), exist_ok=True)
        for f in os.listdir(os.path.join(OUT, "runs")):  # stale locks of an interrupted launch
            if f.endswith(".lock") or f.endswith(".tmp"):
                os.remove(os.path.join(OUT, "runs", f))
        build_dataset.load_or_build("kanji", BASE.size, BASE.num_classes)  # build the cache once
        cmd = [sys.executable, os.path.abspath(__file__), "--preset", a.preset, "--out", OUT, "--worker"]
        procs = [subprocess.Popen(cmd) for _ in range(a.workers)]
        rc = [p.wait() for p in procs]
        log(f"[grid] workers exited {rc} after {time.time() - t0:.0f}s")
    report(P, a.preset, a.workers, a.elapsed if a.report_only else f"{(time.time() - t0) / 60:.0f} min (this launch)")


if __name__ == "__main__":
    main()
