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

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from covidseg.config import InferenceConfig, LungConfig

LEFT = 1
"""Label of the patient's left lung (higher column index in canonical arrays)."""
RIGHT = 2
"""Label of the patient's right lung."""

_SLICE_2D = np.zeros((3, 3, 3), dtype=bool)
_SLICE_2D[1] = ndimage.generate_binary_structure(2, 1)
"""Connectivity within an axial slice only (labels every slice of a stack at once)."""


# ------------------------------------------------------------------------------------------------ grids


def work_factors(spacing: Sequence[float], work_spacing_mm: float) -> tuple[int, int, int]:
    """Integer block sizes ``(D, H, W)`` bringing ``spacing`` (mm) up to about ``work_spacing_mm``."""
    return tuple(max(1, int(math.floor(work_spacing_mm / s + 1e-6))) for s in spacing)  # type: ignore[return-value]


def block_mean(volume: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Mean over ``factors``-sized blocks (the volume is edge-padded to a multiple first); float32."""
    if all(f == 1 for f in factors):
        return np.asarray(volume, dtype=np.float32)
    pad = [(0, (-n) % f) for n, f in zip(volume.shape, factors, strict=True)]
    v = np.pad(volume, pad, mode="edge") if any(p[1] for p in pad) else volume
    d, h, w = (n // f for n, f in zip(v.shape, factors, strict=True))
    fd, fh, fw = factors
    out = v.reshape(d, fd, h, fh, w, fw).mean(axis=(1, 3, 5), dtype=np.float32)
    return out.astype(np.float32, copy=False)


def upsample_labels(labels: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour upsampling by integer ``factors``, cropped to ``shape``."""
    out = labels
    for axis, f in enumerate(factors):
        if f > 1:
            out = np.repeat(out, f, axis=axis)
    return np.ascontiguousarray(out[: shape[0], : shape[1], : shape[2]])


# ------------------------------------------------------------------------------------------------ steps


def body_air(hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Air below ``threshold_hu`` that does not touch the border of its axial slice (air inside the body)."""
    air = hu < threshold_hu
    labels, _ = ndimage.label(air, structure=_SLICE_2D)
    border = np.zeros_like(air)
    border[:, 0, :] = border[:, -1, :] = True
    border[:, :, 0] = border[:, :, -1] = True
    outside = np.unique(labels[border & air])
    inside = air & ~np.isin(labels, outside[outside > 0])
    return inside


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
    dark = ndimage.binary_opening(air & (hu < cfg.gas_hu))
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
    """Give back to each part the ``air`` voxels within ``steps`` dilations of it (nearest part wins)."""
    seeds = np.zeros(air.shape, dtype=np.uint8)
    for i, part in enumerate(parts, start=1):
        seeds[part] = i
    grown = ndimage.binary_dilation(seeds > 0, iterations=steps) & air
    idx = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
    nearest = seeds[tuple(idx)]
    return [(seeds == i) | (grown & (nearest == i)) for i in range(1, len(parts) + 1)]


def _disk(radius_px: tuple[float, float]) -> np.ndarray:
    ry, rx = (max(r, 0.5) for r in radius_px)
    y, x = np.ogrid[-int(ry) : int(ry) + 1, -int(rx) : int(rx) + 1]
    return (y / ry) ** 2 + (x / rx) ** 2 <= 1.0


def fill_lung_slices(lung: np.ndarray, spacing: Sequence[float], cfg: LungConfig, medial_side: int) -> np.ndarray:
    """Per axial slice: fill holes, close with a disk, and fill the convex-hull concavities not facing the heart.

    Args:
        lung: ``(D, H, W)`` mask of one lung.
        spacing: mm.
        cfg: closing radius (mm).
        medial_side: +1 when the mediastinum lies at higher column indices than this lung (the right lung),
            -1 otherwise.
    """
    from skimage.morphology import convex_hull_image

    box = _bbox(lung, margin=(0, 2, 2))
    if box is None:
        return lung
    sub = lung[box]
    radius = (cfg.closing_radius_mm / spacing[1], cfg.closing_radius_mm / spacing[2])
    disk = _disk(radius)
    pad = int(math.ceil(max(radius))) + 1
    out = np.zeros_like(sub)
    for z in range(sub.shape[0]):
        sl = sub[z]
        if not sl.any():
            continue
        filled = ndimage.binary_fill_holes(sl)
        padded = np.pad(filled, pad)
        closed = ndimage.binary_closing(padded, structure=disk)[pad:-pad, pad:-pad]
        closed = ndimage.binary_fill_holes(closed | filled)
        if cfg.fill_concavities and closed.sum() > 3:
            closed = closed | _lateral_concavities(closed, convex_hull_image(closed), medial_side,
                                                   cfg.max_concavity_fraction)
        out[z] = closed
    result = np.zeros_like(lung)
    result[box] = out
    return result


def _lateral_concavities(lung: np.ndarray, hull: np.ndarray, medial_side: int, max_fraction: float) -> np.ndarray:
    """Concavities (hull minus lung, 2D) smaller than ``max_fraction`` of the lung slice whose centre is not in
    the anterior-medial quadrant of the lung (where the heart lies): sub-pleural consolidation against the chest
    wall, posterior and paravertebral."""
    defects = hull & ~lung
    labels, n = ndimage.label(defects)
    if n == 0:
        return defects
    rows, cols = np.nonzero(lung)
    cy, cx = rows.mean(), cols.mean()
    centres = ndimage.center_of_mass(defects, labels, range(1, n + 1))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    limit = max_fraction * lung.sum()
    keep = [i + 1 for i, (y, x) in enumerate(centres)
            if areas[i] <= limit  # the diaphragm's dome (abdomen inside the basal crescent) is large
            and not ((x - cx) * medial_side > 0 and y < cy)]  # medial and anterior: the heart's notch
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
    opened = ndimage.binary_opening(air, structure=ndimage.generate_binary_structure(3, 1),
                                    iterations=cfg.opening_voxels) if cfg.opening_voxels > 0 else air
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
    for part, label in named:
        medial = -1 if label == LEFT else 1
        filled = fill_lung_slices(part, work_spacing, cfg, medial)
        labels[filled & (labels == 0)] = label

    if all(f == 1 for f in factors):
        return labels
    return _refine_border(labels, air, hu, factors, cfg)


def _refine_border(small_labels: np.ndarray, small_air: np.ndarray, hu: np.ndarray, factors: Sequence[int],
                   cfg: LungConfig) -> np.ndarray:
    """Full-resolution labels: each lung's coarse interior as it is; within one work voxel of its border, the
    full-resolution air voxels plus the coarse voxels that were filled (dense lesions or vessels, not air)."""
    out = np.zeros(hu.shape, dtype=np.uint8)
    fine_air: np.ndarray | None = None
    for label in (LEFT, RIGHT):
        m = small_labels == label
        if not m.any():
            continue
        inner = ndimage.binary_erosion(m, structure=_SLICE_2D)
        ring = ndimage.binary_dilation(m, structure=_SLICE_2D) & ~inner
        dense = m & ~small_air & ring  # filled on the coarse grid: keep whole
        box = _bbox(ring, margin=(0, 0, 0))
        assert box is not None
        fine_box = tuple(slice(b.start * f, min(b.stop * f, n)) for b, f, n in zip(box, factors, hu.shape, strict=True))
        if fine_air is None:
            fine_air = np.zeros(hu.shape, dtype=bool)
        fine_air[fine_box] = hu[fine_box] < cfg.air_threshold_hu
        keep = upsample_labels(inner | dense, factors, hu.shape)
        keep |= upsample_labels(ring & ~dense, factors, hu.shape) & fine_air
        out[keep & (out == 0)] = label
    return out


def model_lungs(model: object, normalized: np.ndarray, cfg: InferenceConfig, device: str | None = None) -> np.ndarray:
    """Lung labels from a trained lung model (target ``lung``: sigmoid channels left, right).

    Args:
        model: a covidseg model with 2 output channels.
        normalized: ``(D, H, W)`` CT normalised to [0, 1] (the model's training input, not "lung only").
        cfg: sliding-window settings; ``cfg.threshold`` decides each channel.
        device: overrides ``cfg.device``.

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
    prob = predict_volume(model, normalized, cfg, device=device)  # type: ignore[arg-type]
    out = np.zeros(normalized.shape, dtype=np.uint8)
    above = prob >= cfg.threshold
    out[above[0] & (~above[1] | (prob[0] >= prob[1]))] = LEFT
    out[above[1] & (~above[0] | (prob[1] > prob[0]))] = RIGHT
    return out
