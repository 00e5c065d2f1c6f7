"""The air inside the body, for the lung stage: the body without the couch, the trachea, bowel gas.

Real scans put air in many places that are not lung: around the patient, under and inside the couch (a curved
couch encloses air within every axial slice), outside the scanner's field of view (padding at -1024, -2048 or
-3024 HU), in the trachea and main bronchi, in the stomach and the bowel. These steps keep the air that lies
inside the patient's body and take out the airways and the gas pressed against the lung bases; which of the
remaining air regions are lungs is decided in :mod:`covidseg.inference.lung_parts`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from covidseg.config import LungConfig
from covidseg.inference.lung_grid import (
    SLICE_2D,
    binary_opening,
    fill_holes_2d,
)


def _outside_labels(labels: np.ndarray, n: int) -> np.ndarray:
    """Lookup table over the 2D labels of a stack: ``True`` for labels touching the border of their slice."""
    outside = np.zeros(n + 1, dtype=bool)  # a lookup table over the labels (np.isin is slower here)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[face] = True
    return outside


def body_mask(hu: np.ndarray, spacing: Sequence[float], cfg: LungConfig) -> tuple[np.ndarray, int]:
    """The patient's body, its axial slices filled (lungs, bowel and airways inside), on a coarse in-plane grid.

    Tissue denser than ``cfg.body_threshold_hu`` on every ``step``-th row and column (``step`` brings the pixel to
    about ``cfg.body_spacing_mm``), opened within each axial slice by ``cfg.body_opening_mm`` (the couch's shells,
    the mattress's cover, blankets and cables are thinner and come off; where the patient lies on the couch the
    contact is cut), then the largest 3D component: the body. The couch, and the air it encloses, is not part of
    it. The opening also erases a chest wall thinner than its element (a slim patient's lateral wall at the bases,
    between the ribs), which would open the slice's ring and leave the lung outside the filled body: the tissue
    within twice the opening's radius of the body is put back before the slices are filled (too little to close
    ring of a couch around the air it encloses).

    Args:
        hu: ``(D, H, W)`` CT (HU), full resolution.
        spacing: its voxel size (mm).
        cfg: thresholds and sizes.

    Returns:
        ``(body, step)``: ``(D, ceil(H / step), ceil(W / step))`` bool (all ``False`` when no tissue is found) and
        the in-plane step.
    """
    step = max(1, int(round(cfg.body_spacing_mm / float(spacing[1]))))
    tissue = hu[:, ::step, ::step] > cfg.body_threshold_hu
    steps = max(1, int(round(cfg.body_opening_mm / (float(spacing[1]) * step))))
    opened = ndimage.binary_opening(tissue, structure=SLICE_2D, iterations=steps)
    labels, n = ndimage.label(opened)
    if n == 0:
        return np.zeros(tissue.shape, dtype=bool), step
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    body |= tissue & ndimage.binary_dilation(body, structure=SLICE_2D, iterations=2 * steps)
    return fill_holes_2d(body), step


def inside_air(small: np.ndarray, body: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Air below ``threshold_hu`` inside the body: within each axial slice, air regions that neither touch the
    slice's border nor reach outside ``body`` (the air around the patient, under and inside the couch, and the
    padding outside the field of view are out)."""
    air = small < threshold_hu
    labels, n = ndimage.label(air, structure=SLICE_2D)
    outside = _outside_labels(labels, n)
    outside[labels[~body]] = True
    outside[0] = True
    return ~outside[labels]


