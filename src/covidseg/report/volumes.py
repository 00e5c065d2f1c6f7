"""Volumes of the lungs and of their infection (mL) and the percentage of each lung involved."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from covidseg.report.severity import severity

LUNG_NAMES: dict[int, str] = {1: "left", 2: "right"}
"""Lung label -> name (patient's side)."""


def involvement(lungs: np.ndarray, infection: np.ndarray, spacing: Sequence[float]) -> dict[str, Any]:
    """Volumes (mL) and involvement (%) of each lung and of both.

    Volumes are voxel counts times the voxel volume (product of ``spacing`` in mm^3 / 1000); no partial-volume
    correction.

    Args:
        lungs: ``(D, H, W)`` labels, 1 left, 2 right.
        infection: ``(D, H, W)`` 0/1, already clipped to the lungs.
        spacing: voxel size in mm.

    Returns:
        ``{"left": {...}, "right": {...}, "both": {...}, "voxel_volume_ml": float}``; each lung entry holds
        ``lung_ml``, ``infection_ml``, ``lung_voxels``, ``infection_voxels``, ``percent`` (0 when the lung is
        empty), ``severity_score``, ``severity`` and ``severity_band``.
    """
    if lungs.shape != infection.shape:
        raise ValueError(f"lung mask {lungs.shape} and infection mask {infection.shape} differ in shape")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    inf = infection > 0
    counts, inf_counts = [0, 0, 0], [0, 0, 0]  # count_nonzero of a comparison: no int64 copy as in bincount
    for label in LUNG_NAMES:
        side = lungs == label
        counts[label] = int(np.count_nonzero(side))
        inf_counts[label] = int(np.count_nonzero(side & inf))
    out: dict[str, Any] = {"voxel_volume_ml": voxel_ml}
    entries = [(name, int(counts[label]), int(inf_counts[label])) for label, name in LUNG_NAMES.items()]
    entries.append(("both", int(counts[1] + counts[2]), int(inf_counts[1] + inf_counts[2])))
    for name, n_lung, n_inf in entries:
        percent = 100.0 * n_inf / n_lung if n_lung else 0.0
        sev = severity(percent)
        out[name] = {
            "lung_voxels": n_lung,
            "infection_voxels": n_inf,
            "lung_ml": n_lung * voxel_ml,
            "infection_ml": n_inf * voxel_ml,
            "percent": percent,
            "severity_score": sev.score,
            "severity": sev.label,
            "severity_band": sev.band,
        }
    return out
