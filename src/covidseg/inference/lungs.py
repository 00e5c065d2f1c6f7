"""Stage 1 of ``segment``: the lungs, classically (no weights) or with a trained lung model.

The classical extraction (:func:`classical_lungs`) follows the usual threshold pipeline (e.g. Hu, Hoffman &
Reinhardt, IEEE TMI 2001; the "lungmask" pre-processing of Hofmanninger et al., Eur Radiol Exp 2020):

1. work on a grid of about ``cfg.work_spacing_mm`` (block means of the HU volume: 512x512 -> 256x256);
2. air below ``cfg.air_threshold_hu`` that is not connected, within its axial slice, to the slice's border (the
   air around the patient and under the table) -> the air inside the body;
3. the trachea and the main bronchi are removed: from the top slice down, small (< ``cfg.airway_max_area_mm2``)
   air regions near the body's midline are followed slice by slice until each branch merges into a lung;
4. 3D components larger than ``cfg.min_lung_volume_ml`` are the lungs (bowel gas and the oesophagus are
   smaller); when the two lungs touch (anterior junction) they are split by erosion and nearest-seed assignment;
   label 1 = patient's LEFT = higher column index of the canonical array, 2 = RIGHT (as the real dataset);
5. per axial slice and per lung: holes (vessels, nodules, enclosed lesions) filled, then a closing with a disk of
   radius ``cfg.closing_radius_mm``, then concavities of the convex hull filled except the one facing the heart.
   Step 5 is what keeps a dense consolidation that lies against the pleura inside the lung: it is neither air nor
   a hole, so a threshold alone cuts it (and the infection in it) out;
6. back to the full grid: nearest-neighbour upsampling, with the outer border refined by the full-resolution air
   threshold.

With ``--lungs CKPT`` a trained lung model (target ``lung``, 2 sigmoid channels left/right) runs through
:func:`~covidseg.inference.sliding_window.predict_volume` instead (:func:`model_lungs`).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from covidseg.config import InferenceConfig, LungConfig, RuntimeConfig

LEFT = 1
"""Label of the patient's left lung (higher column index in canonical arrays)."""
RIGHT = 2
"""Label of the patient's right lung."""

_SLICE_2D = np.zeros((3, 3, 3), dtype=bool)
_SLICE_2D[1] = ndimage.generate_binary_structure(2, 1)
"""Connectivity within an axial slice only (labels every slice of a stack at once)."""


# ------------------------------------------------------------------------------------------------ grids


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def work_factors(spacing: Sequence[float], work_spacing_mm: float) -> tuple[int, int, int]:
    """Integer block sizes ``(D, H, W)`` bringing ``spacing`` (mm) up to about ``work_spacing_mm``.

    In-plane the nearest integer factor (0.78 mm pixels, the most common, become 1.56 mm: a floor would keep them at
    full resolution, 4x the voxels and 3-4x the time); through-plane only a whole multiple that stays at most
    the work spacing (slices are merged only when at least two fit in it), so the per-slice steps see each slice of
    a thin-slice CT."""
    d = max(1, int(math.floor(work_spacing_mm / spacing[0] + 1e-6)))
    h, w = (max(1, int(round(work_spacing_mm / s))) for s in spacing[1:])
    return (d, h, w)


