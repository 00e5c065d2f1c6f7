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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
TILT_TOL_DEG = 0.1
"""Slices may drift within their plane by this angle (degrees) against the normal before the series counts as
sheared (tilted gantry); rounding of Image Position (Patient) stays far below it."""
TILT_MIN_SHIFT_MM = 0.05
"""... and by at least this much over the whole stack (mm), so that a short stack's rounding never trips it."""
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SERIES_TAGS = {"modality": "0008|0060", "image_type": "0008|0008", "number": "0020|0011",
               "description": "0008|103e"}
"""What :func:`list_series` reads of each series' first file (GDCM tag keys)."""
LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM"})
"""Image Type values of scout views, never the CT to segment."""
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


@dataclass(frozen=True)
class SeriesEntry:
    """One series of a DICOM folder: its UID, files (sorted by GDCM) and what its first file says."""

    uid: str
    files: list[str]
    modality: str
    image_type: str
    number: str
    description: str

    @property
    def rank(self) -> tuple[int, int, int]:
        """Sort key of the CT to segment: CT before an unknown modality, an original axial image before a
        derived or secondary one before a localizer, then more slices."""
        modality = 2 if self.modality == "CT" else 1 if not self.modality else 0
        kinds = {part.strip() for part in self.image_type.upper().split("\\")}
        image = 0 if kinds & LOCALIZER_TYPES else 2 if "ORIGINAL" in kinds else 1
        return modality, image, len(self.files)

    def line(self) -> str:
        """``UID (CT, ORIGINAL\\PRIMARY\\AXIAL, 134 slices, #201 'desc')`` for logs and errors."""
        extra = f", #{self.number}" if self.number else ""
        extra += f" '{self.description}'" if self.description else ""
        return (f"{self.uid} ({self.modality or 'no modality'}, {self.image_type or 'no image type'}, "
                f"{len(self.files)} slice(s){extra})")


def _first_tags(name: str) -> dict[str, str]:
    """Modality, Image Type, Series Number and Series Description of one file (``""`` when absent)."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    return {key: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
            for key, tag in SERIES_TAGS.items()}


def list_series(folder: Path) -> list[SeriesEntry]:
    """Every series GDCM finds in ``folder``, best CT first (:attr:`SeriesEntry.rank`).

    Raises:
        InputError: the folder cannot be listed, or holds no DICOM series.
    """
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
    entries = []
    for sid in series_ids:
        files = list(reader.GetGDCMSeriesFileNames(str(folder), sid))
        tags = _first_tags(files[0]) if files else {}
        entries.append(SeriesEntry(uid=sid, files=files, modality=tags.get("modality", "").upper(),
                                   image_type=tags.get("image_type", ""), number=tags.get("number", ""),
                                   description=tags.get("description", "")))
    return sorted(entries, key=lambda e: (e.rank, e.uid), reverse=True)


def choose_series(folder: Path, series: str | None = None) -> tuple[str, list[str]]:
    """The series to segment in ``folder``: its UID and its files (sorted along the slice normal).

    ``series`` picks one by its Series Instance UID. Otherwise the CT is chosen by modality (CT), image type
    (ORIGINAL before DERIVED/SECONDARY before LOCALIZER) and slice count (more first); the choice is logged when
    the folder holds several series.

    Raises:
        InputError: no series; ``series`` not in the folder; no CT series; two series that rank equal.
    """
    entries = list_series(folder)
    found = "; ".join(e.line() for e in entries)
    if series is not None:
        match = [e for e in entries if e.uid == series.strip()]
        if not match:
            raise InputError(f"{folder}: no series {series} in this folder; it holds: {found}; give one of these "
                             f"UIDs to --series")
        return match[0].uid, match[0].files
    best = entries[0]
    if best.rank[0] == 0:
        raise InputError(f"{folder}: no CT series in this folder (found: {found}); covidseg segments CT — give "
                         f"the folder of the CT series")
    if len(entries) > 1:
        if entries[1].rank == best.rank:
            raise InputError(f"{folder}: {len(entries)} DICOM series and no single CT to choose (they rank equal "
                             f"by modality, image type and slice count): {found}; pick one with --series UID")
        log.warning("%s: %d DICOM series; using %s (%d slices), chosen by modality, image type and slice count; "
                    "also found: %s; pick another with --series UID", folder, len(entries), best.uid,
                    len(best.files), "; ".join(e.line() for e in entries[1:]))
    return best.uid, best.files


def _name_header(path: Path) -> Any:
    """PatientID, SeriesNumber and SeriesInstanceUID of one file, ``None`` when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[*NAME_TAGS, "SeriesInstanceUID"])
    except (InvalidDicomError, OSError, ValueError, TypeError, EOFError, AttributeError, KeyError):
        return None


