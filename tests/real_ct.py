"""The three real CTs of ``../shared/data/real-ct`` for the lung tests and ``benchmarks/lungs_real.py``.

One home for where they are, how they are read (cached), and how a lung mask is scored against the expert
contours of ``pancreas-ct-cb-001`` (its RTSTRUCT rasterised onto the CT grid, ``reference_labels.nii.gz``:
2 = LUNG_L, 3 = LUNG_R), so that the scoring can be switched to another RTSTRUCT reader in one place.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from covidseg.inference.lungs import LEFT, RIGHT
from covidseg.io.image import CTImage
from covidseg.metrics import binary_metrics

REAL_CT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real-ct"
"""Folder of the real CTs (absent in a user's clone: the tests that need it skip)."""
CASES = {
    "pancreas-ct-cb-001": "dicom",
    "lidc-idri-0314": "ct.nii.gz",
    "chest-2mm-00": "ct.nii.gz",
}
"""Case folder -> the CT inside it."""
REFERENCE_LUNG_LABELS = {LEFT: 2, RIGHT: 3}
"""covidseg's lung label -> the label of that lung in ``pancreas-ct-cb-001/reference_labels.nii.gz``."""
NODULE = "lidc-idri-0314/nodule/nodule_consensus_ge2of4.nii.gz"
"""The LIDC readers' >= 2-of-4 consensus of the nodule of lidc-idri-0314."""


def missing_reason() -> str | None:
    """Why the real CTs cannot be used here, or ``None`` when they can."""
    missing = [name for name, ct in CASES.items() if not (REAL_CT / name / ct).exists()]
    if missing:
        return f"real CTs not found under {REAL_CT.resolve()} ({', '.join(missing)}): a clone without ../shared"
    return None


@functools.lru_cache(maxsize=3)
def load_image(name: str) -> CTImage:
    """A case's CT as ``covidseg.io.image.read_image`` reads it (cached; its array read-only)."""
    from covidseg.io.image import read_image

    image = read_image(REAL_CT / name / CASES[name])
    image.array.setflags(write=False)
    return image


def load_case(name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``(hu, spacing)`` of a case: canonical ``(D, H, W)`` float32 HU (read-only) and mm."""
    image = load_image(name)
    return image.array, (float(image.spacing[0]), float(image.spacing[1]), float(image.spacing[2]))


@functools.lru_cache(maxsize=1)
def pancreas_reference() -> np.ndarray:
    """The expert lungs of pancreas-ct-cb-001 as covidseg labels (1 left, 2 right), canonical ``(D, H, W)``."""
    from covidseg.io.image import read_mask

    name = "pancreas-ct-cb-001"
    ref = read_mask(REAL_CT / name / "reference_labels.nii.gz", like=load_image(name))
    out = np.zeros(ref.shape, dtype=np.uint8)
    for label, theirs in REFERENCE_LUNG_LABELS.items():
        out[ref == theirs] = label
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=1)
def lidc_nodule() -> np.ndarray:
    """The consensus nodule of lidc-idri-0314, canonical ``(D, H, W)`` bool."""
    from covidseg.io.image import read_mask

    nodule = read_mask(REAL_CT / NODULE, like=load_image("lidc-idri-0314")) > 0
    nodule.setflags(write=False)
    return nodule


def lung_dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Dice of the left and right lung of ``pred`` against ``ref`` (both covidseg labels)."""
    return {side: binary_metrics(pred == label, ref == label)["dice"]
            for side, label in (("left", LEFT), ("right", RIGHT))}