def block_mean(volume: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Mean over ``factors``-sized blocks (the volume is edge-padded to a multiple first); float32."""
    if all(f == 1 for f in factors):
        return np.asarray(volume, dtype=np.float32)
    pad = [(0, (-n) % f) for n, f in zip(volume.shape, factors, strict=True)]
    v = np.pad(volume, pad, mode="edge") if any(p[1] for p in pad) else volume
    # the sum of the blocks' strided sub-grids, then one division: the same values as a reshape-mean (exactly for
    # integer HU) in a third of its time
    fd, fh, fw = factors
    out: np.ndarray | None = None
    for od, oh, ow in itertools.product(range(fd), range(fh), range(fw)):
        part = v[od::fd, oh::fh, ow::fw]
        if out is None:
            out = part.astype(np.float32, copy=True)
        else:
            out += part
    assert out is not None
    out /= np.float32(fd * fh * fw)
    return out


def upsample_labels(labels: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour upsampling by integer ``factors``, cropped to ``shape``."""
    out = labels
    for axis, f in enumerate(factors):
        if f > 1:
            out = np.repeat(out, f, axis=axis)
    return np.ascontiguousarray(out[: shape[0], : shape[1], : shape[2]])


def binary_opening(mask: np.ndarray, iterations: int = 1, workers: int | None = None) -> np.ndarray:
    """``scipy.ndimage.binary_opening`` with the 6-connected structure, in slabs along axis 0 on several threads.

    Each slab is opened with a halo of ``2 * iterations`` slices (how far an erosion then a dilation can carry a
    change), so the result equals the whole-volume opening voxel for voxel; scipy releases the GIL, so the slabs run
    in parallel. ``workers`` defaults to the available cores.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    n = mask.shape[0]
    workers = max(1, min(workers or available_cores(), n // 16))  # slabs of at least 16 slices
    if workers == 1:
        return ndimage.binary_opening(mask, structure=structure, iterations=iterations)
    halo = 2 * iterations
    edges = np.linspace(0, n, workers + 1).astype(int)
    out = np.empty_like(mask, dtype=bool)

    def slab(k: int) -> None:
        lo, hi = int(edges[k]), int(edges[k + 1])
        a, b = max(lo - halo, 0), min(hi + halo, n)
        opened = ndimage.binary_opening(mask[a:b], structure=structure, iterations=iterations)
        out[lo:hi] = opened[lo - a : hi - a]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(slab, range(workers)))
    return out


# ------------------------------------------------------------------------------------------------ steps


def body_air(hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Air below ``threshold_hu`` that does not touch the border of its axial slice (air inside the body)."""
    air = hu < threshold_hu
    labels, n = ndimage.label(air, structure=_SLICE_2D)
    outside = np.zeros(n + 1, dtype=bool)  # a lookup table over the labels (np.isin is slower here)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[face] = True
    outside[0] = True
    return ~outside[labels]


def remove_airways(air: np.ndarray, spacing: Sequence[float], cfg: LungConfig) -> np.ndarray:
    """Voxels of the trachea and main bronchi in ``air`` (inside-body air, canonical ``(D, H, W)``).

    From the most superior slice down, small regions (< ``cfg.airway_max_area_mm2``) whose centre lies within
    ``cfg.airway_max_offset_mm`` of the midline of the air are the trachea; each following slice keeps the
    small regions that overlap the previous slice's airway. A branch stops where it merges into a large region
    (it has entered a lung); tracking ends when no branch is left.
    """
    pixel_mm2 = float(spacing[1] * spacing[2])
    max_area = cfg.airway_max_area_mm2 / pixel_mm2
    max_offset = cfg.airway_max_offset_mm / float(spacing[2])
    airway = np.zeros_like(air)
    cols = np.flatnonzero(air.any(axis=(0, 1)))
    if cols.size == 0:
        return airway
    midline = 0.5 * (cols[0] + cols[-1])
    previous: np.ndarray | None = None
    for z in range(air.shape[0] - 1, -1, -1):
        sl = air[z]
        if not sl.any():
            if previous is not None:
                break
            continue
        labels, n = ndimage.label(sl)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        if previous is None:
            _, cc = np.nonzero(labels)
            centres = ndimage.mean(np.broadcast_to(np.arange(sl.shape[1]), sl.shape), labels, range(1, n + 1))
            keep = [i + 1 for i, c in enumerate(np.atleast_1d(centres))
                    if areas[i + 1] < max_area and abs(c - midline) < max_offset]
            if not keep:
                continue
        else:
            grown = ndimage.binary_dilation(previous)
            touched = np.unique(labels[grown & sl])
            keep = [int(i) for i in touched if i > 0 and areas[i] < max_area]
            if not keep:
                break
        current = np.isin(labels, keep)
        airway[z] = current
        previous = current
    return airway


def basal_gas(hu: np.ndarray, air: np.ndarray, voxel_ml: float, cfg: LungConfig) -> np.ndarray:
    """Bowel and stomach gas pressed against a lung base: pure-air regions (below ``cfg.gas_hu``, which normal
    lung parenchyma at about -850 HU rarely reaches) of at least ``cfg.min_gas_ml`` whose centre lies in the
    lowest third of the slices holding air inside the body. Partial volume can join such gas to the lung through
    a thin diaphragm; removing it first keeps it out of the lung mask. (Large basal emphysematous bullae would
    be removed too: switch off with ``lungs.remove_basal_gas=false``.)"""
    dark = binary_opening(air & (hu < cfg.gas_hu))
    z = np.flatnonzero(air.any(axis=(1, 2)))
    if z.size == 0 or not dark.any():
        return np.zeros_like(air)
    low = z[0] + (z[-1] - z[0]) / 3.0
    out = np.zeros_like(air)
    min_voxels = max(int(cfg.min_gas_ml / voxel_ml), 1)
    for part in components(dark, min_voxels):
        zc = np.flatnonzero(part.any(axis=(1, 2))).mean()
        if zc < low:
            out |= part
    return out


def components(mask: np.ndarray, min_voxels: int) -> list[np.ndarray]:
    """3D components of ``mask`` with at least ``min_voxels`` voxels, largest first."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return [labels == int(i) for i in np.argsort(sizes)[::-1] if sizes[i] >= min_voxels]


def largest_components(mask: np.ndarray, min_voxels: int, count: int = 2) -> list[np.ndarray]:
    """Up to ``count`` largest 3D components of ``mask`` with at least ``min_voxels`` voxels, largest first."""
    return components(mask, min_voxels)[:count]


def _side_fraction(mask: np.ndarray, midline: float) -> float:
    """Share of the voxels of ``mask`` at column indices above ``midline`` (the patient's left)."""
    per_col = mask.sum(axis=(0, 1))
    total = per_col.sum()
    return float(per_col[int(np.ceil(midline)):].sum() / total) if total else 0.0


def _z_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the slice range of the smaller of ``a`` and ``b`` that the other one also covers."""
    za, zb = np.flatnonzero(a.any(axis=(1, 2))), np.flatnonzero(b.any(axis=(1, 2)))
    lo, hi = max(za[0], zb[0]), min(za[-1], zb[-1])
    return max(hi - lo + 1, 0) / min(za[-1] - za[0] + 1, zb[-1] - zb[0] + 1)


def pick_lungs(air: np.ndarray, min_voxels: int, midline: float, cfg: LungConfig) -> list[np.ndarray]:
    """The one or two lung components among the air inside the body.

    The largest component is a lung; when it reaches well into both halves of the body (shares between
    ``cfg.bilateral_share`` and ``1 - cfg.bilateral_share``) it holds both lungs and is split
    (:func:`split_two`); otherwise the other lung is the largest component on the other side of the midline that
    spans most of the same slices (bowel gas lies lower, below the diaphragm).
    """
    parts = components(air, min_voxels)
    if not parts:
        return []
    first = parts[0]
    share = _side_fraction(first, midline)
    if cfg.bilateral_share < share < 1.0 - cfg.bilateral_share:
        return split_two(first, min_voxels, cfg.max_split_erosions, midline)
    for other in parts[1:]:
        other_share = _side_fraction(other, midline)
        if (other_share > 0.5) != (share > 0.5) and _z_overlap(first, other) >= cfg.min_z_overlap:
            return [first, other]
    return [first]


def split_two(mask: np.ndarray, min_voxels: int, max_erosions: int, midline: float) -> list[np.ndarray]:
    """Split one component holding both lungs: erode (within axial slices) until a large part lies on each side
    of ``midline``, then give every voxel of ``mask`` to the nearer part. Returns ``[mask]`` when no split is
    found."""
    eroded = mask
    for _ in range(max_erosions):
        eroded = ndimage.binary_erosion(eroded, structure=_SLICE_2D)
        parts = components(eroded, max(min_voxels // 8, 1))
        if not parts:
            break
        left = next((p for p in parts if _side_fraction(p, midline) > 0.5), None)
        right = next((p for p in parts if _side_fraction(p, midline) <= 0.5), None)
        if left is not None and right is not None:
            seeds = np.zeros(mask.shape, dtype=np.uint8)
            seeds[left] = 1
            seeds[right] = 2
            idx = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
            nearest = seeds[tuple(idx)]
            return [mask & (nearest == 1), mask & (nearest == 2)]
    return [mask]


def _regrow(parts: list[np.ndarray], air: np.ndarray, steps: int) -> list[np.ndarray]:
    """Give back to each part the ``air`` voxels within ``steps`` dilations of it: one 6-connected dilation step
    at a time, so each voxel goes to the part that reaches it first (the nearer one; ties to the larger part)."""
    grown = [p.copy() for p in parts]
    taken = np.zeros(air.shape, dtype=bool)
    for g in grown:
        taken |= g
    for _ in range(steps):
        for g in grown:
            box = _bbox(g, margin=(1, 1, 1))
            if box is None:
                continue
            ring = ndimage.binary_dilation(g[box]) & air[box] & ~taken[box]
            g[box] |= ring
            taken[box] |= ring
    return grown


def _disk(radius_px: tuple[float, float]) -> np.ndarray:
    ry, rx = (max(r, 0.5) for r in radius_px)
    y, x = np.ogrid[-int(ry) : int(ry) + 1, -int(rx) : int(rx) + 1]
    return (y / ry) ** 2 + (x / rx) ** 2 <= 1.0


def fill_lung_slices(lung: np.ndarray, spacing: Sequence[float], cfg: LungConfig, medial_side: int) -> np.ndarray:
    """Per axial slice: fill holes, close with a disk, and fill the convex-hull concavities that face the chest wall.

    A 2D hole is filled when it is small (at most ``cfg.max_hole_fraction`` of the lung slice: vessels, nodules,
    enclosed lesions) or when it is also enclosed in 3D; a large 2D hole open in 3D is the diaphragm's dome seen
    through the basal crescent of the lung (the liver or spleen), not lung.

    Args:
        lung: ``(D, H, W)`` mask of one lung.
        spacing: mm.
        cfg: closing radius (mm), hole and concavity limits.
        medial_side: +1 when the mediastinum lies at higher column indices than this lung (the right lung),
            -1 otherwise.
    """
    from skimage.morphology import convex_hull_image

    box = _bbox(lung, margin=(0, 2, 2))
    if box is None:
        return lung
    sub = lung[box]
    holes_3d = ndimage.binary_fill_holes(sub) & ~sub
    radius = (cfg.closing_radius_mm / spacing[1], cfg.closing_radius_mm / spacing[2])
    disk = _disk(radius)[None]  # (1, h, w): every slice at once, within its own plane
    pad = int(math.ceil(max(radius))) + 1
    # holes and the closing on the whole stack at once (in-plane structures: the same as slice by slice)
    filled = sub | _fillable_stack(sub, holes_3d, cfg.max_hole_fraction)
    padded = np.pad(filled, ((0, 0), (pad, pad), (pad, pad)))
    closed = ndimage.binary_closing(padded, structure=disk)[:, pad:-pad, pad:-pad]
    closed = filled | (closed & ~_large_stack(filled, cfg.max_hole_fraction))
    closed |= _fillable_stack(closed, holes_3d, cfg.max_hole_fraction)
    if cfg.fill_concavities:
        for z in np.flatnonzero(closed.sum(axis=(1, 2)) > 3):
            closed[z] |= _lateral_concavities(closed[z], convex_hull_image(closed[z]), medial_side,
                                              cfg.max_concavity_fraction, cfg.max_medial_cosine)
    result = np.zeros_like(lung)
    result[box] = closed
    return result


def _stack_holes(m: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """2D holes of every slice of ``m``: labels, count, areas and the lung area of each hole's slice."""
    labels, n = ndimage.label(ndimage.binary_fill_holes(m, structure=_SLICE_2D) & ~m, structure=_SLICE_2D)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    slice_area = m.sum(axis=(1, 2))
    z_of = np.zeros(n + 1, dtype=np.int64)
    if n:
        objects = ndimage.find_objects(labels)
        z_of[1:] = [o[0].start if o is not None else 0 for o in objects]
    return labels, n, areas, slice_area[z_of]


def _fillable_stack(m: np.ndarray, holes_3d: np.ndarray, max_fraction: float) -> np.ndarray:
    """Per slice, the 2D holes of ``m`` that are small (<= ``max_fraction`` of the slice's area) or mostly enclosed
    in 3D too (:func:`_fillable_holes` on every slice at once)."""
    labels, n, areas, slice_area = _stack_holes(m)
    if n == 0:
        return np.zeros_like(m)
    in_3d = np.bincount(labels[holes_3d], minlength=n + 1)
    keep = (areas <= max_fraction * slice_area) | (2 * in_3d >= areas)
    keep[0] = False
    return keep[labels]


def _large_stack(m: np.ndarray, max_fraction: float) -> np.ndarray:
    """Per slice, the 2D holes of ``m`` larger than ``max_fraction`` of the slice's area."""
    labels, n, areas, slice_area = _stack_holes(m)
    if n == 0:
        return np.zeros_like(m)
    big = areas > max_fraction * slice_area
    big[0] = False
    return big[labels]


def _holes(sl: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    labels, n = ndimage.label(ndimage.binary_fill_holes(sl) & ~sl)
    return labels, n, np.bincount(labels.ravel(), minlength=n + 1)


def _fillable_holes(sl: np.ndarray, holes_3d: np.ndarray, max_fraction: float) -> np.ndarray:
    """2D holes of ``sl`` that are small (<= ``max_fraction`` of its area) or mostly enclosed in 3D too: one slice,
    the reference that the vectorised :func:`_fillable_stack` is tested against."""
    labels, n, areas = _holes(sl)
    if n == 0:
        return np.zeros_like(sl)
    in_3d = np.bincount(labels[holes_3d], minlength=n + 1)
    limit = max_fraction * sl.sum()
    keep = np.flatnonzero((areas <= limit) | (2 * in_3d >= areas))
    return np.isin(labels, keep[keep > 0])


def _lateral_concavities(lung: np.ndarray, hull: np.ndarray, medial_side: int, max_fraction: float,
                         max_medial_cosine: float) -> np.ndarray:
    """Concavities (hull minus lung, 2D) that open towards the chest wall: sub-pleural consolidation against the
    lateral, anterior or posterior wall, paravertebral.

    A concavity is left out when it is larger than ``max_fraction`` of the lung slice, when its centre is in the
    anterior-medial quadrant of the lung (the heart's notch), or when it opens towards the mediastinum: its
    opening (the concavity's pixels on the hull's border) lies medially of its floor (its pixels touching the
    lung), the cosine between that direction and the medial direction above ``max_medial_cosine`` (the
    descending aorta, the hilum, the oesophagus, which the lung wraps around medially).
    """
    defects = hull & ~lung
    labels, n = ndimage.label(defects)
    if n == 0:
        return defects
    rows, cols = np.nonzero(lung)
    cy, cx = rows.mean(), cols.mean()
    index = np.arange(1, n + 1)
    centres = ndimage.center_of_mass(defects, labels, index)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    opening = (labels * (hull & ~ndimage.binary_erosion(hull, border_value=0))).ravel()
    floor = (labels * ndimage.binary_dilation(lung)).ravel()
    grid = np.indices(lung.shape)
    yy, xx = grid[0].ravel(), grid[1].ravel()

    def centre(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = np.bincount(lab, minlength=n + 1)[1:]
        safe = np.maximum(count, 1)
        return (count, np.bincount(lab, weights=yy, minlength=n + 1)[1:] / safe,
                np.bincount(lab, weights=xx, minlength=n + 1)[1:] / safe)

    n_open, oy, ox = centre(opening)
    n_floor, fy, fx = centre(floor)
    dy, dx = oy - fy, ox - fx
    norm = np.hypot(dy, dx)
    medial = np.where((n_open > 0) & (n_floor > 0) & (norm > 0), dx * medial_side / np.maximum(norm, 1e-9), -1.0)
    cy_d, cx_d = np.array(centres, dtype=float).reshape(n, 2).T
    heart = ((cx_d - cx) * medial_side > 0) & (cy_d < cy)
    ok = (areas <= max_fraction * lung.sum()) & ~heart & (medial <= max_medial_cosine)
    keep = index[ok]
    return np.isin(labels, keep)


def _bbox(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, slice, slice] | None:
    from covidseg.inference.sliding_window import mask_box

    return mask_box(mask, margin)


# ------------------------------------------------------------------------------------------------ main


def classical_lungs(hu: np.ndarray, spacing: Sequence[float], cfg: LungConfig | None = None) -> np.ndarray:
    """Weight-free lung mask of a CT in HU.

    Args:
        hu: canonical ``(D, H, W)`` CT in Hounsfield units.
        spacing: ``(D, H, W)`` voxel size in mm.
        cfg: thresholds and sizes.

    Returns:
        ``(D, H, W)`` uint8: 0 background, 1 left lung (higher column index), 2 right lung. All zeros when no
        air region of a lung's size is found.
    """
    cfg = cfg or LungConfig()
    factors = work_factors(spacing, cfg.work_spacing_mm)
    small = block_mean(hu, factors)
    work_spacing = tuple(float(s) * f for s, f in zip(spacing, factors, strict=True))
    voxel_ml = float(np.prod(work_spacing)) / 1000.0

    air = body_air(small, cfg.air_threshold_hu)
    air &= ~remove_airways(air, work_spacing, cfg)
    if cfg.remove_basal_gas:
        air &= ~basal_gas(small, air, voxel_ml, cfg)
    min_voxels = max(int(cfg.min_lung_volume_ml / voxel_ml), 1)
    body_cols = np.flatnonzero((small > cfg.air_threshold_hu).any(axis=(0, 1)))
    midline = 0.5 * (body_cols[0] + body_cols[-1]) if body_cols.size else 0.5 * small.shape[2]
    # an opening breaks the thin bridges partial volume makes through the diaphragm (stomach gas) and the
    # bronchial walls; the bridges' voxels go back to the lung they touch afterwards
    opened = binary_opening(air, iterations=cfg.opening_voxels) if cfg.opening_voxels > 0 else air
    parts = pick_lungs(opened, min_voxels, midline, cfg)
    if cfg.opening_voxels > 0 and parts:
        parts = _regrow(parts, air, cfg.opening_voxels)
    labels = np.zeros(small.shape, dtype=np.uint8)
    if not parts:
        return np.zeros(hu.shape, dtype=np.uint8)
    centre_cols = [float(np.nonzero(p.any(axis=(0, 1)))[0].mean()) for p in parts]
    if len(parts) == 2:
        left_first = centre_cols[0] > centre_cols[1]
        named = [(parts[0], LEFT), (parts[1], RIGHT)] if left_first else [(parts[0], RIGHT), (parts[1], LEFT)]
    else:  # a single lung found: name it by the side of the body it lies on
        named = [(parts[0], LEFT if centre_cols[0] > midline else RIGHT)]
    # the two lungs are filled side by side: scipy.ndimage releases the GIL, so two cores do it in about half the
    # time; the labels are then set in the same order as before
    def fill(item: tuple[np.ndarray, int]) -> np.ndarray:
        part, label = item
        return fill_lung_slices(part, work_spacing, cfg, -1 if label == LEFT else 1)

    with ThreadPoolExecutor(max_workers=min(len(named), available_cores())) as pool:
        filled_parts = list(pool.map(fill, named))
    for filled, (_, label) in zip(filled_parts, named, strict=True):
        labels[filled & (labels == 0)] = label

    if all(f == 1 for f in factors):
        return labels
    return _refine_border(labels, air, hu, factors, cfg)


def _refine_border(small_labels: np.ndarray, small_air: np.ndarray, hu: np.ndarray, factors: Sequence[int],
                   cfg: LungConfig) -> np.ndarray:
    """Full-resolution labels: each lung's coarse interior as it is; within one work voxel of its border, the
    full-resolution air voxels plus the coarse voxels that were filled (dense lesions or vessels, not air).
    Works inside the lungs' box only."""
    out = np.zeros(hu.shape, dtype=np.uint8)
    box = _bbox(small_labels > 0, margin=(1, 1, 1))
    if box is None:
        return out
    labels, air = small_labels[box], small_air[box]
    keep = np.zeros_like(labels)
    ring_labels = np.zeros_like(labels)
    for label in (LEFT, RIGHT):
        m = labels == label
        if not m.any():
            continue
        inner = ndimage.binary_erosion(m, structure=_SLICE_2D)
        ring = ndimage.binary_dilation(m, structure=_SLICE_2D) & ~inner
        dense = m & ~air & ring  # filled on the coarse grid: keep whole
        keep[(inner | dense) & (keep == 0)] = label
        ring_labels[ring & ~dense & (ring_labels == 0)] = label
    fine_box = tuple(slice(b.start * f, min(b.stop * f, n)) for b, f, n in zip(box, factors, hu.shape, strict=True))
    fine_shape = tuple(s.stop - s.start for s in fine_box)
    fine = upsample_labels(keep, factors, fine_shape)
    border = upsample_labels(ring_labels, factors, fine_shape)
    border[hu[fine_box] >= cfg.air_threshold_hu] = 0
    out[fine_box] = np.where(fine > 0, fine, border)
    return out


def model_lungs(model: object, normalized: np.ndarray, cfg: InferenceConfig, device: str | None = None,
                runtime: RuntimeConfig | None = None) -> np.ndarray:
    """Lung labels from a trained lung model (target ``lung``: sigmoid channels left, right).

    Args:
        model: a covidseg model with 2 output channels.
        normalized: ``(D, H, W)`` CT normalised to [0, 1] (the model's training input, not "lung only").
        cfg: sliding-window settings; ``cfg.threshold`` decides each channel.
        device: overrides ``runtime.device``.
        runtime: device, bfloat16, threads (default :class:`~covidseg.config.RuntimeConfig`).

    Returns:
        ``(D, H, W)`` uint8: 1 left, 2 right; a voxel above threshold in both gets the more probable side.
    """
    from covidseg.errors import InputError
    from covidseg.inference.sliding_window import predict_volume

    k = int(getattr(getattr(model, "config", None), "out_channels", 0))
    if k != 2:
        raise InputError(
            f"--lungs: the checkpoint's model has {k} output channel(s); a lung model (trained with "
            "--set train.target=lung) has 2 (left, right); give such a checkpoint or use --lungs classic"
        )
    prob = predict_volume(model, normalized, cfg, device=device, runtime=runtime)  # type: ignore[arg-type]
    out = np.zeros(normalized.shape, dtype=np.uint8)
    above = prob >= cfg.threshold
    out[above[0] & (~above[1] | (prob[0] >= prob[1]))] = LEFT
    out[above[1] & (~above[0] | (prob[1] > prob[0]))] = RIGHT
    return out
