"""Run the glyph-retrieval experiments and write results/ (CSV, markdown, plots).

    python run_experiments.py                 # default preset "quick" (~10 min on 2 CPU cores)
    python run_experiments.py --preset full   # the committed results (~1 h on 2 CPU cores)

Experiments (kanji set: 1,000 ideographs, first 500 classes train, last 500 test, ~62 fonts each):
  baselines  raw-pixel nearest neighbour, untrained (random-init) network
  (a)        SoftTriple K = 1 (normalised softmax), 2, 3, 4, 10 with tau = 0.2, and K = 10 with tau = 0
  (b)        our SoftTripleLoss vs pytorch-metric-learning's SoftTripleLoss from identical initial
             weights and batches (tau = 0 on kanji; tau = 0.2 with PML's SparseCentersRegularizer on a
             smaller class count), max difference of the training curves and of the final metrics
  (c)        training-step time with our loss vs the plain formula (and PML) at the kanji class count

Each run is stored as results/runs/<name>.json and skipped when it already exists (delete the file
to rerun). All runs use one torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import build_dataset  # noqa: E402
import metrics  # noqa: E402
import train  # noqa: E402
from train import Config  # noqa: E402

RES = os.path.join(HERE, "results")
MODELS = os.path.join(HERE, "cache", "models")
METRICS = ["R@1", "R@2", "R@4", "R@8", "MAP@R", "NMI"]

PRESETS = {
    # ~10 minutes: K=1 vs K=10, 3 seeds, short training; (b) one short pair; (c) timing
    "quick": dict(steps=120, a_configs=[(1, 0.2), (10, 0.2)], seeds=[0, 1, 2], b_steps=40, b_seeds=[0],
                  b_small_steps=40, eval_every=40, c_reps=5),
    # a few seconds per run, only to check the pipeline (python run_experiments.py --preset tiny --out /tmp/x)
    "tiny": dict(steps=6, a_configs=[(1, 0.2), (10, 0.2)], seeds=[0, 1], b_steps=4, b_seeds=[0],
                 b_small_steps=4, eval_every=3, c_reps=1),
    "full": dict(steps=400, a_configs=[(1, 0.2), (2, 0.2), (3, 0.2), (4, 0.2), (10, 0.2), (10, 0.0)],
                 seeds=[0, 1, 2], b_steps=150, b_seeds=[0], b_small_steps=150, b_small_seeds=[0, 1, 2],
                 eval_every=100, c_reps=10),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run_cached(name: str, cfg: Config, data: dict, save_model: bool = False) -> dict:
    path = os.path.join(RES, "runs", f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    log(f"[run] {name}: {cfg}")
    r = train.train(cfg, data, log_every=100, return_model=save_model)
    if save_model:
        os.makedirs(MODELS, exist_ok=True)
        torch.save(r.pop("model").state_dict(), os.path.join(MODELS, f"{name}.pt"))
        r.pop("loss_fn")
    r["history"]["loss"] = [round(v, 6) for v in r["history"]["loss"]]
    r["history"]["time"] = [round(v, 2) for v in r["history"]["time"]]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(r, f)
    log(f"[done] {name}: {r['final']}  step {r['step_s']:.3f}s  eval {r['eval_s']:.0f}s")
    return r


def mean_std(vals):
    v = np.asarray(vals, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(m, s, nd=3):
    return f"{m:.{nd}f} ± {s:.{nd}f}"


# ----------------------------------------------------------------------------------------------

PREFIX = ""  # "latin_" for the Latin set


def exp_baselines(data, size):
    path = os.path.join(RES, "runs", f"{PREFIX}baselines.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    log("[run] baselines")
    b = train.baselines(data, seed=0, width=16, size=size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(b, f)
    return b


def exp_a(data, P, base: Config):
    rows = []
    for K, tau in P["a_configs"]:
        for s in P["seeds"]:
            cfg = dataclasses.replace(base, K=K, tau=tau, seed=s, steps=P["steps"], eval_every=P["eval_every"])
            r = run_cached(f"{PREFIX}a_K{K}_tau{tau}_s{s}_n{P['steps']}", cfg, data, save_model=(s == 0))
            h = r["history"]
            early = dict(early_step=h["eval_step"][0], early_MAP=h["eval_MAP@R"][0]) if h["eval_step"] else {}
            rows.append(dict(K=K, tau=tau, seed=s, steps=P["steps"], step_s=r["step_s"], **r["final"], **early, run=r))
    return rows


def exp_b(data, P, base: Config, small: dict):
    out = []
    for tag, d, tau, steps, seeds in (("kanji", data, 0.0, P["b_steps"], P["b_seeds"]),
                                      ("kanji-200", small, 0.2, P["b_small_steps"], P.get("b_small_seeds", P["b_seeds"]))):
        for s in seeds:
            pair = {}
            for loss in ("ours", "pml"):
                cfg = dataclasses.replace(base, loss=loss, K=10, tau=tau, seed=s, steps=steps,
                                          eval_every=max(steps // 3, 1), num_classes=len(d["chars"]))
                pair[loss] = run_cached(f"b_{tag}_{loss}_tau{tau}_s{s}_n{steps}", cfg, d)
            lo, lp = np.array(pair["ours"]["history"]["loss"]), np.array(pair["pml"]["history"]["loss"])
            row = dict(data=tag, classes_train=pair["ours"]["classes_train"], tau=tau, seed=s, steps=steps,
                       loss_step1_ours=lo[0], loss_step1_pml=lp[0], max_abs_loss_diff_step1=abs(lo[0] - lp[0]),
                       max_abs_loss_diff=float(np.abs(lo - lp).max()),
                       max_rel_loss_diff=float((np.abs(lo - lp) / np.abs(lp)).max()),
                       max_abs_metric_diff=max(abs(pair["ours"]["final"][m] - pair["pml"]["final"][m]) for m in METRICS),
                       step_s_ours=pair["ours"]["step_s"], step_s_pml=pair["pml"]["step_s"])
            for m in ("R@1", "MAP@R", "NMI"):
                row[f"{m}_ours"] = pair["ours"]["final"][m]
                row[f"{m}_pml"] = pair["pml"]["final"][m]
            row["pair"] = pair
            out.append(row)
    return out


def exp_b_controls(data, P, base: Config, small: dict, rows_b):
    """Controls for (b): (1) the same loss (ours) started from centers perturbed by one float32 ulp
    (x (1 + 2^-23)): how far does pure rounding noise move the trajectory? (2) ours with PML evaluated
    as a 'shadow' on the identical embeddings and centers every 10 steps along the trajectory: loss and
    gradient differences of the two implementations at the same point."""
    out = []
    for tag, d, tau, steps, seeds in (("kanji", data, 0.0, P["b_steps"], P["b_seeds"]),
                                      ("kanji-200", small, 0.2, P["b_small_steps"], P.get("b_small_seeds", P["b_seeds"]))):
        for s in seeds:
            cfg = dataclasses.replace(base, loss="ours", K=10, tau=tau, seed=s, steps=steps,
                                      eval_every=max(steps // 3, 1), num_classes=len(d["chars"]))
            pert = run_cached(f"b_{tag}_ours-perturbed_tau{tau}_s{s}_n{steps}",
                              dataclasses.replace(cfg, init_perturb=2.0 ** -23), d)
            shadow = run_cached(f"b_{tag}_ours-shadowpml_tau{tau}_s{s}_n{steps}",
                                dataclasses.replace(cfg, shadow_loss="pml", shadow_every=10), d)
            rb = next(r for r in rows_b if r["data"] == tag and r["seed"] == s)
            ours = rb["pair"]["ours"]
            lo = np.array(ours["history"]["loss"])
            h = shadow["history"]
            out.append(dict(
                data=tag, tau=tau, seed=s, steps=steps,
                ours_vs_pml_max_abs_loss_diff=rb["max_abs_loss_diff"],
                ours_vs_pml_max_abs_metric_diff=rb["max_abs_metric_diff"],
                ours_vs_1ulp_max_abs_loss_diff=float(np.abs(lo - np.array(pert["history"]["loss"])).max()),
                ours_vs_1ulp_max_abs_metric_diff=max(abs(ours["final"][m] - pert["final"][m]) for m in METRICS),
                shadow_points=len(h["shadow_step"]),
                shadow_max_loss_absdiff=max(h["shadow_loss_absdiff"]),
                shadow_max_grad_emb_reldiff=max(h["shadow_grad_emb_reldiff"]),
                shadow_max_grad_fc_reldiff=max(h["shadow_grad_fc_reldiff"]),
                shadow_run_reproduces_ours=bool(np.array_equal(lo, np.array(h["loss"])))))
    return out


def exp_c(data, P, base: Config, C: int):
    """Median wall time of one full training step (CNN fwd+bwd, loss fwd+bwd, AdamW) and of the loss
    alone (fwd+bwd), batch 256, K=10, tau=0.2, at C training classes."""
    path = os.path.join(RES, "runs", f"c_C{C}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    torch.set_num_threads(1)
    (xtr, ytr), _, _, _ = train.split(data)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(ytr), generator=g)[: base.batch]
    x = train.to_float(xtr[idx.numpy()])
    y = torch.from_numpy(ytr[idx.numpy()])
    out = {}
    for kind in ("ours", "reference", "pml"):
        torch.manual_seed(0)
        model = train.GlyphNet(base.emb_dim, base.width, base.size)
        loss_fn = train.make_loss(kind, C, base.emb_dim, 10, base.la, base.gamma, 0.2, base.margin)
        train.init_centers(loss_fn.fc, 0)
        opt = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=1e-4)
        step_t, loss_t = [], []
        for i in range(P["c_reps"] + 2):
            t = time.perf_counter()
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_t.append(time.perf_counter() - t)
            e = model(x).detach().requires_grad_(True)
            t = time.perf_counter()
            loss_fn(e, y).backward()
            loss_t.append(time.perf_counter() - t)
        out[kind] = dict(step_s=float(np.median(step_t[2:])), loss_s=float(np.median(loss_t[2:])))
        log(f"[c] {kind}: {out[kind]}")
    with open(path, "w") as f:
        json.dump(out, f)
    return out


# ----------------------------------------------------------------------------------------------

def write_tables(base_m, rows_a, rows_b, c, C, P, meta, rows_bc=()):
    import pandas as pd
    os.makedirs(RES, exist_ok=True)
    da = pd.DataFrame([{k: v for k, v in r.items() if k != "run"} for r in rows_a])
    da.to_csv(os.path.join(RES, "a_runs.csv"), index=False)
    agg = []
    for (K, tau), g in da.groupby(["K", "tau"], sort=False):
        row = {"config": f"K={K}, tau={tau}" + (" (normalised softmax)" if K == 1 else ""), "K": K, "tau": tau,
               "seeds": len(g)}
        for m in METRICS:
            row[m + "_mean"], row[m + "_std"] = mean_std(g[m])
        row["step_s_mean"] = float(g["step_s"].mean())
        if "early_MAP" in g:
            row["early_MAP_mean"], row["early_MAP_std"] = mean_std(g["early_MAP"])
        agg.append(row)
    dag = pd.DataFrame(agg)
    dag.to_csv(os.path.join(RES, "a_summary.csv"), index=False)
    db = pd.DataFrame([{k: v for k, v in r.items() if k != "pair"} for r in rows_b])
    db.to_csv(os.path.join(RES, "b_ours_vs_pml.csv"), index=False)
    dc = pd.DataFrame([dict(C=Cc, implementation=k, **v) for Cc, cc in c.items() for k, v in cc.items()])
    dc.to_csv(os.path.join(RES, "c_step_time.csv"), index=False)
    dbase = pd.DataFrame([dict(method=k, **v) for k, v in base_m.items()])
    dbase.to_csv(os.path.join(RES, "baselines.csv"), index=False)

    L = [f"# Glyph retrieval results (preset `{meta['preset']}`)", "",
         f"Machine: {meta['machine']} (shared with other jobs, so timings are noisy); torch {torch.__version__}, "
         f"1 thread per run; repository at `{meta['rev']}` when the tables were written. Kanji set: "
         f"{meta['fonts']} fonts, {meta['classes']} classes ({meta['ctr']} train / {meta['cte']} test, "
         f"{meta['n_test']} test images, every one a query against all others). "
         f"Training: {P['steps']} steps x batch {meta['batch']}, small CNN (width {meta['width']}), "
         f"64-d embedding, la=20, gamma=0.1, margin=0.01. Mean ± sample std over seeds {P['seeds']}.", "",
         "## Baselines (no training)", "", "| method | " + " | ".join(METRICS) + " |",
         "|---|" + "---|" * len(METRICS)]
    for k, v in base_m.items():
        L.append(f"| {k} | " + " | ".join(f"{v[m]:.3f}" for m in METRICS) + " |")
    early_step = int(da["early_step"].iloc[0]) if "early_step" in da else None
    L += ["", "## (a) K centers per class vs K = 1", "",
          "Final metrics on all 500 test classes" + (f"; last column: MAP@R after {early_step} of {P['steps']} steps "
          "on a fixed 200-class subset of the test classes (how fast it learns)" if early_step else "") + ".", "",
          "| config | " + " | ".join(METRICS) + " | step s |" + (f" MAP@R @ step {early_step} (subset) |" if early_step else ""),
          "|---|" + "---|" * (len(METRICS) + 1 + bool(early_step))]
    for r in agg:
        L.append(f"| {r['config']} | " + " | ".join(fmt(r[m + '_mean'], r[m + '_std'], 4) for m in METRICS)
                 + f" | {r['step_s_mean']:.3f} |" + (f" {fmt(r['early_MAP_mean'], r['early_MAP_std'])} |" if early_step else ""))
    k1 = next((r for r in agg if r["K"] == 1), None)
    if k1 is not None:
        L += ["", "Difference to K=1 (mean over seeds of the paired per-seed difference, ± std):", "",
              "| config | ΔR@1 | ΔMAP@R | ΔNMI |" + (f" ΔMAP@R @ step {early_step} (subset) |" if early_step else ""),
              "|---|---|---|---|" + ("---|" if early_step else "")]
        for r in agg:
            if r["K"] == 1:
                continue
            g = da[(da.K == r["K"]) & (da.tau == r["tau"])].set_index("seed")
            g1 = da[da.K == 1].set_index("seed")
            s = sorted(set(g.index) & set(g1.index))
            ms = ("R@1", "MAP@R", "NMI") + (("early_MAP",) if early_step else ())
            L.append(f"| {r['config']} | " + " | ".join(
                fmt(*mean_std(g.loc[s, m].values - g1.loc[s, m].values), 4) for m in ms) + " |")
    L += ["", "## (b) our SoftTripleLoss vs pytorch-metric-learning SoftTripleLoss", "",
          "Identical network init, centers, batches and augmentation; K=10. `kanji`: tau=0 (PML's loss alone). "
          "`kanji-200`: 200 classes (100 train), tau=0.2, PML with SparseCentersRegularizer(weight tau).", "",
          "| data | train classes | tau | seed | steps | |loss diff| step 1 | max |loss diff| | max rel diff "
          "| max |metric diff| | R@1 ours / pml | MAP@R ours / pml |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows_b:
        L.append(f"| {r['data']} | {r['classes_train']} | {r['tau']} | {r['seed']} | {r['steps']} | "
                 f"{r['max_abs_loss_diff_step1']:.2e} | {r['max_abs_loss_diff']:.2e} | {r['max_rel_loss_diff']:.2e} | "
                 f"{r['max_abs_metric_diff']:.2e} | {r['R@1_ours']:.4f} / {r['R@1_pml']:.4f} | "
                 f"{r['MAP@R_ours']:.4f} / {r['MAP@R_pml']:.4f} |")
    if rows_bc:
        pd.DataFrame(list(rows_bc)).to_csv(os.path.join(RES, "b_controls.csv"), index=False)
        L += ["", "Controls. *1-ulp*: ours vs ours started from centers multiplied by (1 + 2^-23) — pure float32 "
              "rounding noise, to compare the ours-vs-PML divergence with. *Shadow*: a rerun of ours that also "
              "evaluates PML on the identical embeddings and centers every 10 steps (loss difference; max-abs "
              "gradient difference relative to the gradient's max-abs value).", "",
              "| data | tau | seed | max |loss diff| ours vs PML | ... vs 1-ulp | max |metric diff| ours vs PML "
              "| ... vs 1-ulp | shadow: max |loss diff| | grad emb rel | grad centers rel |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows_bc:
            L.append(f"| {r['data']} | {r['tau']} | {r['seed']} | {r['ours_vs_pml_max_abs_loss_diff']:.2e} | "
                     f"{r['ours_vs_1ulp_max_abs_loss_diff']:.2e} | {r['ours_vs_pml_max_abs_metric_diff']:.2e} | "
                     f"{r['ours_vs_1ulp_max_abs_metric_diff']:.2e} | {r['shadow_max_loss_absdiff']:.1e} | "
                     f"{r['shadow_max_grad_emb_reldiff']:.1e} | {r['shadow_max_grad_fc_reldiff']:.1e} |")
    L += ["", f"## (c) training-step time at kanji class counts (K=10, tau=0.2, batch {meta['batch']}, 1 thread)", "",
          f"C={C} is this benchmark's training class count; C=1000 is the 1,000-class kanji split of the issue. "
          "Full step = CNN forward+backward + loss forward+backward + AdamW; median over repetitions.", "",
          "| C | implementation | full step (s) | loss fwd+bwd (s) | speed-up vs plain: step / loss |",
          "|---|---|---|---|---|"]
    names = {"ours": "ours (softtriple_triton, backend auto)", "reference": "plain formula (reference)",
             "pml": "pytorch-metric-learning + SparseCentersRegularizer"}
    for Cc, cc in c.items():
        for k, v in cc.items():
            sp = (f"x{cc['reference']['step_s'] / v['step_s']:.2f} / x{cc['reference']['loss_s'] / v['loss_s']:.2f}"
                  if "reference" in cc else "")
            L.append(f"| {Cc} | {names[k]} | {v['step_s']:.3f} | {v['loss_s']:.3f} | {sp} |")
    with open(os.path.join(RES, f"results_{meta['preset']}.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    log("\n".join(L))


def plot_curves(rows_a, rows_b, P, preset):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 4, figsize=(21, 4.5))
    cfgs = sorted({(r["K"], r["tau"]) for r in rows_a}, key=lambda t: (t[0], -t[1]))
    cmap = plt.get_cmap("viridis")
    for i, (K, tau) in enumerate(cfgs):
        rs = [r["run"] for r in rows_a if r["K"] == K and r["tau"] == tau]
        col = cmap(i / max(1, len(cfgs) - 1))
        ls = "--" if tau == 0 else "-"
        L = np.array([r["history"]["loss"] for r in rs])
        w = min(10, L.shape[1])
        sm = np.array([np.convolve(l, np.ones(w) / w, mode="valid") for l in L])
        ax[0].plot(np.arange(w, L.shape[1] + 1), sm.mean(0), ls, color=col, label=f"K={K}, tau={tau}")
        es = rs[0]["history"]["eval_step"]
        E = np.array([r["history"]["eval_MAP@R"] for r in rs])
        ax[1].errorbar(es, E.mean(0), yerr=E.std(0), fmt="o" + ls, color=col, capsize=3, label=f"K={K}, tau={tau}")
    ax[0].set(xlabel="step", ylabel="training loss (moving avg 10, mean over seeds)", title="(a) training loss",
              yscale="log")
    ax[1].set(xlabel="step", ylabel="MAP@R on 200 unseen test classes", title="(a) test MAP@R during training")
    ax[0].legend(fontsize=8)
    ax[1].legend(fontsize=8)
    for r in rows_b:
        if r["seed"] != rows_b[0]["seed"]:
            continue
        for loss, ls in (("ours", "-"), ("pml", ":")):
            h = r["pair"][loss]["history"]
            ax[2].plot(h["step"], h["loss"], ls, lw=1.2, label=f"{r['data']} tau={r['tau']}: {loss}")
    ax[2].set(xlabel="step", ylabel="training loss", title="(b) ours vs PML, same init and batches (seed 0)",
              yscale="log")
    ax[2].legend(fontsize=8)
    for r in rows_b:
        if r["seed"] != rows_b[0]["seed"]:
            continue
        lo = np.array(r["pair"]["ours"]["history"]["loss"])
        lp = np.array(r["pair"]["pml"]["history"]["loss"])
        ln, = ax[3].plot(r["pair"]["ours"]["history"]["step"], np.abs(lo - lp) + 1e-9, "-", lw=1,
                         label=f"{r['data']} tau={r['tau']}: |ours - PML|")
        pert = os.path.join(RES, "runs", f"b_{r['data']}_ours-perturbed_tau{r['tau']}_s{r['seed']}_n{r['steps']}.json")
        if os.path.exists(pert):
            with open(pert) as f:
                lq = np.array(json.load(f)["history"]["loss"])
            ax[3].plot(r["pair"]["ours"]["history"]["step"], np.abs(lo - lq) + 1e-9, ":", lw=1.2,
                       color=ln.get_color(), label=f"{r['data']} tau={r['tau']}: |ours - ours(1-ulp start)|")
    ax[3].set(xlabel="step", ylabel="|loss difference| (+1e-9)", yscale="log",
              title="(b) divergence: other implementation vs 1-ulp start")
    ax[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RES, f"training_curves_{preset}.png"), dpi=80)
    plt.close(fig)


def plot_retrieval(data, name, base: Config, preset, n_queries=10, seed=0):
    """Query glyph + its top-8 neighbours among the unseen test classes; wrong ones framed red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(MODELS, f"{name}.pt")
    if not os.path.exists(path):
        return
    _, (xte, yte), _, _ = train.split(data)
    model = train.GlyphNet(base.emb_dim, base.width, base.size)
    model.load_state_dict(torch.load(path))
    emb = train.embed(model, xte)
    raw = train.to_float(xte).flatten(1)
    nn_t = metrics.neighbours(emb, 8)
    nn_r = metrics.neighbours(raw - raw.mean(0), 8)
    rng = np.random.default_rng(seed)
    q = rng.choice(len(yte), n_queries, replace=False)
    fig, axes = plt.subplots(n_queries, 18, figsize=(18 * 0.6, n_queries * 0.68 + 0.3))
    for row, qi in enumerate(q):
        cells = [("q", qi)] + [("t", j) for j in nn_t[qi].tolist()] + [("gap", None)] + [("r", j) for j in nn_r[qi].tolist()]
        for col, (kind, j) in enumerate(cells):
            a = axes[row, col]
            a.set_xticks([])
            a.set_yticks([])
            if kind == "gap":
                a.axis("off")
                continue
            a.imshow(255 - xte[j], cmap="gray", vmin=0, vmax=255)
            color = "blue" if kind == "q" else ("green" if yte[j] == yte[qi] else "red")
            for s in a.spines.values():
                s.set_edgecolor(color)
                s.set_linewidth(2.5 if color != "green" else 1.0)
    axes[0, 0].set_title("query", fontsize=8)
    axes[0, 5].set_title(f"top-8, trained ({name})", fontsize=8, loc="left")
    axes[0, 10].set_title("top-8, raw pixels", fontsize=8, loc="left")
    fig.suptitle("Retrieval on unseen kanji classes: red frame = wrong class", fontsize=9)
    fig.tight_layout(pad=0.2)
    fig.savefig(os.path.join(RES, f"retrieval_examples_{preset}.png"), dpi=70)
    plt.close(fig)


