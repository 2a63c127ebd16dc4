"""Build the glyph-retrieval datasets from real typefaces (Debian font packages).

Each character is a class, each (de-duplicated) font is one instance of it. Two sets:

* ``latin``: the 62 characters [0-9A-Za-z] from the Latin font packages in ``latin_font_pkgs.txt``;
  rendered with a *fixed baseline and a per-font scale* (cap height normalised once per font, not per
  glyph), so that case pairs such as c/C, o/O, s/S stay distinguishable by size and position.
* ``kanji``: CJK unified ideographs covered by most of the fonts in ``cjk_font_pkgs.txt``; rendered
  at a fixed per-font size, each glyph centred on its ink box.

Pipeline (everything cached under ``cache/``, deterministic for a given configuration):

1. ``apt-get download`` every package of the list (skips packages already downloaded; packages that
   no longer exist are logged and skipped), ``dpkg-deb -x`` into ``cache/fonts/<pkg>``.
2. Collect the .ttf/.otf/.ttc/.otc files (first face of a collection), read their cmap with fontTools.
   Drop symbol-encoded fonts and fonts that do not cover the character set.
3. Render; drop fonts with empty glyphs, all-caps / small-caps fonts (Latin: lower case looks like
   upper case), symbol / picture fonts (glyphs far from the per-class consensus) and near-duplicate
   fonts (hinted / unhinted copies, renamed copies: rendered probe glyphs almost identical).
4. Save ``cache/<name>.npz`` with ``images`` uint8 [N, S, S] (ink = 255), ``labels``, ``font_ids``,
   ``chars`` (one string per class) and ``fonts`` (file names).

Usage::

    python build_dataset.py --set kanji --num-classes 1000
    python build_dataset.py --set latin
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "cache")
LATIN_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FONT_EXTS = (".ttf", ".otf", ".ttc", ".otc")
CJK_RANGE = (0x4E00, 0x9FFF)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# 1. download + extract
# ----------------------------------------------------------------------------------------------

def read_pkg_list(path: str) -> list[str]:
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def fetch_packages(pkgs: list[str], cache: str = CACHE) -> list[str]:
    """Download (apt-get download) and extract (dpkg-deb -x) each package; return extracted dirs."""
    debs = os.path.join(cache, "debs")
    fonts = os.path.join(cache, "fonts")
    os.makedirs(debs, exist_ok=True)
    os.makedirs(fonts, exist_ok=True)
    out = []
    for p in pkgs:
        dest = os.path.join(fonts, p)
        if os.path.exists(os.path.join(dest, ".done")):
            out.append(dest)
            continue
        have = glob.glob(os.path.join(debs, f"{p}_*.deb"))
        if not have:
            r = subprocess.run(["apt-get", "download", p], cwd=debs, capture_output=True, text=True)
            have = glob.glob(os.path.join(debs, f"{p}_*.deb"))
            if r.returncode != 0 or not have:
                log(f"  [skip] apt-get download {p} failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
        os.makedirs(dest, exist_ok=True)
        r = subprocess.run(["dpkg-deb", "-x", sorted(have)[-1], dest], capture_output=True, text=True)
        if r.returncode != 0:
            log(f"  [skip] dpkg-deb -x {p} failed: {r.stderr.strip()}")
            continue
        open(os.path.join(dest, ".done"), "w").close()
        out.append(dest)
    return out


def font_files(dirs: list[str]) -> list[str]:
    files = []
    for d in dirs:
        for root, _, names in os.walk(d):
            for n in names:
                if n.lower().endswith(FONT_EXTS):
                    p = os.path.join(root, n)
                    if os.path.isfile(p) and not os.path.islink(p):
                        files.append(p)
    return sorted(set(files))


# ----------------------------------------------------------------------------------------------
# 2. cmap
# ----------------------------------------------------------------------------------------------

def read_cmap(path: str) -> tuple[set[int], bool] | None:
    """(codepoints, is_symbol_encoded) of the first face, or None if unreadable."""
    from fontTools.ttLib import TTFont
    try:
        f = TTFont(path, fontNumber=0, lazy=True)
        cmap = f["cmap"]
        symbol = any(t.platformID == 3 and t.platEncID == 0 for t in cmap.tables)
        cps = set(cmap.getBestCmap() or {})
        f.close()
        return cps, symbol
    except Exception as e:  # noqa: BLE001 - broken fonts are simply skipped
        log(f"  [skip] cannot read {os.path.basename(path)}: {type(e).__name__}")
        return None


# ----------------------------------------------------------------------------------------------
# 3. rendering
# ----------------------------------------------------------------------------------------------

def _ink_bbox(font, ch):
    try:
        return font.getbbox(ch, anchor="ls")
    except Exception:  # noqa: BLE001
        return None


def render_font(path: str, chars: str | list[str], size: int, mode: str, oversample: int = 3):
    """Render ``chars`` with one font; returns uint8 [len(chars), size, size] or None on failure.

    mode "baseline": one scale per font (cap height of 'H' = 42% of the canvas, shrunk if the widest
    / tallest glyph would not fit), glyph horizontally centred, baseline fixed at 72% of the height.
    mode "center": one scale per font (em = 88% of the canvas, shrunk if needed), each glyph centred
    on its ink box.
    """
    S = size * oversample
    ref = 200
    try:
        f0 = ImageFont.truetype(path, ref, index=0)
    except Exception:  # noqa: BLE001
        return None
    boxes = [_ink_bbox(f0, ch) for ch in chars]
    if any(b is None or b[2] <= b[0] or b[3] <= b[1] for b in boxes):
        return None  # an empty glyph: the font does not really have the character
    widths = max(b[2] - b[0] for b in boxes)
    if mode == "baseline":
        hb = _ink_bbox(f0, "H")
        cap = -hb[1] if hb is not None else None
        if not cap or cap <= 0:
            return None
        scale = 0.42 * S / cap
        above = max(-b[1] for b in boxes)
        below = max(b[3] for b in boxes)
        scale = min(scale, 0.96 * S / widths, 0.70 * S / max(above, 1), 0.26 * S / max(below, 1e-6)
                    if below > 0 else scale)
    else:
        heights = max(b[3] - b[1] for b in boxes)
        scale = min(0.88 * S / ref, 0.94 * S / widths, 0.94 * S / heights)
    fsize = max(4, int(round(ref * scale)))
    try:
        font = ImageFont.truetype(path, fsize, index=0)
    except Exception:  # noqa: BLE001
        return None
    out = np.zeros((len(chars), size, size), np.uint8)
    for i, ch in enumerate(chars):
        img = Image.new("L", (S, S), 0)
        d = ImageDraw.Draw(img)
        b = font.getbbox(ch, anchor="ls")
        if mode == "baseline":
            x = S / 2 - (b[0] + b[2]) / 2
            y = 0.72 * S
        else:
            x = S / 2 - (b[0] + b[2]) / 2
            y = S / 2 - (b[1] + b[3]) / 2
        d.text((x, y), ch, fill=255, font=font, anchor="ls")
        out[i] = np.asarray(img.resize((size, size), Image.BOX))
    if (out.reshape(len(chars), -1).max(1) < 64).any():
        return None
    return out


def _crop_norm(imgs: np.ndarray, side: int = 16) -> np.ndarray:
    """Crop every image to its ink box, resize to side x side, zero-mean unit-norm vectors."""
    out = np.zeros((len(imgs), side * side), np.float32)
    for i, im in enumerate(imgs):
        ys, xs = np.nonzero(im > 40)
        if len(ys) == 0:
            continue
        c = Image.fromarray(im[ys.min():ys.max() + 1, xs.min():xs.max() + 1]).resize((side, side), Image.BILINEAR)
        v = np.asarray(c, np.float32).ravel()
        v = v - v.mean()
        out[i] = v / (np.linalg.norm(v) + 1e-6)
    return out


def is_all_caps(imgs: np.ndarray, chars: str) -> float:
    """Median similarity of shape-normalised lower vs upper case for letters whose cases differ."""
    pairs = "abdeghnqrt"
    lo = _crop_norm(np.stack([imgs[chars.index(c)] for c in pairs]))
    up = _crop_norm(np.stack([imgs[chars.index(c.upper())] for c in pairs]))
    return float(np.median((lo * up).sum(1)))


def consensus_scores(all_imgs: np.ndarray) -> np.ndarray:
    """all_imgs [F, P, S, S] -> [F] mean correlation of each font's glyphs with the per-class median."""
    F, P = all_imgs.shape[:2]
    v = _crop_norm(all_imgs.reshape(F * P, *all_imgs.shape[2:])).reshape(F, P, -1)
    med = np.median(v, axis=0)
    med = med - med.mean(1, keepdims=True)
    med /= np.linalg.norm(med, axis=1, keepdims=True) + 1e-6
    return (v * med[None]).sum(2).mean(1)


