"""RT Structure Sets (``rtstruct.dcm``) of a DICOM series' lungs and infection, built with rt-utils.

One RTSTRUCT with three ROIs in the order, with the names and colours of the DICOM-SEG's segments
(:data:`covidseg.io.dicom_seg.SEGMENTS`): 1 *Left lung*, 2 *Right lung* (whole lungs, their infected parts
included), 3 *Infection*. rt-utils (the optional extra ``rtstruct``: ``pip install 'covidseg[rtstruct]'``) builds
the structure set from the series' headers: patient, study, Frame of Reference, the referenced series and each of
its slices' SOP instances (``ds_helper.create_rtstruct_dataset``), the Structure Set ROI and RT ROI Observation
items, and each contour's item referencing the slice it lies on (``ds_helper.create_contour``). The headers are
the files covidseg read (:attr:`CTImage.series_files`), not rt-utils' own folder scan, which takes every DICOM
file under the folder (other series too) and silently skips slices whose pixels pydicom cannot decode.

Contours lie on the voxel edges. Each slice of a mask is traced with scikit-image's marching squares
(``skimage.measure.find_contours`` at level 0.5, background fully connected): closed planar polygons through the
midpoints between the mask's border pixels and their outside neighbours, a hole as a contour of its own (read by
exclusive or, as :mod:`covidseg.evaluation.rtstruct` and Plastimatch do), diagonal neighbours as separate
contours; collinear points are dropped. Every pixel centre of the mask lies at least 0.35 pixel inside its polygon
and every other centre as far outside, so a reader that fills the pixels whose centres are inside gets the mask
back voxel for voxel. rt-utils' own ``add_roi`` draws OpenCV contours through the border pixels' centres instead,
which such a reader fills half a pixel short all round (about 2 % of each lung's voxels on the real series of
``tests/test_rtstruct.py``), and it scales the row direction by the row spacing (Pixel Spacing's first value)
where the column spacing belongs (qurit/rt-utils#92), which misplaces every contour on non-square pixels;
neither is used here.

Orientation. Contours are listed in rt-utils' slice order (ascending position along the slice normal,
``image_helper.get_slice_position``). covidseg's masks are canonical ``(D, H, W)``; they are put onto the file grid
(:meth:`CTImage.to_original`: columns, rows, slices), and each of rt-utils' slices is matched to a slice of that
grid by its own Image Position (Patient) through the grid's affine (:func:`rt_utils_slice_order`), never by an
assumed file or instance order. A contour point at (row ``r``, column ``c``) of grid slice ``k`` is placed at the
grid's affine applied to ``(c, r, k)`` (LPS mm), after checking that the slice's Image Orientation (Patient) is the
grid's in-plane axes. Coordinates are written with 4 decimals (0.1 um; a Decimal String holds 16 characters).

An ROI without any voxel (no infection found) stays described (Structure Set ROI, RT ROI Observations, colour)
with no Contour Sequence, which is optional in the ROI Contour module: the file is valid DICOM and reads back as
an empty mask.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidseg.errors import InputError, UserError
from covidseg.io.atomic import atomic_path
from covidseg.io.dicom import LPS_TO_RAS, series_headers
from covidseg.io.dicom_seg import MANUFACTURER, SEGMENTS
from covidseg.io.volume import CTImage

log = logging.getLogger("covidseg")

RTSTRUCT_FILE = "rtstruct.dcm"
"""The RT Structure Set of a case folder."""
RTSTRUCT_SERIES_NUMBER = 902
"""Series Number of the written RTSTRUCT (next to the DICOM-SEG's 901)."""
INSTALL_HINT = "pip install 'covidseg[rtstruct]'"
"""How to install rt-utils with covidseg (the optional extra ``rtstruct``)."""
LEVEL = 0.5
"""Marching-squares level between a mask's 0 and 1: contours half way between inside and outside pixel centres."""
COLLINEAR_TOL = 1e-6
"""A contour point where the contour turns by less (twice the triangle with its neighbours, pixels^2) is dropped:
marching squares puts points on a half-pixel lattice, so collinear ones give exactly 0 and corners 0.25 or more."""
DECIMALS = 4
"""Decimals of the contour coordinates (mm): 0.1 um, within a Decimal String's 16 characters."""
POSITION_TOL = 0.01
"""Largest distance (voxels) of a slice's Image Position (Patient) from a slice origin of the file grid."""
ORIENTATION_TOL = 1e-3
"""Largest difference between a slice's direction cosines and the grid's in-plane axes."""
INTERPRETED_TYPES = ("ORGAN", "ORGAN", "")
"""RT ROI Interpreted Type of the three ROIs (the infection is no defined term: empty, as type 2 allows)."""
STUDY_TYPE2 = ("StudyDate", "StudyTime", "StudyID", "ReferringPhysicianName", "AccessionNumber")
"""General Study attributes that must be present (possibly empty); rt-utils reads the first three."""
SERIES_DESCRIPTION = "covidseg lungs and infection"


@dataclass(frozen=True)
class RTStructResult:
    """What :func:`write_rtstruct` wrote.

    Attributes:
        path: the file.
        contours: number of contours of each ROI (in the order of :data:`SEGMENTS`).
        empty_rois: names of the ROIs without any contour (an empty mask).
    """

    path: Path
    contours: tuple[int, ...]
    empty_rois: tuple[str, ...]


def require_rt_utils() -> None:
    """Raise :class:`~covidseg.errors.UserError` (exit 2) when rt-utils cannot be imported."""
    try:
        import rt_utils  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--rtstruct needs rt-utils, which cannot be imported ({exc}); install it with "
                        f"{INSTALL_HINT}") from None