def remove_airways(air: np.ndarray, small: np.ndarray, spacing: Sequence[float], cfg: LungConfig) -> np.ndarray:
    """Voxels of the trachea and the main and lobar bronchi in ``air`` (inside-body air, canonical ``(D, H, W)``).

    The trachea is found from the top (:func:`track_trachea`), then the airway tree is grown from it in 3D through
    the air darker than ``cfg.airway_hu`` (the lumen of the large airways is pure air, the lung around them about
    -850 HU), with its one-voxel rim of partial-volume air. A tree larger than ``cfg.airway_max_ml`` has leaked into
    the lung (emphysema, noise): it is grown again 50 HU darker, down to -1000 HU; when none fits, the tracked
    trachea alone is removed.

    Args:
        air: ``(D, H, W)`` bool, air inside the body (work grid).
        small: ``(D, H, W)`` work-grid CT (HU).
        spacing: work-grid voxel size (mm).
        cfg: airway settings.
    """
    seeds = track_trachea(air, spacing, cfg)
    if not seeds.any():
        return seeds
    voxel_ml = float(np.prod(spacing)) / 1000.0
    structure = ndimage.generate_binary_structure(3, 1)
    # the large airways lie within cfg.airway_depth_mm below the trachea's lowest tracked slice
    lo = max(int(np.flatnonzero(seeds.any(axis=(1, 2)))[0] - cfg.airway_depth_mm / float(spacing[0])), 0)
    threshold = cfg.airway_hu
    while threshold >= -1000.0:
        lumen = air[lo:] & (small[lo:] < threshold)
        labels, _ = ndimage.label(lumen, structure=structure)
        ids = np.unique(labels[seeds[lo:] & lumen])
        tree = np.isin(labels, ids[ids > 0])
        if tree.sum() * voxel_ml <= cfg.airway_max_ml:
            out = seeds.copy()
            out[lo:] |= tree | (ndimage.binary_dilation(tree, structure=structure) & air[lo:])
            return out
        threshold -= 50.0
    return seeds


def track_trachea(air: np.ndarray, spacing: Sequence[float], cfg: LungConfig) -> np.ndarray:
    """The trachea (and the main bronchi while they are apart from the lungs), followed from the top slice down.

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


GAS_SHELL_VOXELS = (2, 4)
"""The shell :func:`basal_gas` looks at, in each axial slice: from 2 to 4 work voxels (about 3-6 mm) out from a
pure-air region, past the partial-volume rim that air next to bowel wall or lung shares."""


def basal_gas(small: np.ndarray, air: np.ndarray, voxel_ml: float, cfg: LungConfig) -> np.ndarray:
    """Bowel and stomach gas pressed against a lung base: pure-air regions (below ``cfg.gas_hu``, which normal
    lung parenchyma at about -850 HU rarely reaches) of at least ``cfg.min_gas_ml`` whose centre lies in the
    lowest third of the slices holding air inside the body, and which lie in tissue: at most
    ``cfg.gas_max_air_around`` of a shell a few millimetres out from the region (past the partial-volume rim) is
    air (lung, or emphysema around a bulla). Partial volume can join such gas to the lung through a thin
    diaphragm; removing it first keeps it out of the lung mask. An emphysematous bulla or a basal region of
    emphysema is pure air too, but lies in the lung: the air around it is lung, and it stays (a bulla in the
    costophrenic recess, with little lung beside it, is still taken for gas)."""
    out = np.zeros_like(air)
    z = np.flatnonzero(air.any(axis=(1, 2)))
    if z.size == 0:
        return out
    low = z[0] + (z[-1] - z[0]) / 3.0
    # only the lower two thirds are looked at (a region centred in the lowest third and reaching above them spans a
    # third of the chest: a lung's size, not bowel gas)
    top = min(air.shape[0], int(z[0] + 2.0 * (z[-1] - z[0]) / 3.0) + 3)
    dark = binary_opening(air[:top] & (small[:top] < cfg.gas_hu))
    labels, n = ndimage.label(dark)
    if n == 0:
        return out
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    min_voxels = max(int(cfg.min_gas_ml / voxel_ml), 1)
    keep = np.zeros(n + 1, dtype=bool)
    inner, outer = GAS_SHELL_VOXELS
    for i, obj in enumerate(ndimage.find_objects(labels), start=1):
        if obj is None or sizes[i] < min_voxels:
            continue
        slices = np.flatnonzero((labels[obj] == i).any(axis=(1, 2))) + obj[0].start
        if slices.mean() >= low:
            continue
        box = (obj[0], *(slice(max(o.start - outer, 0), min(o.stop + outer, size))
                         for o, size in zip(obj[1:], dark.shape[1:], strict=True)))
        region = labels[box] == i
        shell = (ndimage.binary_dilation(region, structure=SLICE_2D, iterations=outer)
                 & ~ndimage.binary_dilation(region, structure=SLICE_2D, iterations=inner))
        keep[i] = float(air[:top][box][shell].mean()) <= cfg.gas_max_air_around if shell.any() else True
    out[:top] = keep[labels]
    return out
