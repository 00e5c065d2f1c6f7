"""Which air regions inside the body are lungs, and which lung is which.

An air region of a lung's size (``LungConfig.min_lung_volume_ml``) is lung when it holds lung parenchyma: its
median on the work grid is above ``LungConfig.gas_median_hu``. Aerated lung is about -850 HU (-700 HU in the
dependent bases, -900 to -930 HU in severe emphysema): air mixed with vessels, interstitium and blood at the
scale of a voxel. Bowel and stomach gas, the air in and under a couch and the air around the patient are pure
air, -1000 HU plus noise. The one or two lungs are then picked among the regions that pass, and named by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from covidseg.config import LungConfig
from covidseg.inference.lung_grid import SLICE_2D, Box, bbox, components

LEFT = 1
"""Label of the patient's left lung (higher column index in canonical arrays)."""
RIGHT = 2
"""Label of the patient's right lung."""


@dataclass(frozen=True)
class AirRegion:
    """An air region inside the body (a 3D component of the opened air).

    Attributes:
        labels: ``(D, H, W)`` label image of all regions (shared).
        index: this region's label in it.
        box: its bounding box.
        volume_ml: its volume (mL).
        median_hu: median of the work-grid CT over it (HU).
        lung_like: whether it holds lung parenchyma (``median_hu`` above ``LungConfig.gas_median_hu``).
    """

    labels: np.ndarray
    index: int
    box: Box
    volume_ml: float
    median_hu: float
    lung_like: bool

    @property
    def mask(self) -> np.ndarray:
        """``(D, H, W)`` bool, the region."""
        out = np.zeros(self.labels.shape, dtype=bool)
        out[self.box] = self.labels[self.box] == self.index
        return out

    def touches(self, z: int) -> bool:
        """Whether the region has voxels in slice ``z``."""
        return bool(self.box[0].start <= z < self.box[0].stop and (self.labels[z][self.box[1:]] == self.index).any())


def air_regions(air: np.ndarray, small: np.ndarray, voxel_ml: float, cfg: LungConfig) -> list[AirRegion]:
    """The 3D components of ``air`` of at least ``cfg.min_lung_part_ml``, largest first, each classified as
    lung parenchyma or gas by its median HU (on ``small``, the work-grid CT)."""
    labels, n = ndimage.label(air)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    min_voxels = max(int(cfg.min_lung_part_ml / voxel_ml), 1)
    objects = ndimage.find_objects(labels)
    out = []
    for i in np.argsort(sizes[1:])[::-1] + 1:
        if sizes[i] < min_voxels:
            break
        box = objects[i - 1]
        assert box is not None
        median = float(np.median(small[box][labels[box] == i]))
        out.append(AirRegion(labels, int(i), (box[0], box[1], box[2]), float(sizes[i]) * voxel_ml, median,
                             median > cfg.gas_median_hu))
    return out


def extra_parts(regions: list[AirRegion], lungs: list[np.ndarray], spacing: Sequence[float], cfg: LungConfig
                ) -> list[AirRegion]:
    """Lung-like regions, other than the lungs, that are pieces of them.

    Two kinds: a region that the scan's first or last slice cuts where it cuts a lung too (a piece that joins the
    lung only beyond the field of view: an anterior segment, a lingula; at least ``cfg.min_lung_part_ml``), and a
    region of a lung's size (``cfg.min_lung_volume_ml``) within ``cfg.lung_gap_mm`` of a lung (a base or a lobe
    cut off by a band of consolidation or by partial volume in thick slices). Gas fails the median test.
    """
    depth = lungs[0].shape[0]
    ends = [z for z in (0, depth - 1) if any(lung[z].any() for lung in lungs)]
    out = []
    for r in regions:
        own = r.labels[r.box] == r.index
        if not r.lung_like or any((lung[r.box] & own).any() for lung in lungs):
            continue
        if any(r.touches(z) for z in ends) or (r.volume_ml >= cfg.min_lung_volume_ml
                                                and any(_near(lung, r, spacing, cfg.lung_gap_mm) for lung in lungs)):
            out.append(r)
    return out


def _near(lung: np.ndarray, region: AirRegion, spacing: Sequence[float], mm: float) -> bool:
    """Whether ``region`` comes within ``mm`` of ``lung`` (Euclidean, in mm)."""
    margin = [int(np.ceil(mm / float(s))) + 1 for s in spacing]
    box = tuple(slice(max(b.start - m, 0), min(b.stop + m, n))
                for b, m, n in zip(region.box, margin, lung.shape, strict=True))
    sub = lung[box]
    if not sub.any():
        return False
    dist = ndimage.distance_transform_edt(~sub, sampling=[float(s) for s in spacing])
    return bool(dist[region.labels[box] == region.index].min() <= mm)