def main():
    global RES, MODELS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--only", default="base,a,b,bc,c", help="comma list of base,a,b,bc,c (bc: controls of b)")
    ap.add_argument("--a-configs", default=None, help="override (a), e.g. 1:0.2,10:0.2 (K:tau, comma list)")
    ap.add_argument("--set", choices=["kanji", "kanji_brush", "latin", "mpl"], default="kanji",
                    help="kanji_brush / latin / mpl: only the baselines and (a)")
    ap.add_argument("--seeds", default=None, help="override the seeds of (a), e.g. 0,1,2")
    ap.add_argument("--out", default=RES, help="results folder (default: results/)")
    a = ap.parse_args()
    RES = a.out
    MODELS = os.path.join(HERE, "cache", "models", os.path.basename(os.path.normpath(RES)))
    P = dict(PRESETS[a.preset])
    if a.seeds:
        P["seeds"] = [int(x) for x in a.seeds.split(",")]
    if a.a_configs:
        P["a_configs"] = [(int(k), float(t)) for k, t in (c.split(":") for c in a.a_configs.split(","))]
    torch.set_num_threads(1)
    if a.set != "kanji":
        return main_latin(a, P)
    base = Config(set="kanji", num_classes=1000, width=16, batch=256)
    data = build_dataset.load_or_build("kanji", base.size, base.num_classes)
    # 200-class subset for the (b) check with PML's O((C*K)^2) regulariser
    keep = data["labels"] < 200
    small = dict(images=data["images"][keep], labels=data["labels"][keep], font_ids=data["font_ids"][keep],
                 chars=data["chars"][:200], fonts=data["fonts"])
    todo = set(a.only.split(","))
    base_m = exp_baselines(data, base.size) if "base" in todo else {}
    rows_a = exp_a(data, P, base) if "a" in todo else []
    rows_b = exp_b(data, P, base, small) if "b" in todo else []
    rows_bc = exp_b_controls(data, P, base, small, rows_b) if "b" in todo and "bc" in todo else []
    C = len(data["chars"]) // 2
    c = {Cc: exp_c(data, P, base, Cc) for Cc in (C, 1000)} if "c" in todo else {}
    _, (_, yte), ctr, cte = train.split(data)
    import subprocess
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    meta = dict(preset=a.preset, machine=f"{os.cpu_count()}-core CPU", rev=rev or "unknown", fonts=len(data["fonts"]),
                classes=len(data["chars"]), ctr=ctr, cte=cte, n_test=len(yte), batch=base.batch, width=base.width)
    if base_m and rows_a and rows_b and c:
        write_tables(base_m, rows_a, rows_b, c, C, P, meta, rows_bc)
        plot_curves(rows_a, rows_b, P, a.preset)
        plot_retrieval(data, f"a_K10_tau0.2_s0_n{P['steps']}", base, a.preset)


