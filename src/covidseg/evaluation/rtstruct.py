"""RTSTRUCT references: ROIs read with pydicom, their contours rasterised with ``skimage.draw.polygon``.

Contour points are DICOM patient coordinates (LPS, mm). Each point is mapped to continuous canonical indices
``(d, h, w)`` with the inverse of :attr:`~covidseg.evaluation.geometry.Grid.lps_affine`, the same affine that
:func:`covidseg.io.image.read_image` gives the CT and :func:`covidseg.io.image.write_mask` writes into NIfTI, so
a rasterised ROI lands on the CT's own voxels. A closed planar contour must lie in one axial plane of the grid
(within :data:`PLANE_TOL` of a slice); a pixel belongs to it when its centre lies inside the polygon
(scikit-image's rule). Several contours of one ROI on one slice are combined by exclusive or, so an inner contour
cuts a hole (the structure-set convention for rings, as Plastimatch rasterises them).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covidseg.errors import InputError
from covidseg.evaluation.geometry import Grid
from covidseg.evaluation.labels import Structure, default_label

log = logging.getLogger("covidseg")

MODALITY = "RTSTRUCT"
CLOSED = "CLOSED_PLANAR"
"""The only contour type with an inside; POINT and OPEN_* contours have no volume."""
PLANE_TOL = 0.25
"""Largest distance (in slice gaps) of a contour from the nearest slice plane, and its largest spread."""
EDGE_TOL = 0.5
"""Contour points up to this far (voxels) outside the grid's columns/rows are the grid's edge, not an error."""


def rasterise_polygons(polygons: Sequence[np.ndarray], grid: Grid, path: Path, what: str) -> np.ndarray:
    """Fill closed planar contours (LPS mm) into a canonical ``(D, H, W)`` boolean mask on ``grid``.

    Args:
        polygons: one ``(N, 3)`` array of LPS points (mm) per contour.
        grid: the evaluation grid.
        path: the file the contours came from (for messages).
        what: the structure (for messages).

    Returns:
        Boolean mask; contours on one slice are combined by exclusive or.

    Raises:
        InputError: a contour not in an axial plane of the grid, between two slices, or outside its slices.
    """
    to_index = np.linalg.inv(grid.lps_affine)
    depth, rows, cols = grid.shape
    mask = np.zeros(grid.shape, dtype=bool)
    clipped = 0
    from skimage.draw import polygon

    for points in polygons:
        idx = (to_index[:3, :3] @ points.T).T + to_index[:3, 3]  # (N, 3) continuous (d, h, w)
        d = idx[:, 0]
        centre = float(d.mean())
        k = int(np.rint(centre))
        if float(np.ptp(d)) > 2 * PLANE_TOL:
            raise InputError(f"{path}: a contour of {what} is not in an axial plane of the CT (it spans "
                             f"{np.ptp(d):.2f} slices); it was drawn on another series or an oblique reformat — "
                             f"give --ct the series it was drawn on")
        if abs(centre - k) > PLANE_TOL:
            raise InputError(f"{path}: a contour of {what} lies between two slices of the CT (at slice "
                             f"{centre:.2f}); it was drawn on another series — give --ct the series it was drawn on")
        if not 0 <= k < depth:
            raise InputError(f"{path}: a contour of {what} lies outside the CT's {depth} slices (at slice {k}); "
                             f"it belongs to another scan — give --ct the series it was drawn on")
        outside = (idx[:, 1] < -EDGE_TOL) | (idx[:, 1] > rows - 1 + EDGE_TOL) | \
                  (idx[:, 2] < -EDGE_TOL) | (idx[:, 2] > cols - 1 + EDGE_TOL)
        clipped += int(np.any(outside))
        rr, cc = polygon(idx[:, 1], idx[:, 2], shape=(rows, cols))
        mask[k, rr, cc] ^= True
    if clipped:
        log.warning("%s: %d contour(s) of %s reach outside the CT's field of view; clipped to it", path, clipped,
                    what)
    return mask


@contextlib.contextmanager
def _decimal_strings_as_numpy() -> Iterator[None]:
    """pydicom decodes DS values to a numpy array instead of one Python object per number (25x faster)."""
    import pydicom.config

    previous = pydicom.config.use_DS_numpy
    pydicom.config.use_DS_numpy = True
    try:
        yield
    finally:
        pydicom.config.use_DS_numpy = previous


def _points(contour: Any, path: Path, what: str) -> np.ndarray:
    try:
        with _decimal_strings_as_numpy():
            flat = np.asarray(contour.ContourData, dtype=np.float64).ravel()
    except (AttributeError, TypeError, ValueError):
        raise InputError(f"{path}: a contour of {what} has no readable Contour Data; re-export the "
                         f"structure set") from None
    if flat.size < 9 or flat.size % 3 or not np.all(np.isfinite(flat)):
        raise InputError(f"{path}: a contour of {what} holds {flat.size} coordinates, not three per point "
                         f"(at least three points); re-export the structure set")
    return flat.reshape(-1, 3)


def _load_roi(contours: list[Any], grid: Grid, path: Path, what: str) -> np.ndarray:
    return rasterise_polygons([_points(c, path, what) for c in contours], grid, path, what)


def _references(ds: Any) -> tuple[set[str], set[str], set[str]]:
    """(series UIDs, frame-of-reference UIDs, image SOP UIDs) an RTSTRUCT points at."""
    series: set[str] = set()
    frames: set[str] = set()
    images: set[str] = set()
    for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
        frames.add(str(ref.get("FrameOfReferenceUID", "")))
        for study in ref.get("RTReferencedStudySequence", []):
            for ser in study.get("RTReferencedSeriesSequence", []):
                series.add(str(ser.get("SeriesInstanceUID", "")))
                images.update(str(i.get("ReferencedSOPInstanceUID", "")) for i in ser.get("ContourImageSequence", []))
    for roi in ds.get("StructureSetROISequence", []):
        frames.add(str(roi.get("ReferencedFrameOfReferenceUID", "")))
    for roi_contour in ds.get("ROIContourSequence", []):
        for contour in roi_contour.get("ContourSequence", []):
            images.update(str(i.get("ReferencedSOPInstanceUID", "")) for i in contour.get("ContourImageSequence", []))
    return series - {""}, frames - {""}, images - {""}


def rtstruct_structures(ds: Any, path: Path, grid: Grid) -> list[Structure]:
    """The ROIs of an RTSTRUCT dataset (read with pydicom) as structures on ``grid`` (rasterised when loaded).

    Raises:
        InputError: the dataset has no ROIs, or references another series than the grid's CT.
    """
    rois = ds.get("StructureSetROISequence")
    if not rois:
        raise InputError(f"{path}: an RTSTRUCT without ROIs (no Structure Set ROI Sequence); re-export the "
                         f"structure set")
    if grid.series is not None:
        grid.series.check(path, *_references(ds))
    contours: dict[int, list[Any]] = {}
    for item in ds.get("ROIContourSequence", []):
        contours.setdefault(int(item.get("ReferencedROINumber", -1)), []).extend(item.get("ContourSequence", []))
    structures = []
    for roi in rois:
        number = int(roi.get("ROINumber", -1))
        name = str(roi.get("ROIName", f"ROI {number}")).strip()
        what = f"ROI {number} '{name}'"
        items = contours.get(number, [])
        closed = [c for c in items if str(c.get("ContourGeometricType", CLOSED)).upper() == CLOSED]
        default = default_label(name)
        if items and not closed:
            what += " (points or open contours only)"
            default = None
        structures.append(Structure(name=name, origin=what, default=default,
                                    load=functools.partial(_load_roi, closed, grid, path, what)))
    return structures