def side_fraction(mask: np.ndarray, midline: float) -> float:
    """Share of the voxels of ``mask`` at column indices above ``midline`` (the patient's left)."""
    per_col = mask.sum(axis=(0, 1))
    total = per_col.sum()
    return float(per_col[max(int(np.ceil(midline)), 0):].sum() / total) if total else 0.0


def _z_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the slice range of the smaller of ``a`` and ``b`` that the other one also covers."""
    za, zb = np.flatnonzero(a.any(axis=(1, 2))), np.flatnonzero(b.any(axis=(1, 2)))
    lo, hi = max(za[0], zb[0]), min(za[-1], zb[-1])
    return max(hi - lo + 1, 0) / min(za[-1] - za[0] + 1, zb[-1] - zb[0] + 1)


def pick_lungs(parts: list[np.ndarray], min_voxels: int, midline: float, cfg: LungConfig) -> list[np.ndarray]:
    """The one or two lungs among lung-like air regions (largest first).

    The largest region is a lung; when it reaches well into both halves of the body (shares between
    ``cfg.bilateral_share`` and ``1 - cfg.bilateral_share``) it holds both lungs and is split
    (:func:`split_two`); otherwise the other lung is the largest region on the other side of the midline that
    spans most of the same slices (bowel gas lies lower, below the diaphragm).
    """
    if not parts:
        return []
    first = parts[0]
    share = side_fraction(first, midline)
    if cfg.bilateral_share < share < 1.0 - cfg.bilateral_share:
        return split_two(first, min_voxels, cfg.max_split_erosions, midline)
    for other in parts[1:]:
        other_share = side_fraction(other, midline)
        if (other_share > 0.5) != (share > 0.5) and _z_overlap(first, other) >= cfg.min_z_overlap:
            return [first, other]
    return [first]


def split_two(mask: np.ndarray, min_voxels: int, max_erosions: int, midline: float) -> list[np.ndarray]:
    """Split one component holding both lungs: erode (within axial slices) until a large part lies on each side
    of ``midline``, then give every voxel of ``mask`` to the nearer part. Returns ``[mask]`` when no split is
    found."""
    box = bbox(mask, (1, 1, 1))
    if box is None:
        return [mask]
    sub = mask[box]
    eroded = sub
    mid = midline - box[2].start
    for _ in range(max_erosions):
        eroded = ndimage.binary_erosion(eroded, structure=SLICE_2D)
        parts = components(eroded, max(min_voxels // 8, 1))
        if not parts:
            break
        left = next((p for p in parts if side_fraction(p, mid) > 0.5), None)
        right = next((p for p in parts if side_fraction(p, mid) <= 0.5), None)
        if left is not None and right is not None:
            seeds = np.zeros(sub.shape, dtype=np.uint8)
            seeds[left] = 1
            seeds[right] = 2
            idx = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
            nearest = seeds[tuple(idx)]
            out = []
            for k in (1, 2):
                full = np.zeros_like(mask)
                full[box] = sub & (nearest == k)
                out.append(full)
            return out
    return [mask]


def regrow(parts: list[np.ndarray], air: np.ndarray, steps: int) -> list[np.ndarray]:
    """Give back to each part the ``air`` voxels within ``steps`` dilations of it: one 6-connected dilation step
    at a time, so each voxel goes to the part that reaches it first (the nearer one; ties to the larger part)."""
    grown = [p.copy() for p in parts]
    taken = np.zeros(air.shape, dtype=bool)
    for g in grown:
        taken |= g
    for _ in range(steps):
        for g in grown:
            box = bbox(g, margin=(1, 1, 1))
            if box is None:
                continue
            ring = ndimage.binary_dilation(g[box]) & air[box] & ~taken[box]
            g[box] |= ring
            taken[box] |= ring
    return grown


def name_sides(parts: Sequence[np.ndarray], midline: float) -> list[tuple[np.ndarray, int]]:
    """``(mask, label)`` of each lung: of two, the one at higher column indices is the patient's LEFT; a single
    lung is named by the side of the body's midline it lies on."""
    centre_cols = [float(np.nonzero(p.any(axis=(0, 1)))[0].mean()) for p in parts]
    if len(parts) == 2:
        left_first = centre_cols[0] > centre_cols[1]
        return [(parts[0], LEFT), (parts[1], RIGHT)] if left_first else [(parts[0], RIGHT), (parts[1], LEFT)]
    return [(parts[0], LEFT if centre_cols[0] > midline else RIGHT)]