def near_duplicates(all_imgs: np.ndarray, thresh: float) -> np.ndarray:
    """Greedy de-duplication: keep[f] False if font f renders like an earlier kept font
    (sum |a - b| / (sum a + sum b) over the probe glyphs < thresh; distinct fonts of one family,
    e.g. DejaVu Sans vs Sans Bold, score 0.14-0.25, hinted / unhinted copies well below 0.05)."""
    F = all_imgs.shape[0]
    X = all_imgs.reshape(F, -1).astype(np.float32) / 255.0
    keep = np.ones(F, bool)
    for i in range(F):
        if not keep[i]:
            continue
        d = np.abs(X[i + 1:] - X[i]).sum(1) / (X[i + 1:].sum(1) + X[i].sum() + 1e-6)
        dup = np.nonzero(d < thresh)[0] + i + 1
        keep[dup] = False
    return keep


# ----------------------------------------------------------------------------------------------
# 4. the two datasets
# ----------------------------------------------------------------------------------------------

def _config_hash(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


def build(files: list[str], chars: list[str] | None, size: int, mode: str, *, set_name: str,
          num_classes: int | None = None, min_coverage: float = 0.85, dup_thresh: float = 0.05,
          consensus_min: float = 0.45, caps_max: float = 0.80, probe: int = 64, seed: int = 0,
          verbose: bool = True) -> dict:
    """Filter fonts, pick classes, render. Returns dict of arrays (see module docstring)."""
    t0 = time.time()
    cmaps = {}
    for p in files:
        r = read_cmap(p)
        if r is None:
            continue
        cps, symbol = r
        if symbol:
            if verbose:
                log(f"  [drop symbol-encoded] {os.path.basename(p)}")
            continue
        cmaps[p] = cps
    if chars is None:  # kanji: pick the ideographs most fonts cover
        cands = [p for p, c in cmaps.items() if sum(CJK_RANGE[0] <= u <= CJK_RANGE[1] for u in c) >= 1500]
        cmaps = {p: cmaps[p] for p in cands}
        counts = np.zeros(CJK_RANGE[1] + 1, np.int32)
        for p in cands:
            for u in cmaps[p]:
                if CJK_RANGE[0] <= u <= CJK_RANGE[1]:
                    counts[u] += 1
        # coverage counted over *distinct* fonts later; here a first cut
        order = sorted(range(CJK_RANGE[0], CJK_RANGE[1] + 1), key=lambda u: (-counts[u], u))
        pool = [chr(u) for u in order[: max(num_classes or 2000, 2000) * 2]]
    else:
        pool = list(chars)
    # probe glyphs used for filtering / dedup
    rng = np.random.default_rng(seed)
    if chars is None:
        probe_chars = [pool[i] for i in sorted(rng.choice(min(len(pool), 1000), probe, replace=False))]
    else:
        probe_chars = list(chars)
    kept_files, probe_imgs = [], []
    for p in sorted(cmaps):
        if not all(ord(c) in cmaps[p] for c in probe_chars):
            continue
        im = render_font(p, probe_chars, size, mode)
        if im is None:
            if verbose:
                log(f"  [drop unrenderable/empty] {os.path.basename(p)}")
            continue
        if mode == "baseline":
            caps = is_all_caps(im, "".join(probe_chars))
            if caps > caps_max:
                if verbose:
                    log(f"  [drop all-caps {caps:.2f}] {os.path.basename(p)}")
                continue
        kept_files.append(p)
        probe_imgs.append(im)
    if not kept_files:
        raise RuntimeError("no usable fonts")
    probe_imgs = np.stack(probe_imgs)
    cons = consensus_scores(probe_imgs)
    ok = cons >= consensus_min
    for p, c in zip(kept_files, cons):
        if c < consensus_min and verbose:
            log(f"  [drop symbol/picture, consensus {c:.2f}] {os.path.basename(p)}")
    kept_files = [p for p, o in zip(kept_files, ok) if o]
    probe_imgs = probe_imgs[ok]
    keep = near_duplicates(probe_imgs, dup_thresh)
    if verbose:
        for p, k in zip(kept_files, keep):
            if not k:
                log(f"  [drop near-duplicate] {os.path.basename(p)}")
    kept_files = [p for p, k in zip(kept_files, keep) if k]
    F = len(kept_files)
    if chars is None:
        cov = np.array([sum(ord(ch) in cmaps[p] for p in kept_files) for ch in pool])
        sel = [ch for ch, c in sorted(zip(pool, cov), key=lambda t: (-t[1], ord(t[0]))) if c >= min_coverage * F]
        classes = sorted(sel[:num_classes], key=ord)
        if num_classes and len(classes) < num_classes:
            log(f"  only {len(classes)} ideographs reach coverage {min_coverage}")
    else:
        classes = list(chars)
    images, labels, font_ids = [], [], []
    for fi, p in enumerate(kept_files):
        have = [c for c in classes if ord(c) in cmaps[p]]
        im = render_font(p, have, size, mode)
        if im is None:  # some glyph in the full set is empty: render one by one is too slow; keep covered subset
            good = []
            for c in have:
                one = render_font(p, [c] + probe_chars[:4], size, mode)
                if one is not None:
                    good.append(c)
            have = good
            im = render_font(p, have, size, mode) if have else None
            if im is None:
                continue
        images.append(im)
        labels.extend(classes.index(c) for c in have)
        font_ids.extend([fi] * len(have))
    out = dict(images=np.concatenate(images), labels=np.array(labels, np.int64),
               font_ids=np.array(font_ids, np.int64), chars=np.array(classes),
               fonts=np.array([os.path.relpath(p, CACHE) if p.startswith(CACHE) else os.path.basename(p)
                               for p in kept_files]))
    if verbose:
        log(f"[{set_name}] {F} fonts kept of {len(files)} files, {len(classes)} classes, "
            f"{len(out['labels'])} images, {time.time() - t0:.0f}s")
    return out


def matplotlib_font_files() -> list[str]:
    """Fonts shipped inside matplotlib (used by the offline smoke test)."""
    import matplotlib
    d = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    return sorted(glob.glob(os.path.join(d, "*.ttf")))


def load_or_build(set_name: str, size: int = 32, num_classes: int = 1000, cache: str = CACHE,
                  verbose: bool = True) -> dict:
    cfg = dict(set=set_name, size=size, num_classes=num_classes if set_name.startswith("kanji") else None, v=3)
    path = os.path.join(cache, f"{set_name}_{_config_hash(cfg)}.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if set_name == "latin":
        dirs = fetch_packages(read_pkg_list(os.path.join(HERE, "latin_font_pkgs.txt")), cache)
        data = build(font_files(dirs), LATIN_CHARS, size, "baseline", set_name="latin", verbose=verbose)
    elif set_name == "kanji":
        dirs = fetch_packages(read_pkg_list(os.path.join(HERE, "cjk_font_pkgs.txt")), cache)
        data = build(font_files(dirs), None, size, "center", set_name="kanji", num_classes=num_classes,
                     verbose=verbose)
    elif set_name == "kanji_brush":
        # the kanji set with a looser symbol/picture filter (consensus >= 0.2 instead of 0.45), which keeps
        # the brush / cursive fonts (Kouzan gyosho and sousho, Aoyagi Soseki) the default filter drops
        dirs = fetch_packages(read_pkg_list(os.path.join(HERE, "cjk_font_pkgs.txt")), cache)
        data = build(font_files(dirs), None, size, "center", set_name=set_name, num_classes=num_classes,
                     consensus_min=0.2, verbose=verbose)
    elif set_name == "mpl":
        data = build(matplotlib_font_files(), LATIN_CHARS, size, "baseline", set_name="mpl", verbose=verbose)
    else:
        raise ValueError(set_name)
    os.makedirs(cache, exist_ok=True)
    np.savez_compressed(path, **data)
    return data


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=["latin", "kanji", "kanji_brush", "mpl"], default="kanji")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--num-classes", type=int, default=1000)
    a = ap.parse_args()
    d = load_or_build(a.set, a.size, a.num_classes)
    print(f"{a.set}: images {d['images'].shape}, classes {len(d['chars'])}, fonts {len(d['fonts'])}")


if __name__ == "__main__":
    main()