def main_latin(a, P):
    global PREFIX
    import pandas as pd
    PREFIX = f"{a.set}_"
    base = Config(set=a.set, width=16, batch=256)
    data = build_dataset.load_or_build(a.set, base.size, base.num_classes)
    base_m = exp_baselines(data, base.size)
    rows_a = exp_a(data, P, base) if "a" in a.only.split(",") else []
    _, (_, yte), ctr, cte = train.split(data)
    da = pd.DataFrame([{k: v for k, v in r.items() if k != "run"} for r in rows_a],
                      columns=["K", "tau", "seed", "early_step", "early_MAP"] + METRICS)
    os.makedirs(RES, exist_ok=True)
    if rows_a:
        da.to_csv(os.path.join(RES, f"{PREFIX}a_runs.csv"), index=False)
    L = [f"# {a.set} set (preset `{a.preset}`)", "",
         f"{len(data['fonts'])} fonts, {len(data['chars'])} classes: {ctr} train ({''.join(data['chars'][:ctr])[:40]}...) / "
         f"{cte} test ({''.join(data['chars'][ctr:])[:40]}...), {len(yte)} test images. Training: {P['steps']} steps x batch "
         f"{base.batch}. Mean ± sample std over seeds {P['seeds']}.", "",
         "| method | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for k, v in base_m.items():
        L.append(f"| {k} | " + " | ".join(f"{v[m]:.3f}" for m in METRICS) + " |")
    agg = []
    for (K, tau), g in da.groupby(["K", "tau"], sort=False):
        row = {"config": f"K={K}, tau={tau}", "K": K, "tau": tau, "seeds": len(g)}
        for m in METRICS:
            row[m + "_mean"], row[m + "_std"] = mean_std(g[m])
        agg.append(row)
        L.append(f"| SoftTriple {row['config']} | " + " | ".join(fmt(row[m + '_mean'], row[m + '_std'], 4) for m in METRICS) + " |")
    if rows_a and (da.K == 1).any():
        es = rows_a[0].get("early_step")
        L += ["", "Paired per-seed difference to K=1 (mean ± std):", "",
              "| config | ΔR@1 | ΔMAP@R | ΔNMI |" + (f" ΔMAP@R @ step {es} (200 test classes) |" if es else ""),
              "|---|---|---|---|" + ("---|" if es else "")]
        ms = ("R@1", "MAP@R", "NMI") + (("early_MAP",) if es else ())
        g1 = da[da.K == 1].set_index("seed")
        for row in agg:
            if row["K"] == 1:
                continue
            g = da[(da.K == row["K"]) & (da.tau == row["tau"])].set_index("seed")
            s_ = sorted(set(g.index) & set(g1.index))
            L.append(f"| {row['config']} | " + " | ".join(
                fmt(*mean_std(g.loc[s_, m].values - g1.loc[s_, m].values), 4) for m in ms) + " |")
    if agg:
        pd.DataFrame(agg).to_csv(os.path.join(RES, f"{PREFIX}a_summary.csv"), index=False)
    with open(os.path.join(RES, f"results_{a.set}_{a.preset}.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    log("\n".join(L))


if __name__ == "__main__":
    main()
