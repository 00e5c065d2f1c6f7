"""Segmentation metrics of the report's tables: Dice, IoU, sensitivity, precision, plus NSD and HD95.

Overlap metrics follow the report (Tables 2-5) and the COVID-19-CT-Seg benchmark (Ma et al. 2021):

* Dice ``2|P∩G| / (|P| + |G|)``, IoU ``|P∩G| / |P∪G|`` (so IoU = Dice / (2 - Dice)),
  sensitivity (recall) ``|P∩G| / |G|``, precision ``|P∩G| / |P|``.
* NSD, the normalised surface Dice (Nikolov et al., "Clinically applicable segmentation of head and neck anatomy
  for radiotherapy", JMIR 2021): the share of both borders lying within ``tolerance_mm`` of the other border.
  The benchmark uses 1 mm for the lungs and 3 mm for the infection (:data:`NSD_TOLERANCE_MM`).
* HD95: the symmetric 95th-percentile Hausdorff distance in mm, ``max(p95(d(∂P, ∂G)), p95(d(∂G, ∂P)))``.

Surfaces and distances are computed exactly as MONAI's ``compute_surface_dice`` (``use_subvoxels=False``) and
``compute_hausdorff_distance(percentile=95)``: the border of a mask is ``mask XOR binary_erosion(mask)`` (scipy's
cross-shaped structuring element, voxels outside the array count as background) and distances come from
``scipy.ndimage.distance_transform_edt`` at the scan's own voxel spacing. ``tests/test_metrics.py`` compares the
two implementations; this one is plain numpy/scipy, works on the bounding box of ``P ∪ G`` only, and never
returns NaN or infinity.

Empty-mask convention (stated once, used by every table):

* both masks empty: every overlap metric and NSD is 1, HD95 is 0 mm (perfect agreement on "nothing there");
* exactly one mask empty: Dice, IoU and NSD are 0; a ratio whose denominator is the empty mask (sensitivity when
  the ground truth is empty, precision when the prediction is empty) is 0 as well; HD95 is the length of the
  volume's diagonal in mm (the largest distance the grid allows), so that means over cases stay finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

NSD_TOLERANCE_MM: dict[str, float] = {"lung": 1.0, "infection": 3.0}
"""NSD tolerances of the COVID-19-CT-Seg benchmark (Ma et al. 2021), in mm."""

HD_PERCENTILE = 95.0
"""Percentile of the surface distances reported as HD95."""

OVERLAP_KEYS = ("dice", "iou", "sensitivity", "precision")
"""Keys :func:`binary_metrics` always returns."""
SURFACE_KEYS = ("nsd", "hd95")
"""Keys :func:`binary_metrics` adds when a spacing is given."""
METRIC_KEYS = OVERLAP_KEYS + SURFACE_KEYS
"""All metric names, in table order."""

_CROP_MARGIN = 1
"""Voxels kept around the union's bounding box so that cropping does not change any border."""


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype != bool:
        array = array > 0
    if array.ndim == 0:
        raise ValueError(f"{name} must be an array, got a scalar")
    return array


def _ratio(numerator: int, denominator: int, both_empty: bool) -> float:
    """``numerator / denominator``; the empty-mask convention when the denominator is 0."""
    if denominator == 0:
        return 1.0 if both_empty else 0.0
    return numerator / denominator


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from every border voxel of one mask to the nearest border voxel of the other.

    Args:
        pred: boolean mask, any number of dimensions.
        gt: boolean mask of the same shape.
        spacing: voxel size in mm along each axis (same order as the arrays' axes).

    Returns:
        ``(d_pred_to_gt, d_gt_to_pred)``: 1-D float64 arrays, one value per border voxel of ``pred`` resp. ``gt``.
        Both masks must be non-empty.
    """
    union = pred | gt
    coords = np.argwhere(union)
    lo = np.maximum(coords.min(axis=0) - _CROP_MARGIN, 0)
    hi = np.minimum(coords.max(axis=0) + 1 + _CROP_MARGIN, union.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    p, g = pred[box], gt[box]
    border_p = p ^ ndimage.binary_erosion(p)
    border_g = g ^ ndimage.binary_erosion(g)
    sampling = [float(s) for s in spacing]
    dist_to_g = ndimage.distance_transform_edt(~border_g, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~border_p, sampling=sampling)
    return np.asarray(dist_to_g[border_p], dtype=np.float64), np.asarray(dist_to_p[border_g], dtype=np.float64)


def binary_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    tolerance_mm: float | None = None,
) -> dict[str, float]:
    """Dice, IoU, sensitivity and precision of a binary prediction; NSD and HD95 when ``spacing`` is given.

    Args:
        pred: predicted mask (bool, or any array where ``> 0`` is foreground), e.g. canonical ``(D, H, W)``.
        gt: ground-truth mask of the same shape.
        spacing: voxel size in mm per axis, in the arrays' axis order (``(D, H, W)`` for canonical volumes).
            ``None`` skips the surface metrics.
        tolerance_mm: NSD tolerance in mm; default 3 mm (the benchmark's infection tolerance). Use
            ``NSD_TOLERANCE_MM["lung"]`` (1 mm) for lungs.

    Returns:
        ``{"dice", "iou", "sensitivity", "precision"}`` as fractions in [0, 1], plus ``"nsd"`` (fraction) and
        ``"hd95"`` (mm) when ``spacing`` is given. Empty masks follow the module's convention (never NaN).

    Raises:
        ValueError: shapes differ, or ``spacing`` does not have one positive value per axis.
    """
    p = _as_bool(pred, "pred")
    g = _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} must have the same shape")
    tp = int(np.count_nonzero(p & g))
    n_p = int(np.count_nonzero(p))
    n_g = int(np.count_nonzero(g))
    both_empty = n_p == 0 and n_g == 0
    out = {
        "dice": _ratio(2 * tp, n_p + n_g, both_empty),
        "iou": _ratio(tp, n_p + n_g - tp, both_empty),
        "sensitivity": _ratio(tp, n_g, both_empty),
        "precision": _ratio(tp, n_p, both_empty),
    }
    if spacing is None:
        return out
    if len(spacing) != p.ndim or any(not (float(s) > 0) for s in spacing):
        raise ValueError(f"spacing {tuple(spacing)} must give one positive size in mm per axis of {p.shape}")
    tol = NSD_TOLERANCE_MM["infection"] if tolerance_mm is None else float(tolerance_mm)
    if both_empty:
        out["nsd"], out["hd95"] = 1.0, 0.0
    elif n_p == 0 or n_g == 0:
        out["nsd"] = 0.0
        out["hd95"] = float(math.sqrt(sum((n * float(s)) ** 2 for n, s in zip(p.shape, spacing, strict=True))))
    else:
        d_pg, d_gp = surface_distances(p, g, spacing)
        within = int(np.count_nonzero(d_pg <= tol)) + int(np.count_nonzero(d_gp <= tol))
        out["nsd"] = within / (d_pg.size + d_gp.size)
        out["hd95"] = float(max(np.percentile(d_pg, HD_PERCENTILE), np.percentile(d_gp, HD_PERCENTILE)))
    return out


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value) of per-case values."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), sd