@contextlib.contextmanager
def _refusals(image: CTImage) -> Iterator[None]:
    """rt-utils' errors as InputError (it raises bare ``Exception`` for headers it cannot use)."""
    try:
        with warnings.catch_warnings():
            # rt-utils sets FileDataset.is_little_endian / is_implicit_VR, which pydicom 3 deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    except InputError:
        raise
    except Exception as exc:  # rt-utils: Exception("Invalid Image Orientation ..."), AttributeError, ValueError
        raise InputError(f"{image.path}: rt-utils cannot build an RTSTRUCT on this series ({type(exc).__name__}: "
                         f"{exc}); the NIfTI and .seg.nrrd outputs hold the same masks") from None


def _read_headers(image: CTImage) -> list[Any]:
    """The series' headers, refused without one Frame of Reference; empty type 2 study attributes added."""
    headers = series_headers(image, "the RTSTRUCT")
    frames = {str(h.get("FrameOfReferenceUID", "") or "") for h in headers}
    if "" in frames:
        raise InputError(f"{image.path}: the series has no Frame of Reference UID (0020,0052), by which an "
                         f"RTSTRUCT is placed on the images; the NIfTI and .seg.nrrd outputs hold the same masks")
    if len(frames) > 1:
        raise InputError(f"{image.path}: the series' slices carry {len(frames)} Frame of Reference UIDs; an "
                         f"RTSTRUCT has one; the NIfTI and .seg.nrrd outputs hold the same masks")
    for header in headers:
        for key in STUDY_TYPE2:
            if key not in header:
                setattr(header, key, "")
    return headers


def file_lps_affine(image: CTImage) -> np.ndarray:
    """4x4 affine from the file grid's ``(column, row, slice)`` indices to patient coordinates (LPS, mm)."""
    return LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)


def rt_utils_slice_order(headers: Sequence[Any], image: CTImage) -> np.ndarray:
    """The file-grid slice of each header, found from its Image Position and Orientation (Patient).

    Args:
        headers: the series' headers in rt-utils' order (``image_helper.get_slice_position``, ascending).
        image: the series as read (its affine is the file grid's).

    Returns:
        ``order`` with ``order[m] = k``: ``headers[m]`` is slice ``k`` of :meth:`CTImage.to_original`'s array.

    Raises:
        InputError: a slice's position is not a slice origin of the grid, two slices share one, or a slice's
            rows and columns are not the grid's.
    """
    affine = file_lps_affine(image)
    to_index = np.linalg.inv(affine)
    axes = affine[:3, :2] / np.linalg.norm(affine[:3, :2], axis=0)  # the grid's row and column directions
    depth = image.original_shape[2]
    order = []
    for header in headers:
        uid = header.get("SOPInstanceUID", "?")
        cosines = np.asarray(header.ImageOrientationPatient, dtype=np.float64).reshape(2, 3).T
        if np.abs(cosines - axes).max() > ORIENTATION_TOL:
            raise InputError(f"{image.path}: slice {uid} has the orientation {cosines.T.ravel().round(4).tolist()}, "
                             f"not the series' {axes.T.ravel().round(4).tolist()}; keep the series unchanged while "
                             f"covidseg runs")
        ijk = to_index[:3, :3] @ np.asarray(header.ImagePositionPatient, dtype=np.float64) + to_index[:3, 3]
        k = int(np.rint(ijk[2]))
        if np.abs(ijk[:2]).max() > POSITION_TOL or abs(ijk[2] - k) > POSITION_TOL or not 0 <= k < depth:
            raise InputError(f"{image.path}: slice {uid} lies at grid index {np.round(ijk, 3).tolist()}, not on a "
                             f"slice of the series read; keep the series unchanged while covidseg runs")
        order.append(k)
    if sorted(order) != list(range(depth)):
        raise InputError(f"{image.path}: the slices' positions give the grid slices {order}, not each of the "
                         f"{depth} slices once; keep the series unchanged while covidseg runs")
    return np.asarray(order, dtype=np.int64)


