"""How the COVID-SemiSeg slices were made from CT, measured on the slices; and real CTs made the same way.

The 8-bit training slices of the 2D infection model (COVID-SemiSeg: 50 MedSeg slices, 1,600 slices of the 20
Zenodo cases) carry no Hounsfield units. This script measures, separately for each source (MedSeg, the
coronacases stored in HU, the radiopaedia cases stored pre-windowed):

1. **window**: per slice, the 8-bit levels of air (the gas in the trachea, bronchi, oesophagus: dark regions
   enclosed by tissue), lung parenchyma, fat and soft tissue (the two peaks of the histogram of the non-lung
   pixels, found as minima of its second derivative, so a shoulder counts) and the share of saturated pixels;
   a least-squares line ``level = a + b * HU`` through air -1000, fat -100 and soft tissue +40 HU, its
   residuals, and the window ``[-a / b, (255 - a) / b]`` HU with a bootstrap interval over slices. The same
   level finder run on real CTs in HU (rendered over :data:`MEASURE_WINDOW_HU`) checks that it returns those HU;
2. **orientation**: per slice, the axis that separates the two lungs, the side the mediastinum (the heart)
   bulges to, the side of the smaller lung and the side of the bone mass (the spine); the same on canonical
   slices of real CTs, whose orientation is known;
3. **crop**: the gap between the lungs' box and each image edge, as a fraction of the lungs' extent, and how
   much the box shrinks within a case (image size / the case's largest);
4. **stride**: on phantom infection masks (1.25 mm slices), the Dice between the mask rebuilt from every k-th
   slice by linear interpolation (:func:`covidseg.inference.slices.restore_volume`'s rule) and the full mask;
5. the real CTs through :func:`covidseg.inference.slices.prepare_slices` (classical lungs): the same levels,
   orientation and margins, compared with the training slices; ``--checkpoint`` also runs a 2D model on them
   under each source's window and reports the infection it finds (these CTs have no COVID-19).

Writes ``docs/results/semiseg_convention.json`` and ``docs/images/slice_convention.png`` (training slices beside
real CT slices prepared by ``covidseg.inference.slices``)::

    python benchmarks/semiseg_convention.py --data ../shared/data
    python benchmarks/semiseg_convention.py --data ../shared/data --checkpoint default   # + model check
    python benchmarks/semiseg_convention.py --parts stride          # one section again, the others kept

Each section of the results file carries its own stamp (commit, machine, date, command) under ``stamps``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

try:
    import covidseg  # noqa: F401
except ImportError:  # a plain checkout: use its src/ folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image

from covidseg.inference.slices import (
    SliceBox,
    SliceConvention,
    prepare_slices,
    restore_volume,
    slice_stride,
    window,
)
from covidseg.io.atomic import atomic_write_text

SOURCES = {
    "medseg": "covid-semiseg/train/Imgs/*.jpg",
    "coronacases": "covid-semiseg/pseudo/Imgs/Data-1_coronacases_*.jpg",
    "radiopaedia": "covid-semiseg/pseudo/Imgs/Data-1_radiopaedia_*.jpg",
}
"""Training-slice sources, relative to ``--data``."""
REFERENCE_HU = {"air": -1000.0, "fat": -100.0, "soft": 40.0}
"""HU of the fitted tissues: air; subcutaneous / mediastinal fat; muscle and unenhanced blood."""
MEASURE_WINDOW_HU = (-1250.0, 250.0)
"""Real CTs are rendered over this window to measure their levels in HU (air to soft tissue unclipped)."""
REAL_CTS = ("lidc-idri-0314", "chest-2mm-00")
"""Real CTs (``real-ct/<name>/ct.nii.gz``) prepared and measured."""
SATURATED = 250
"""8-bit levels at or above this count as saturated (the histogram peaks are searched below it)."""
MIN_SEPARATION = 5.0
"""Fat and soft-tissue peaks must be at least this many levels apart."""
STRIDE_SPACINGS_MM = (1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5)
"""Minimum processed-slice spacings (mm) of the stride study."""


# ------------------------------------------------------------------------------------------------ levels


def _dark_and_body(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median-filtered image, dark (below Otsu) mask and eroded body (non-dark) mask."""
    a = ndimage.median_filter(img, 3).astype(np.float64)  # the jpgs' block noise
    dark = a < threshold_otsu(a)
    return a, dark, ndimage.binary_erosion(~dark, iterations=2)