def _readable_headers(files: list[Path]) -> list[Any]:
    """The name headers of the first and the last DICOM file of ``files`` (within :data:`NAME_PROBE_FILES`)."""
    first = next((h for h in map(_name_header, files[:NAME_PROBE_FILES]) if h is not None), None)
    if first is None:
        return []
    last = next((h for h in map(_name_header, reversed(files[-NAME_PROBE_FILES:])) if h is not None), first)
    return [first, last]


def series_name(folder: str | Path, series: str | None = None) -> str:
    """The name of the DICOM series in ``folder``: ``PatientID_seriesN`` (PatientID and SeriesNumber), made safe as
    a file name by :func:`covidseg.io.formats.safe_file_name`.

    The tags come from the first DICOM file in name order; when ``series`` is given, or the first and the last
    file belong to different series, from the first file of the series :func:`choose_series` reads. The folder's
    own name stands in for a missing PatientID, and is the whole name when no file of the first
    :data:`NAME_PROBE_FILES` is DICOM. A one-series folder costs two small reads, so a cohort is named in
    milliseconds.
    """
    folder = Path(folder)
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        files = []
    headers = _readable_headers(files)
    if not headers:
        return safe_file_name(folder.name)
    header = headers[0]
    uids = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if series is not None or len(uids) > 1:
        try:
            chosen = _name_header(Path(choose_series(folder, series)[1][0]))
        except InputError:  # reading the folder says why; the name is only a name
            chosen = None
        header = chosen if chosen is not None else header
    patient = str(header.get("PatientID", "") or "").strip()
    number = str(header.get("SeriesNumber", "") or "").strip()
    parts = [patient or folder.name] + ([f"series{number}"] if number else [])
    return safe_file_name("_".join(parts), fallback=safe_file_name(folder.name))


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


def _check_tilt(positions: np.ndarray, normal: np.ndarray, along: np.ndarray, folder: Path) -> None:
    """Refuse slices whose positions drift within the slice plane (a tilted gantry: the stack is sheared)."""
    offsets = positions - positions[0]
    drift = offsets - np.outer(offsets @ normal, normal)  # the part of each offset in the slice plane
    span = float(along[-1] - along[0])
    shift = float(np.linalg.norm(drift[-1]))
    if span > 0 and shift > TILT_MIN_SHIFT_MM and shift / span > np.tan(np.radians(TILT_TOL_DEG)):
        angle = float(np.degrees(np.arctan2(shift, span)))
        raise InputError(
            f"{folder}: the slices are sheared by {angle:.2f} degrees (a tilted gantry: each slice is shifted "
            f"{shift / max(len(along) - 1, 1):.3g} mm in its plane against the one before); covidseg does not "
            f"correct gantry tilt — convert the series with dcm2niix (which corrects it) and pass the NIfTI file"
        )


def check_slice_positions(files: list[str], positions: np.ndarray, orientation: np.ndarray, folder: Path) -> float:
    """Raise InputError for duplicated, missing or unevenly spaced slices and for gantry tilt; return the slice
    gap in mm."""
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
    _check_tilt(positions[order], normal, along, folder)
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


def series_headers(image: CTImage, purpose: str) -> list[Any]:
    """The headers (no pixels) of a series' files, read again with pydicom in the order of
    :attr:`~covidseg.io.volume.CTImage.series_files`.

    Args:
        image: a series read by :func:`read_dicom_series`.
        purpose: what they are read for, for the message (e.g. ``"the DICOM-SEG"``).

    Raises:
        InputError: a file cannot be read any more (moved, changed or truncated while covidseg ran).
    """
    import pydicom

    headers = []
    for path in image.series_files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (OSError, ValueError, pydicom.errors.InvalidDicomError) as exc:
            raise InputError(f"{path}: cannot be read again to reference it in {purpose} ({exc}); keep the "
                             f"series unchanged while covidseg runs") from None
    return headers


def read_dicom_series(folder: str | Path, series: str | None = None) -> CTImage:
    """Read the CT series of ``folder`` (:func:`choose_series`) as a :class:`CTImage` (HU after Rescale
    Slope/Intercept); its ``series_files`` and ``series_uid`` say which files were stacked, in which order.

    Args:
        folder: the DICOM folder.
        series: Series Instance UID of the series to read (``None``: :func:`choose_series` picks the CT).

    Raises:
        InputError: no series or no CT series, an ambiguous choice, unreadable files, a single slice,
            duplicated/missing slices, uneven spacing, gantry tilt, mixed orientations, or more voxels than the
            guard allows.
    """
    sitk = _sitk()
    folder = Path(folder)
    uid, files = choose_series(folder, series)
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
    image_ct = make_ct_image(array_zyx.transpose(2, 1, 0), affine, folder, header=None, source="dicom")
    image_ct.series_files = tuple(Path(f) for f in files)
    image_ct.series_uid = uid
    return image_ct