def _corners(polygon: np.ndarray) -> np.ndarray:
    """The points of a closed polygon (first point not repeated) where it turns: collinear points dropped."""
    before = polygon - np.roll(polygon, 1, axis=0)
    after = np.roll(polygon, -1, axis=0) - polygon
    turn = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0])  # twice the triangle's area (pixels^2)
    return polygon[turn > COLLINEAR_TOL]


def slice_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons on the voxel edges of one slice of a mask (marching squares, scikit-image).

    Args:
        mask: ``(rows, columns)`` bool.

    Returns:
        One ``(N, 2)`` array of ``(row, column)`` pixel coordinates per contour (N >= 4, the first point not
        repeated, only the points where it turns); a hole is a contour of its own.
    """
    from skimage.measure import find_contours

    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return []
    r0, c0 = rows.min() - 1, cols.min() - 1  # crop with a margin of one pixel, so that every contour closes
    crop = np.zeros((rows.max() - r0 + 2, cols.max() - c0 + 2), dtype=np.uint8)
    crop[rows - r0, cols - c0] = 1
    # background fully connected: two pixels touching at a corner are two contours, each around its own centre
    return [_corners(contour[:-1]) + (r0, c0) for contour in find_contours(crop, LEVEL, fully_connected="low")]


def _contours(mask: np.ndarray, headers: Sequence[Any], order: np.ndarray, affine: np.ndarray) -> list[Any]:
    """The contour items of one ROI; ``mask`` is ``(columns, rows, slices)`` on the file grid."""
    from rt_utils import ds_helper

    slices = np.ascontiguousarray(mask.transpose(2, 1, 0))  # (slices, rows, columns)
    items = []
    for header, k in zip(headers, order, strict=True):
        for polygon in slice_polygons(slices[k]):
            index = np.column_stack([polygon[:, 1], polygon[:, 0], np.full(len(polygon), float(k))])  # (c, r, k)
            points = np.round(index @ affine[:3, :3].T + affine[:3, 3], DECIMALS) + 0.0  # + 0.0: no "-0.0000"
            item = ds_helper.create_contour(header, [f"{v:.{DECIMALS}f}" for v in points.ravel()])
            item.NumberOfContourPoints = len(polygon)
            items.append(item)
    return items


def _build(headers: list[Any], order: np.ndarray, masks: Sequence[np.ndarray], image: CTImage) \
        -> tuple[Any, list[int]]:
    """rt-utils' structure set of ``headers`` with one ROI per mask (names and colours of :data:`SEGMENTS`)."""
    import pydicom.config
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from rt_utils import ds_helper
    from rt_utils.utils import ROIData

    affine = file_lps_affine(image)
    # the contour coordinates are formatted as valid Decimal Strings here; pydicom's check of each would take
    # most of the time (seconds on a CT)
    with _refusals(image), pydicom.config.disable_value_validation():
        ds = ds_helper.create_rtstruct_dataset(headers)
        frame = ds.ReferencedFrameOfReferenceSequence[-1].FrameOfReferenceUID
        counts = []
        for number, (seg, mask) in enumerate(zip(SEGMENTS, masks, strict=True), start=1):
            roi = ROIData(mask=mask, color=[int(round(255 * c)) for c in seg.color], number=number, name=seg.label,
                          frame_of_reference_uid=frame, roi_generation_algorithm=0)
            item = Dataset()
            item.ROIDisplayColor = roi.color
            contours = _contours(mask, headers, order, affine)
            if contours:  # optional (type 3), and when present it holds one or more items
                item.ContourSequence = DicomSequence(contours)
            item.ReferencedROINumber = number
            ds.ROIContourSequence.append(item)
            ds.StructureSetROISequence.append(ds_helper.create_structure_set_roi(roi))
            ds.RTROIObservationsSequence.append(ds_helper.create_rtroi_observation(roi))
            counts.append(len(contours))
    return ds, counts


