"""DICOM series (a folder) read with SimpleITK's ``ImageSeriesReader``, checked slice by slice, and named.

A folder may hold several series: the one with most slices is read, and the choice is logged. Before reading,
the slice positions (Image Position Patient projected on the slice normal) are checked: duplicated positions,
gaps (missing slices) and uneven spacing each raise :class:`~covidseg.errors.InputError` naming the files and
the fix, because a volume stacked from such a series would silently have wrong geometry.

ITK stores geometry in LPS (origin, direction, spacing); it is converted into the RAS affine nibabel would give
the same volume written as NIfTI, so a DICOM series and its NIfTI twin read to the same voxels and geometry.

:func:`series_name` names a series from its metadata (``PatientID_seriesN`` from PatientID and SeriesNumber),
read with pydicom from the folder's first DICOM file: folders exported from a PACS are often all called ``DICOM``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from covidseg.errors import InputError
from covidseg.io.formats import safe_file_name
from covidseg.io.volume import CTImage, check_voxel_count, make_ct_image

log = logging.getLogger("covidseg")

TAG_POSITION = "0020|0032"
"""Image Position (Patient), mm in LPS."""
TAG_ORIENTATION = "0020|0037"
"""Image Orientation (Patient): row and column direction cosines."""
DUPLICATE_TOL_MM = 1e-3
"""Two slices closer than this along the normal are the same position (a duplicate)."""
SPACING_REL_TOL = 0.05
"""Slice gaps may vary by this fraction of the median gap before the spacing counts as uneven."""
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NAME_TAGS = ("PatientID", "SeriesNumber")
"""DICOM keywords a series is named from."""
NAME_PROBE_FILES = 32
"""How many files (in name order) :func:`series_name` tries before it gives up on a folder without DICOM files."""


def itk_to_ras_affine(origin: tuple[float, ...], spacing: tuple[float, ...], direction: tuple[float, ...]) \
        -> np.ndarray:
    """RAS affine (nibabel) of an ITK image's ``(i, j, k)`` index grid from its LPS origin/spacing/direction."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, float))
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ lps


def _itk_reason(exc: BaseException) -> str:
    """The last non-empty line of an ITK/GDCM exception (its first lines are source paths), for a one-line error."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _sitk():  # type: ignore[no-untyped-def]
    import SimpleITK as sitk

    return sitk


def choose_series(folder: Path) -> tuple[str, list[str]]:
    """The series UID and sorted file names of the series with most slices in ``folder``."""
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    try:
        series_ids = list(reader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise InputError(f"{folder}: cannot list DICOM series ({_itk_reason(exc)}); check the folder's files — "
                         f"a file may be corrupt or not a CT slice") from None
    if not series_ids:
        contents = "empty" if not any(folder.iterdir()) else "holds no DICOM series"
        raise InputError(f"{folder}: the folder is {contents}; give a .nii/.nii.gz file or a folder of DICOM "
                         f"slices of one CT series")
    files = {sid: list(reader.GetGDCMSeriesFileNames(str(folder), sid)) for sid in series_ids}
    chosen = max(series_ids, key=lambda sid: (len(files[sid]), sid))
    if len(series_ids) > 1:
        others = ", ".join(f"{sid} ({len(files[sid])} slices)" for sid in series_ids if sid != chosen)
        log.warning("%s: %d DICOM series; using %s (%d slices), the one with most slices; also found: %s",
                    folder, len(series_ids), chosen, len(files[chosen]), others)
    return chosen, files[chosen]


def series_name(folder: str | Path) -> str:
    """The name of the DICOM series in ``folder``: ``PatientID_seriesN`` (PatientID and SeriesNumber of the first
    DICOM file in name order), made safe as a file name by :func:`covidseg.io.formats.safe_file_name`.

    The folder's own name stands in for a missing PatientID, and is the whole name when no file of the first
    :data:`NAME_PROBE_FILES` is DICOM. Reads two tags of one file, so a cohort of series is named in milliseconds.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        files = []
    for path in files[:NAME_PROBE_FILES]:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(NAME_TAGS))
        except (InvalidDicomError, OSError, ValueError, TypeError, EOFError, AttributeError, KeyError):
            continue
        patient = str(header.get("PatientID", "") or "").strip()
        series = str(header.get("SeriesNumber", "") or "").strip()
        parts = [patient or folder.name] + ([f"series{series}"] if series else [])
        return safe_file_name("_".join(parts), fallback=safe_file_name(folder.name))
    return safe_file_name(folder.name)