def tissue_peaks(values: np.ndarray, low: float) -> tuple[float | None, float | None]:
    """``(fat, soft)``: the two strongest peaks or shoulders of a non-lung histogram (8-bit levels)."""
    edges = np.arange(np.floor(low), SATURATED + 1.0)
    if edges.size < 8:
        return None, None
    hist, _ = np.histogram(values, edges)
    centres = (edges[:-1] + edges[1:]) / 2
    smooth = ndimage.gaussian_filter1d(hist.astype(np.float64), 2.0)
    d2 = np.gradient(np.gradient(smooth))
    cand = [i for i in range(2, len(smooth) - 2) if d2[i] < 0 and d2[i] <= d2[i - 1] and d2[i] <= d2[i + 1]]
    if not cand:
        return None, None
    soft = max(cand, key=lambda i: smooth[i])
    lower = [i for i in cand if centres[soft] - MIN_SEPARATION > centres[i] > low + MIN_SEPARATION
             and smooth[i] > 0.1 * smooth[soft]]
    fat = max(lower, key=lambda i: smooth[i]) if lower else None
    return (float(centres[fat]) if fat is not None else None), float(centres[soft])


def air_level(a: np.ndarray, dark: np.ndarray, lung: float) -> float | None:
    """Median level of the darkest enclosed gas region (trachea, bronchus, oesophagus), or ``None``.

    Candidates: dark components of 40 px to 2.5 % of the image not touching its edge, at least 15 px left after
    a 2 px erosion (no partial volume), darker than the lung parenchyma.
    """
    lab, _ = ndimage.label(dark)
    best = None
    for j, sl in enumerate(ndimage.find_objects(lab), 1):
        comp = lab[sl] == j
        size = int(comp.sum())
        edge = sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == a.shape[0] or sl[1].stop == a.shape[1]
        if size < 40 or size > 0.025 * a.size or edge:
            continue
        inner = ndimage.binary_erosion(comp, iterations=2)
        if inner.sum() < 15:
            continue
        level = float(np.median(a[sl][inner]))
        if level < lung - 3 and (best is None or level < best):
            best = level
    return best


def slice_levels(img: np.ndarray) -> dict[str, float | None]:
    """Levels of one 8-bit slice: air, lung, fat, soft tissue, and the shares of saturated and black pixels."""
    a, dark, body = _dark_and_body(img)
    lung = float(np.median(a[ndimage.binary_erosion(dark, iterations=3)])) if dark.sum() > 100 else None
    fat, soft = tissue_peaks(a[body & (a < SATURATED)], float(threshold_otsu(a)))
    return {
        "air": air_level(a, dark, lung) if lung is not None else None,
        "lung": lung, "fat": fat, "soft": soft,
        "saturated": float((img >= SATURATED).mean()), "black": float((img <= 2).mean()),
    }


def fit_window(levels: dict[str, list[float]]) -> dict[str, Any]:
    """Least-squares ``level = a + b * HU`` over every measured (tissue, level) pair; the implied window."""
    x = np.concatenate([np.full(len(v), REFERENCE_HU[k]) for k, v in levels.items()])
    y = np.concatenate([np.asarray(v, np.float64) for v in levels.values()])
    b, a = np.polyfit(x, y, 1)
    resid = {k: float(np.median(np.asarray(v) - (a + b * REFERENCE_HU[k]))) for k, v in levels.items()}
    rms = {k: float(np.sqrt(np.mean((np.asarray(v) - (a + b * REFERENCE_HU[k])) ** 2))) for k, v in levels.items()}
    return {"slope_per_hu": float(b), "intercept": float(a), "window_hu": [float(-a / b), float((255 - a) / b)],
            "median_residual": resid, "rms_residual": rms}


def bootstrap_window(rows: list[dict[str, Any]], n: int, seed: int) -> dict[str, list[float]]:
    """95 % interval of the fitted window's ends, resampling slices."""
    rng = np.random.default_rng(seed)
    ends = []
    for _ in range(n):
        pick = [rows[i] for i in rng.integers(0, len(rows), len(rows))]
        ends.append(fit_window(_pairs(pick))["window_hu"])
    e = np.asarray(ends)
    return {"low": np.percentile(e[:, 0], [2.5, 97.5]).tolist(), "high": np.percentile(e[:, 1], [2.5, 97.5]).tolist()}


