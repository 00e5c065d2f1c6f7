"""DICOM-SEG references read with highdicom: each segment as a volume, put onto the grid without resampling.

highdicom builds each segment's volume from the frames' positions and orientation (``Segmentation.get_volume``,
LPS affine); :func:`~covidseg.evaluation.geometry.onto_grid` then permutes, flips, pads or crops it onto the
evaluation grid, so frames omitted because they were empty, and any frame order, are handled. Fractional
segments count as foreground where their value is at least :data:`FRACTIONAL_THRESHOLD`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from covidseg.errors import InputError
from covidseg.evaluation.geometry import Grid, onto_grid
from covidseg.evaluation.labels import Structure, default_label

MODALITY = "SEG"
FRACTIONAL_THRESHOLD = 0.5
"""Fractional (probability or occupancy) segments are binarised at this value."""


def _references(seg: Any) -> tuple[set[str], set[str], set[str]]:
    """(series UIDs, frame-of-reference UIDs, image SOP UIDs) a Segmentation points at."""
    series: set[str] = set()
    images: set[str] = set()
    for ser in seg.get("ReferencedSeriesSequence", []):
        series.add(str(ser.get("SeriesInstanceUID", "")))
        images.update(str(i.get("ReferencedSOPInstanceUID", "")) for i in ser.get("ReferencedInstanceSequence", []))
    frames = {str(seg.get("FrameOfReferenceUID", ""))}
    return series - {""}, frames - {""}, images - {""}


def _load_segment(seg: Any, number: int, grid: Grid, path: Path, what: str) -> np.ndarray:
    try:
        volume = seg.get_volume(segment_numbers=[number], combine_segments=False, rescale_fractional=True)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: the frames of {what} do not form a regular 3D volume ({exc}); the SEG is "
                         f"not of one CT series — re-export it on the CT's grid") from None
    array = np.asarray(volume.array)
    array = array[..., 0] if array.ndim == 4 else array
    mask = array >= FRACTIONAL_THRESHOLD if array.dtype.kind == "f" else array > 0
    return onto_grid(mask, volume.affine, grid, path, what).astype(bool, copy=False)


def seg_structures(ds: Any, path: Path, grid: Grid) -> list[Structure]:
    """The segments of a DICOM-SEG dataset (read with pydicom) as structures on ``grid`` (decoded when loaded).

    Raises:
        InputError: highdicom cannot read it as a Segmentation, or it references another series than the
            grid's CT.
    """
    import highdicom as hd

    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: not a readable DICOM-SEG ({type(exc).__name__}: {exc}); re-export the "
                         f"segmentation") from None
    if grid.series is not None:
        grid.series.check(path, *_references(seg))
    structures = []
    for number in seg.segment_numbers:
        name = str(seg.get_segment_description(number).segment_label).strip()
        what = f"segment {number} '{name}'"
        structures.append(Structure(name=name, origin=what, default=default_label(name),
                                    load=functools.partial(_load_segment, seg, number, grid, path, what)))
    return structures