def _numbers(text: str, count: int, name: str, what: str) -> list[float]:
    """Parse a DICOM multi-valued decimal string (``a\\b\\c``) of ``count`` finite numbers, or InputError."""
    try:
        values = [float(v) for v in text.split("\\")]
    except ValueError:
        values = []
    if len(values) != count or not np.all(np.isfinite(values)):
        raise InputError(f"{name}: {what} is {text.strip()!r}, expected {count} numbers; the file is corrupt — "
                         f"re-export the series")
    return values


def _slice_geometry(files: list[str], folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Positions (N, 3) and orientation (6,) of every slice, and the in-plane size (columns, rows)."""
    sitk = _sitk()
    positions = []
    orientation = None
    size: tuple[int, int] = (0, 0)
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(f"{name}: not a readable DICOM file ({_itk_reason(exc)}); remove it "
                             f"from {folder} or re-export the series") from None
        if not reader.HasMetaDataKey(TAG_POSITION) or not reader.HasMetaDataKey(TAG_ORIENTATION):
            raise InputError(f"{name}: no Image Position/Orientation (Patient) tags; this is not a CT slice "
                             f"that can be stacked — re-export the series from the scanner or PACS")
        positions.append(_numbers(reader.GetMetaData(TAG_POSITION), 3, name, "Image Position (Patient)"))
        cosines = np.array(_numbers(reader.GetMetaData(TAG_ORIENTATION), 6, name, "Image Orientation (Patient)"))
        if orientation is None:
            orientation = cosines
            size = (int(reader.GetSize()[0]), int(reader.GetSize()[1]))
        elif not np.allclose(orientation, cosines, atol=1e-4):
            raise InputError(f"{name}: slice orientation {cosines.tolist()} differs from the series' "
                             f"{orientation.tolist()}; the series mixes acquisitions — export one series per folder")
    assert orientation is not None
    return np.asarray(positions), orientation, size


def check_slice_positions(files: list[str], positions: np.ndarray, orientation: np.ndarray, folder: Path) -> float:
    """Raise InputError for duplicated, missing or unevenly spaced slices; return the slice gap in mm."""
    normal = np.cross(orientation[:3], orientation[3:])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    names = [Path(files[i]).name for i in order]
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps < DUPLICATE_TOL_MM)
    if dup.size:
        i = int(dup[0])
        raise InputError(
            f"{folder}: duplicated slice at position {along[i]:.2f} mm ({names[i]} and {names[i + 1]}; "
            f"{dup.size} duplicate(s) in all); remove the duplicate files (keep one slice per position)"
        )
    step = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - step) > SPACING_REL_TOL * step)
    if uneven.size:
        i = int(uneven[0])
        ratio = gaps[i] / step
        if ratio > 1.5 and abs(ratio - round(ratio)) < SPACING_REL_TOL * round(ratio):
            raise InputError(
                f"{folder}: {int(round(ratio)) - 1} missing slice(s) between {names[i]} ({along[i]:.2f} mm) and "
                f"{names[i + 1]} ({along[i + 1]:.2f} mm), slice gap {step:.3g} mm; copy the complete series "
                f"from the scanner or PACS"
            )
        raise InputError(
            f"{folder}: uneven slice spacing (gaps from {gaps.min():.3g} to {gaps.max():.3g} mm, e.g. "
            f"{gaps[i]:.3g} mm between {names[i]} and {names[i + 1]}); resample the series to even spacing "
            f"(e.g. convert it with dcm2niix or 3D Slicer) and pass the NIfTI file"
        )
    return step


def read_dicom_series(folder: str | Path) -> CTImage:
    """Read the largest DICOM series in ``folder`` as a :class:`CTImage` (HU after Rescale Slope/Intercept).

    Raises:
        InputError: no series, unreadable files, a single slice, duplicated/missing slices, uneven spacing,
            or more voxels than the guard allows.
    """
    sitk = _sitk()
    folder = Path(folder)
    _uid, files = choose_series(folder)
    if len(files) < 2:
        raise InputError(f"{folder}: the DICOM series has a single slice (a 2D image); covidseg segments 3D CT "
                         f"volumes — give the folder with the whole series")
    positions, orientation, (cols, rows) = _slice_geometry(files, folder)
    check_voxel_count((cols, rows, len(files)), folder)
    check_slice_positions(files, positions, orientation, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: the DICOM series cannot be read ({_itk_reason(exc)}); "
                         f"a file is corrupt or truncated — re-export the series") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{folder}: the series holds colour (multi-component) pixels; give a grey-level CT")
    array_zyx = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    affine = itk_to_ras_affine(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return make_ct_image(array_zyx.transpose(2, 1, 0), affine, folder, header=None, source="dicom")