def _describe(ds: Any, source: Any, model: str, version: str) -> None:
    """covidseg as the equipment, its own series, the attributes rt-utils leaves out (type 2, Frame of Reference)."""
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet  # the patient's names are copied in it
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = model
    ds.SoftwareVersions = version
    if "InstitutionName" in ds:
        del ds.InstitutionName  # rt-utils' own
    ds.SeriesNumber = RTSTRUCT_SERIES_NUMBER
    ds.InstanceNumber = 1
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.SeriesDate, ds.SeriesTime = ds.StructureSetDate, ds.StructureSetTime
    ds.StructureSetLabel = MANUFACTURER.upper()
    ds.StructureSetName = SERIES_DESCRIPTION
    ds.OperatorsName = ""
    for key in ("ReferringPhysicianName", "AccessionNumber"):
        setattr(ds, key, source.get(key, ""))
    ds.FrameOfReferenceUID = source.FrameOfReferenceUID
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    algorithm = f"{MANUFACTURER} {version}, model {model}"[:64]
    for roi, observation, kind in zip(ds.StructureSetROISequence, ds.RTROIObservationsSequence, INTERPRETED_TYPES,
                                      strict=True):
        roi.ROIGenerationDescription = algorithm
        observation.ROIObservationLabel = roi.ROIName
        observation.RTROIInterpretedType = kind
        if "ROIObservationDescription" in observation:
            del observation.ROIObservationDescription  # rt-utils' display hints for its own viewer


def write_rtstruct(lungs: np.ndarray, infection: np.ndarray, image: CTImage, path: str | Path, model: str,
                   version: str | None = None) -> RTStructResult:
    """Write the lungs and infection of a DICOM series as an RT Structure Set referencing that series (atomic).

    Args:
        lungs: canonical ``(D, H, W)`` uint8 labels (1 left lung, 2 right lung).
        infection: canonical ``(D, H, W)`` 0/1 infection.
        image: the series as :func:`covidseg.io.dicom.read_dicom_series` read it (its ``series_files``).
        path: the ``.dcm`` file to write.
        model: the infection model's name (Manufacturer Model Name, ROI Generation Description).
        version: covidseg's version by default (Software Versions).

    Returns:
        The file, the number of contours per ROI and the ROIs without contour.

    Raises:
        ValueError: ``image`` is not a DICOM series, or the masks are not on its canonical grid.
        UserError: rt-utils is not installed.
        InputError: the series' files cannot be read again, have no single Frame of Reference, or rt-utils
            refuses their headers.
    """
    from covidseg import __version__

    if not image.series_files:
        raise ValueError(f"{image.path}: an RTSTRUCT needs a DICOM series as input (source {image.source!r})")
    for name, mask in (("lungs", lungs), ("infection", infection)):
        if tuple(np.shape(mask)) != image.shape:
            raise ValueError(f"{name} of shape {np.shape(mask)} does not match the canonical CT shape {image.shape}")
    require_rt_utils()
    from rt_utils import image_helper

    with _refusals(image):
        headers = sorted(_read_headers(image), key=image_helper.get_slice_position)  # rt-utils' own order
    order = rt_utils_slice_order(headers, image)
    file_lungs = image.to_original(np.asarray(lungs))  # (columns, rows, slices): ITK's index order
    file_infection = image.to_original(np.asarray(infection))
    masks = (file_lungs == 1, file_lungs == 2, file_infection > 0)
    ds, counts = _build(headers, order, masks, image)
    version = version or __version__
    _describe(ds, headers[0], model, version)
    empty = [seg.label for seg, n in zip(SEGMENTS, counts, strict=True) if n == 0]
    if empty:
        log.info("%s: ROI(s) %s empty: described, no contour", path, empty)
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # rt-utils' is_little_endian / is_implicit_VR
        ds.save_as(str(tmp), enforce_file_format=True)
    return RTStructResult(path=path, contours=tuple(counts), empty_rois=tuple(empty))
