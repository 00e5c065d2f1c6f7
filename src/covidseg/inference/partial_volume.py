"""The partial-volume band above the diaphragm, which a 2D slice model takes for ground glass.

Where an axial slice of 2-3 mm cuts the lung's inferior surface (the diaphragm's dome, the top of the heart)
obliquely, each voxel averages aerated lung with the soft tissue below it: a hazy band between lung and tissue
density that on one slice looks like ground-glass opacity. A 2D model sees no slice above or below and calls it
infection, with high confidence (docs/real-ct.md). Along the body's long axis the band is a ramp: soft tissue
within a few millimetres below the voxel, clearly lighter lung within a few millimetres above it. A lesion on the
diaphragm is not: above its lowest voxels lies more lesion, as dense as they are. Only a lesion thinner than the
band itself is indistinguishable from it.

:func:`diaphragm_band` marks the voxels of a mask that lie on such a ramp;
:class:`~covidseg.inference.stages.SliceInfection` sets their probability to 0 (``partial_volume_mm``; 0 turns it off). The 3D path does not use it:
its network sees the slices above and below.
"""

from __future__ import annotations

import math

import numpy as np

PARTIAL_VOLUME_MM = 4.0
"""How far (mm) below a voxel soft tissue and above it lighter lung are looked for: two slices of a 2 mm CT, four
of a 1 mm one, one slice of a 3 mm or thicker one (never less than one slice)."""
LIGHTER_BY_HU = 100.0
"""Lung above a voxel counts as lighter when it is at least this much (HU) below the voxel's own value."""


def band_slices(spacing_d_mm: float, band_mm: float = PARTIAL_VOLUME_MM) -> int:
    """Slices looked at on each side: ``band_mm / spacing`` rounded, at least 1; 0 when ``band_mm`` is 0."""
    if band_mm <= 0:
        return 0
    return max(1, int(round(band_mm / spacing_d_mm)))


def diaphragm_band(mask: np.ndarray, lungs: np.ndarray, hu: np.ndarray, spacing_d_mm: float,
                   band_mm: float = PARTIAL_VOLUME_MM, lighter_by_hu: float = LIGHTER_BY_HU) -> np.ndarray:
    """Bool ``(D, H, W)``: the voxels of ``mask`` on a partial-volume ramp at the lungs' inferior surface.

    A voxel is on the ramp when, in its own column along D (canonical: index 0 is the most inferior slice),
    some voxel at most ``band_mm`` below it lies outside the lungs and some lung voxel at most ``band_mm`` above
    it is at least ``lighter_by_hu`` lighter than it. Columns are not followed past the volume's ends.

    Args:
        mask: bool ``(D, H, W)``, e.g. the infection found.
        lungs: ``(D, H, W)`` labels, lungs > 0.
        hu: ``(D, H, W)`` Hounsfield units.
        spacing_d_mm: slice spacing (mm).
        band_mm: how far to look on each side (mm); 0 marks nothing.
        lighter_by_hu: how much lighter the lung above must be (HU).
    """
    if not (math.isfinite(spacing_d_mm) and spacing_d_mm > 0):
        raise ValueError(f"spacing_d_mm {spacing_d_mm}: expected a positive number")
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=bool)
    steps = band_slices(spacing_d_mm, band_mm)
    if steps == 0 or not mask.any():
        return out
    lung = lungs > 0
    tissue_below = np.zeros_like(out)
    lighter_above = np.zeros_like(out)
    hu = np.asarray(hu, dtype=np.float32)
    for k in range(1, min(steps, mask.shape[0] - 1) + 1):
        tissue_below[k:] |= ~lung[:-k]
        lighter_above[:-k] |= lung[k:] & (hu[k:] <= hu[:-k] - np.float32(lighter_by_hu))
    return mask & tissue_below & lighter_above