def _pairs(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    return {k: [r[k] for r in rows if r.get(k) is not None] for k in REFERENCE_HU}


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = np.asarray(values, np.float64)
    return {"n": int(v.size), "median": float(np.median(v)), "p25": float(np.percentile(v, 25)),
            "p75": float(np.percentile(v, 75)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}


# ------------------------------------------------------------------------------------- orientation, crop


def lung_components(img: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The two largest dark components (each >= 1 % of the image), largest first, or ``None``."""
    _, dark, _ = _dark_and_body(img)
    dark = ndimage.binary_opening(dark, iterations=2)
    lab, n = ndimage.label(dark)
    if n < 2:
        return None
    sizes = ndimage.sum(dark, lab, range(1, n + 1))
    order = np.argsort(sizes)[::-1][:2]
    if sizes[order[1]] < 0.01 * img.size:
        return None
    return lab == order[0] + 1, lab == order[1] + 1


def orientation_evidence(img: np.ndarray) -> dict[str, Any] | None:
    """Anatomical landmarks of one slice, as signs along the image axes (+1 = towards higher index).

    Returns ``lung_axis`` (0 rows / 1 columns: the axis separating the two lungs), ``bone`` (the side of the
    bright bone mass inside the lungs' hull, i.e. the spine, along the other axis), ``heart`` (the side, along
    the lung axis, of the non-lung tissue in the anterior half of the hull, i.e. the heart and great vessels,
    relative to the spine, which marks the midline) and ``smaller_lung`` (the side of the smaller lung);
    ``None`` without two lungs, a spine or a mediastinum.
    """
    comps = lung_components(img)
    if comps is None:
        return None
    big, small = comps
    c_big, c_small = np.array(ndimage.center_of_mass(big)), np.array(ndimage.center_of_mass(small))
    axis = int(np.argmax(np.abs(c_small - c_big)))
    other = 1 - axis
    lungs = big | small
    hull = convex_hull_image(lungs)
    a, dark, body = _dark_and_body(img)
    soft = tissue_peaks(a[body & (a < SATURATED)], float(threshold_otsu(a)))[1]
    bone_level = (soft + 255.0) / 2.0 if soft is not None else float(SATURATED)
    bone_mask = body & hull & (a >= bone_level)
    if bone_mask.sum() < 20:
        return None
    spine = np.array(ndimage.center_of_mass(bone_mask))
    coords = np.argwhere(hull)
    centre = (coords.min(axis=0) + coords.max(axis=0)) / 2.0
    position = np.indices(img.shape)[other]
    anterior = position < centre[other] if spine[other] > centre[other] else position > centre[other]
    media = hull & ~dark & ~lungs & anterior
    if media.sum() < 50:
        return None
    heart = float(ndimage.center_of_mass(media)[axis] - spine[axis])
    return {"lung_axis": axis, "bone": int(np.sign(spine[other] - centre[other])), "heart": int(np.sign(heart)),
            "smaller_lung": int(np.sign(c_small[axis] - c_big[axis]))}


def summarize_orientation(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Shares of slices: lungs separated along rows; heart / smaller lung towards +rows; bone towards +columns."""
    along_rows = [r for r in rows if r["lung_axis"] == 0]
    along_cols = [r for r in rows if r["lung_axis"] == 1]

    def share(items: list[dict[str, Any]], key: str) -> float | None:
        return float(np.mean([r[key] > 0 for r in items])) if items else None

    return {
        "n": len(rows), "lungs_along_rows": len(along_rows) / max(len(rows), 1),
        "rows": {"heart_towards_higher_row": share(along_rows, "heart"),
                 "smaller_lung_towards_higher_row": share(along_rows, "smaller_lung"),
                 "bone_towards_higher_column": share(along_rows, "bone")},
        "columns": {"heart_towards_higher_column": share(along_cols, "heart"),
                    "smaller_lung_towards_higher_column": share(along_cols, "smaller_lung"),
                    "bone_towards_higher_row": share(along_cols, "bone")},
    }


def lung_margins(img: np.ndarray) -> dict[str, float] | None:
    """Gap between the lungs' box and each image edge, as a fraction of the lungs' extent along that axis."""
    comps = lung_components(img)
    if comps is None:
        return None
    lungs = comps[0] | comps[1]
    r, c = np.flatnonzero(lungs.any(1)), np.flatnonzero(lungs.any(0))
    hr, wc = r[-1] - r[0] + 1, c[-1] - c[0] + 1
    return {"top": r[0] / hr, "bottom": (img.shape[0] - 1 - r[-1]) / hr,
            "left": c[0] / wc, "right": (img.shape[1] - 1 - c[-1]) / wc, "aspect": hr / wc}


# ------------------------------------------------------------------------------------- training slices


def _case(path: Path) -> str:
    return re.sub(r"_\d+$", "", path.stem)


def _read_grey(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def measure_source(files: list[Path], bootstrap: int, seed: int) -> dict[str, Any]:
    """Levels, window fit, orientation, margins and box sizes of one source's slices."""
    rows, orient, margins = [], [], []
    sizes: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for f in files:
        img = _read_grey(f)
        rows.append({"name": f.name, **slice_levels(img)})
        o = orientation_evidence(img)
        if o is not None:
            orient.append(o)
        m = lung_margins(img)
        if m is not None:
            margins.append(m)
        sizes[_case(f)].append(img.shape)
    fit = fit_window(_pairs(rows))
    shrink = {k: (float(np.min([s[0] for s in v]) / np.max([s[0] for s in v])),
                  float(np.min([s[1] for s in v]) / np.max([s[1] for s in v]))) for k, v in sizes.items() if len(v) > 1}
    return {
        "slices": len(files),
        "levels": {k: _summary([r[k] for r in rows if r[k] is not None])
                   for k in ("air", "lung", "fat", "soft", "saturated", "black")},
        "fit": fit, "fit_95ci": bootstrap_window(rows, bootstrap, seed) if bootstrap else None,
        "orientation": summarize_orientation(orient),
        "margins": {k: _summary([m[k] for m in margins]) for k in ("top", "bottom", "left", "right", "aspect")},
        "image_size_px": {"rows": _summary([s[0] for v in sizes.values() for s in v]),
                          "columns": _summary([s[1] for v in sizes.values() for s in v])},
        "box_shrink_within_case": ({"rows": _summary([v[0] for v in shrink.values()]),
                                    "columns": _summary([v[1] for v in shrink.values()])} if shrink else None),
        "per_slice": rows,
    }


def coronacases_scaling(files: list[Path], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-slice vs per-volume scaling of the coronacases: the top level, and the soft-tissue level by case."""
    tops, near_top = [], []
    for f in files:
        img = _read_grey(f)
        tops.append(int(img.max()))
        near_top.append(float((img >= 253).mean()))
    soft: dict[str, list[float]] = defaultdict(list)
    for f, r in zip(files, rows, strict=True):
        if r["soft"] is not None:
            soft[_case(f)].append(r["soft"])
    within = float(np.median([np.std(v) for v in soft.values()]))
    between = float(np.std([np.median(v) for v in soft.values()]))
    return {"share_of_slices_reaching_250": float(np.mean(np.asarray(tops) >= 250)),
            "median_share_of_pixels_at_253_or_more": float(np.median(near_top)),
            "soft_level_sd_within_case_median": within, "soft_level_sd_between_cases": between}


# ------------------------------------------------------------------------------------------- real CTs


def load_real_ct(data: Path, name: str) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray, float]:
    """Canonical HU volume, spacing, classical lung labels and the lungs' time (s) of one real CT."""
    from covidseg.inference.lungs import classical_lungs
    from covidseg.io.image import read_image

    ct = read_image(data / "real-ct" / name / "ct.nii.gz")
    t = time.perf_counter()
    lungs = classical_lungs(ct.array, ct.spacing)
    spacing = (float(ct.spacing[0]), float(ct.spacing[1]), float(ct.spacing[2]))
    return ct.array, spacing, lungs, time.perf_counter() - t


def real_ct_in_hu(hu: np.ndarray, lungs: np.ndarray, every: int) -> dict[str, Any]:
    """The level finder on real CT slices (lungs' box, canonical and laid out as training): HU and orientation."""
    lo, hi = MEASURE_WINDOW_HU
    rows, canonical, laid = [], [], []
    for k in np.flatnonzero(lungs.any(axis=(1, 2)))[::every]:
        m = lungs[k] > 0
        r, c = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if r.size < 50 or c.size < 50:
            continue
        img = np.round(window(hu[k, r[0]:r[-1] + 1, c[0]:c[-1] + 1], MEASURE_WINDOW_HU) * 255).astype(np.uint8)
        levels = slice_levels(img)
        rows.append({t: (lo + v / 255.0 * (hi - lo) if v is not None else None)
                     for t, v in levels.items() if t in ("air", "lung", "fat", "soft")})
        for target, image in ((canonical, img), (laid, np.ascontiguousarray(img.T))):
            o = orientation_evidence(image)
            if o is not None:
                target.append(o)
    return {"levels_hu": {t: _summary([r[t] for r in rows if r[t] is not None]) for t in ("air", "lung", "fat", "soft")},
            "orientation_canonical": summarize_orientation(canonical),
            "orientation_transposed": summarize_orientation(laid)}


def prepared_stats(hu: np.ndarray, spacing: tuple[float, float, float], lungs: np.ndarray,
                   cfg: SliceConvention) -> tuple[dict[str, Any], np.ndarray]:
    """Levels, orientation and margins of the real CT's slices as ``prepare_slices`` makes them."""
    t = time.perf_counter()
    prep = prepare_slices(hu, spacing, lungs, cfg)
    seconds = time.perf_counter() - t
    imgs = np.round(prep.images[:, 0] * 255).astype(np.uint8)
    rows = [slice_levels(im) for im in imgs]
    orient = [o for o in (orientation_evidence(im) for im in imgs) if o is not None]
    margins = [m for m in (lung_margins(im) for im in imgs) if m is not None]
    quant = np.percentile(imgs.reshape(len(imgs), -1), [5, 25, 50, 75, 95], axis=1).T if len(imgs) else np.zeros((0, 5))
    return {
        "slices": len(prep), "stride": slice_stride(spacing[0], cfg.min_slice_spacing_mm), "prepare_s": seconds,
        "levels": {k: _summary([r[k] for r in rows if r[k] is not None])
                   for k in ("air", "lung", "fat", "soft", "saturated", "black")},
        "quantiles_5_25_50_75_95": [float(v) for v in np.median(quant, axis=0)] if len(imgs) else None,
        "orientation": summarize_orientation(orient),
        "margins": {k: _summary([m[k] for m in margins]) for k in ("top", "bottom", "left", "right", "aspect")},
    }, imgs


def training_quantiles(files: list[Path]) -> list[dict[str, float] | None]:
    """Per-slice 5/25/50/75/95th percentiles of the training slices (resized like the model input)."""
    q = np.asarray([np.percentile(_read_grey(f), [5, 25, 50, 75, 95]) for f in files])
    return [_summary(list(q[:, j])) for j in range(5)]


# ------------------------------------------------------------------------------------------------- stride


def stride_study(seeds: list[int]) -> dict[str, Any]:
    """Dice of phantom infection rebuilt from every k-th slice (linear interpolation, >= 0.5) vs the full mask.

    Per phantom and requested minimum spacing: the stride :func:`slice_stride` picks, the spacing it gives and
    the Dice; the slices are chosen by :func:`covidseg.inference.slices.choose_slices` over the infected range.
    """
    from covidseg.inference.slices import choose_slices, interpolate_gaps
    from covidseg.phantom import make_phantom

    rows = []
    for seed in seeds:
        ph = make_phantom("coronacases", seed, scale=1.0)
        inf = (ph.infection > 0).astype(np.float32)
        ks = np.flatnonzero(inf.any(axis=(1, 2)))
        dz = float(ph.spacing[0])
        h, w = inf.shape[1:]
        for mm in STRIDE_SPACINGS_MM:
            stride = slice_stride(dz, mm)
            keep = choose_slices(int(ks[0]), int(ks[-1]), stride)
            vol = np.zeros_like(inf)
            vol[keep] = inf[keep]
            interpolate_gaps(vol, [SliceBox(k, (0, h), (0, w)) for k in keep])
            pred, ref = vol >= 0.5, inf > 0
            rows.append({"seed": seed, "slice_mm": dz, "min_spacing_mm": mm, "stride": stride,
                         "processed_spacing_mm": stride * dz, "processed_share": len(keep) / (int(ks[-1]) - int(ks[0]) + 1),
                         "infection_ml": float(ref.sum()) * float(np.prod(ph.spacing)) / 1000.0,
                         "dice": 2.0 * float((pred & ref).sum()) / float(pred.sum() + ref.sum())})
        del ph
    return {"rows": rows, "seeds": seeds}


# ------------------------------------------------------------------------------------------- model check


def model_check(checkpoint: str, cts: dict[str, Any], windows: dict[str, list[float]]) -> dict[str, Any]:
    """Share of the lung volume a 2D model calls infection (p >= 0.5) on each real CT, under each window."""
    import torch

    from covidseg.inference.slices import predict_slices
    from covidseg.semiseg.evaluate import load_semiseg_model

    model, meta = load_semiseg_model(checkpoint, torch.device("cpu"))
    size = int(meta.get("input_size", [352])[0])
    out: dict[str, Any] = {"checkpoint": str(meta["checkpoint"]), "variant": meta.get("variant"), "size": size}
    for name, (hu, spacing, lungs) in cts.items():
        lung = lungs > 0
        for wname, win in windows.items():
            cfg = SliceConvention(size=size, window_hu=(win[0], win[1]))
            t = time.perf_counter()
            prep = prepare_slices(hu, spacing, lungs, cfg)
            probs = predict_slices(model, prep.images, batch_size=8)
            vol = restore_volume(probs, prep)
            out[f"{name}/{wname}"] = {"infection_share_of_lung": float((vol[lung] >= 0.5).mean()),
                                      "slices": len(prep), "seconds": time.perf_counter() - t}
            print(f"  model {name} window {wname} {win}: {out[f'{name}/{wname}']}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------- figure


def make_figure(path: Path, examples: dict[str, list[Path]], prepared: dict[str, np.ndarray], size: int) -> None:
    """Top row: training slices of each source; bottom row: real CT slices prepared by ``prepare_slices``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(src: str, path: Path) -> str:
        stem = path.stem.replace("Data-1_", "").replace("_org", "").replace("_covid-19-pneumonia-", "_")
        return f"{src}: {stem.replace('-dcm', '')}" if src != "medseg" else f"MedSeg {path.name}"

    top = [(label(src, p), np.asarray(Image.fromarray(_read_grey(p)).resize((size, size), Image.BILINEAR)))
           for src, files in examples.items() for p in files]
    bottom = [(f"{name} slice {i + 1}/{len(imgs)}", imgs[i]) for name, imgs in prepared.items()
              for i in np.linspace(len(imgs) * 0.3, len(imgs) * 0.7, 3).astype(int)]
    cols = max(len(top), len(bottom))
    fig, axes = plt.subplots(2, cols, figsize=(2.2 * cols, 4.9))
    for row, items in enumerate((top, bottom)):
        for j in range(cols):
            ax = axes[row, j]
            ax.axis("off")
            if j < len(items):
                ax.imshow(items[j][1], cmap="gray", vmin=0, vmax=255)
                ax.set_title(items[j][0], fontsize=6)
    fig.suptitle("top: COVID-SemiSeg training slices (resized to the model input); bottom: real CTs prepared by "
                 "covidseg.inference.slices (window, orientation, crop)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main


def _rounded(obj: Any, digits: int = 5) -> Any:
    """``obj`` with every float rounded to ``digits`` significant digits (a smaller, readable results file)."""
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(f"{float(obj):.{digits}g}")
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _stamp() -> dict[str, Any]:
    from covidseg.training.trainer import code_version, machine_description

    return {"code": code_version(), "machine": machine_description("cpu"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


PARTS = ("sources", "real_ct", "stride", "model_check")
"""Sections of the results file; ``--parts`` reruns some and keeps the others of an existing file."""


def run_sources(data: Path, pseudo_every: int, bootstrap: int, seed: int) -> dict[str, Any]:
    """The training slices of every source: levels, fit, orientation, crop (and the coronacases' scaling)."""
    out: dict[str, Any] = {}
    for src, files in source_files(data, pseudo_every).items():
        t = time.perf_counter()
        out[src] = measure_source(files, bootstrap, seed)
        out[src]["quantiles_5_25_50_75_95"] = training_quantiles(files)
        fit = out[src]["fit"]
        print(f"{src}: {len(files)} slices, window {np.round(fit['window_hu'], 0)} HU, "
              f"rms residual {fit['rms_residual']} ({time.perf_counter() - t:.0f} s)", flush=True)
        if src == "coronacases":
            out[src]["scaling"] = coronacases_scaling(files, out[src]["per_slice"])
    return out


def source_files(data: Path, pseudo_every: int = 1) -> dict[str, list[Path]]:
    """The slice files of each source (every ``pseudo_every``-th pseudo-labelled slice)."""
    files = {src: sorted(data.glob(pat)) for src, pat in SOURCES.items()}
    missing = [SOURCES[s] for s, f in files.items() if not f]
    if missing:
        raise SystemExit(f"no slices found under {data} for {missing}; give --data the folder holding covid-semiseg/")
    return {src: (f if src == "medseg" else f[::pseudo_every]) for src, f in files.items()}


def run_real(data: Path, cfg: SliceConvention) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """The real CTs: levels in HU, and their slices as ``prepare_slices`` makes them."""
    out, prepared, cts = {}, {}, {}
    for name in REAL_CTS:
        hu, spacing, lungs, lung_s = load_real_ct(data, name)
        cts[name] = (hu, spacing, lungs)
        stats, imgs = prepared_stats(hu, spacing, lungs, cfg)
        out[name] = {"shape": list(hu.shape), "spacing_mm": list(spacing), "lungs_s": lung_s,
                     "hu_measurement": real_ct_in_hu(hu, lungs, every=4), "prepared": stats}
        prepared[name] = imgs
        print(f"{name}: {stats['slices']} slices (stride {stats['stride']}), levels "
              f"{ {k: (v or {}).get('median') for k, v in stats['levels'].items()} }", flush=True)
    return out, prepared, cts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[1]
    p.add_argument("--data", type=Path, default=root / ".." / "shared" / "data")
    p.add_argument("--out", type=Path, default=root / "docs" / "results" / "semiseg_convention.json")
    p.add_argument("--figure", type=Path, default=root / "docs" / "images" / "slice_convention.png")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="sections to (re)compute; the others are kept from an existing --out")
    p.add_argument("--pseudo-every", type=int, default=1, help="measure every n-th pseudo-labelled slice")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--stride-seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--checkpoint", default=None, help="the 2D model of the model_check part ('default')")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = SliceConvention()
    parts = set(args.parts) - (set() if args.checkpoint else {"model_check"})
    keep = parts != set(PARTS) and args.out.is_file()
    result: dict[str, Any] = json.loads(args.out.read_text(encoding="utf-8")) if keep else {}
    command = "python benchmarks/semiseg_convention.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result.update({"convention": dataclasses.asdict(cfg), "reference_hu": REFERENCE_HU,
                   "measure_window_hu": MEASURE_WINDOW_HU})
    stamps = result.setdefault("stamps", {})
    stamp = {**_stamp(), "command": command}  # taken before the run: the code that produced the numbers
    if "sources" in parts:
        result["sources"] = run_sources(args.data, args.pseudo_every, args.bootstrap, args.seed)
    if parts & {"real_ct", "model_check"}:
        real, prepared, cts = run_real(args.data, cfg)
        if "real_ct" in parts:
            result["real_ct"] = real
            files = source_files(args.data)
            examples = {src: [fs[len(fs) // 3], fs[2 * len(fs) // 3]] for src, fs in files.items()}
            make_figure(args.figure, examples, prepared, cfg.size)
        if "model_check" in parts:
            windows = {"medseg (default)": list(cfg.window_hu)}
            windows.update({src: result["sources"][src]["fit"]["window_hu"] for src in ("radiopaedia", "coronacases")})
            result["model_check"] = model_check(args.checkpoint, cts, windows)
    if "stride" in parts:
        result["stride"] = stride_study(args.stride_seeds)
        print(f"stride: {result['stride']['rows']}", flush=True)
    for part in parts:
        stamps[part] = stamp
    from _stamp import stamp as results_stamp  # the file's stamp: the code of its latest section

    result.update(results_stamp({"command": command, "parts": sorted(parts)}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(_rounded(result), indent=1) + "\n")
    print(f"wrote {args.out}" + (f" and {args.figure}" if "real_ct" in parts else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
