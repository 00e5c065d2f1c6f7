"""The evaluation grid, and putting masks stored on other grids onto it without resampling.

Every mask is scored on one voxel grid: the canonical ``(D, H, W)`` grid of a :class:`~covidseg.io.image.CTImage`
(docs/architecture.md), read by :func:`covidseg.io.image.read_image` from the CT series (``--ct``) or taken from
the prediction's NIfTI header. Positions are compared in DICOM patient coordinates (LPS, mm): the canonical
affine (RAS, as nibabel gives it) is flipped to LPS once, in :attr:`Grid.lps_affine`.

A mask stored on another voxel grid (its axes permuted or flipped, or a crop of the grid) is put onto the grid by
highdicom's ``Volume.match_geometry`` (permute, flip, pad, crop; never resample). A grid that differs in spacing,
rotation or by a fraction of a voxel is refused with :class:`~covidseg.errors.InputError`: nearest-neighbour
resampling would move borders by up to half a voxel, which is what the surface metrics measure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidseg.errors import InputError
from covidseg.io.image import CTImage

log = logging.getLogger("covidseg")

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""RAS (nibabel) <-> LPS (DICOM) coordinates: x and y change sign."""
AXIS_TOL = 1e-3
"""Largest difference (in voxels, and in direction cosines) for two grids' axes and offsets to count as equal."""


@dataclass(frozen=True)
class SeriesInfo:
    """What a DICOM reference must point at to belong to the grid's CT series.

    Attributes:
        folder: the DICOM folder.
        series_uid: Series Instance UID of the series read.
        frame_of_reference_uid: its Frame of Reference UID (``""`` when the files have none).
        sop_uids: SOP Instance UIDs of its slices.
    """

    folder: Path
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: frozenset[str]

    def check(self, path: Path, series_uids: set[str], frame_of_reference_uids: set[str],
              sop_uids: set[str]) -> None:
        """Raise InputError when a SEG/RTSTRUCT at ``path`` references another series than this one."""
        fix = f"give --ct the folder of the CT series it was drawn on (this one holds series {self.series_uid})"
        if series_uids and self.series_uid not in series_uids:
            raise InputError(f"{path}: references series {', '.join(sorted(series_uids))}, not the series in "
                             f"{self.folder}; {fix}")
        if self.frame_of_reference_uid and frame_of_reference_uids and \
                self.frame_of_reference_uid not in frame_of_reference_uids:
            raise InputError(f"{path}: its frame of reference {', '.join(sorted(frame_of_reference_uids))} is not "
                             f"the CT's ({self.frame_of_reference_uid}, {self.folder}); {fix}")
        foreign = sop_uids - self.sop_uids
        if foreign:
            raise InputError(f"{path}: references {len(foreign)} image(s) that are not slices of the series in "
                             f"{self.folder} (e.g. {sorted(foreign)[0]}); {fix}")


@dataclass(frozen=True)
class Grid:
    """The voxel grid masks are scored on.

    Attributes:
        image: canonical volume whose geometry is the grid (its voxels are not used).
        series: the CT series' UIDs when the grid was read from a DICOM folder, else ``None`` (then references
            are checked by geometry only).
    """

    image: CTImage
    series: SeriesInfo | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical ``(D, H, W)`` shape."""
        return self.image.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along ``(D, H, W)`` in mm."""
        return self.image.spacing

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL."""
        return self.image.voxel_volume_ml

    @property
    def lps_affine(self) -> np.ndarray:
        """4x4 affine from canonical ``(d, h, w)`` indices to LPS millimetres (DICOM patient coordinates)."""
        return LPS_FROM_RAS @ self.image.canonical_affine

    def describe(self) -> str:
        """``'134 x 512 x 512 voxels of 3 x 1.07 x 1.07 mm (D x H x W) from PATH'``."""
        spacing = " x ".join(f"{s:.3g}" for s in self.spacing)
        return f"{' x '.join(map(str, self.shape))} voxels of {spacing} mm (D x H x W) from {self.image.path}"

    def as_dict(self) -> dict[str, object]:
        """JSON-ready description (shape, spacing in mm, LPS affine, source, series UID)."""
        return {"shape_dhw": list(self.shape), "spacing_mm_dhw": [float(s) for s in self.spacing],
                "lps_affine": np.round(self.lps_affine, 6).tolist(), "source": str(self.image.path),
                "series_uid": self.series.series_uid if self.series else None}


def _axis_mismatch(transform: np.ndarray) -> str | None:
    """Why ``transform`` (source indices -> grid indices) is not a signed permutation plus whole-voxel shift."""
    rot = transform[:3, :3]
    rounded = np.rint(rot)
    if np.abs(rot - rounded).max() > AXIS_TOL or not np.array_equal(np.abs(rounded).sum(axis=0), np.ones(3)) \
            or not np.array_equal(np.abs(rounded).sum(axis=1), np.ones(3)):
        return "its voxel size or axis directions differ"
    shift = transform[:3, 3]
    if np.abs(shift - np.rint(shift)).max() > AXIS_TOL:
        return f"it is shifted by a fraction of a voxel ({np.round(shift - np.rint(shift), 3).tolist()} voxels)"
    return None


def onto_grid(array: np.ndarray, lps_affine: np.ndarray, grid: Grid, path: Path, what: str) -> np.ndarray:
    """Put a mask stored on another voxel grid onto ``grid`` (permute, flip, pad, crop; no resampling).

    Args:
        array: ``(n0, n1, n2)`` mask.
        lps_affine: 4x4 affine from ``array``'s indices to LPS mm.
        grid: the evaluation grid.
        path: the file the mask came from (for messages).
        what: what the mask is (for messages), e.g. ``"segment 1 'Left lung'"``.

    Returns:
        The mask as canonical ``(D, H, W)``, zero where it held no voxel.

    Raises:
        InputError: the grids differ in spacing, rotation or by a fraction of a voxel, or foreground voxels
            fall outside ``grid``.
    """
    import highdicom as hd

    transform = np.linalg.inv(grid.lps_affine) @ np.asarray(lps_affine, dtype=np.float64)
    reason = _axis_mismatch(transform)
    if reason is not None:
        raise InputError(
            f"{path}: {what} is on another voxel grid than {grid.image.path} ({reason}; the grid is "
            f"{grid.describe()}); give masks drawn on the "
            f"same CT, or resample it onto that grid with nearest-neighbour interpolation first (e.g. 3D Slicer's "
            f"'Resample Image (BRAINS)' or SimpleITK.Resample with sitkNearestNeighbor)"
        )
    if np.array_equal(np.rint(transform), np.eye(4)) and tuple(array.shape[:3]) == grid.shape:
        return np.asarray(array)
    try:
        source = hd.Volume(np.asarray(array), np.asarray(lps_affine, dtype=np.float64), coordinate_system="PATIENT")
        target = hd.VolumeGeometry(grid.lps_affine, grid.shape, coordinate_system="PATIENT")
        matched = np.asarray(source.match_geometry(target, tol=AXIS_TOL).array)
    except (ValueError, RuntimeError) as exc:  # a sheared (non-orthogonal) affine on both sides
        raise InputError(f"{path}: {what} cannot be put onto the grid of {grid.image.path} ({exc}); give masks "
                         f"on the CT's own grid (same shape and affine)") from None
    kept, held = int(np.count_nonzero(matched)), int(np.count_nonzero(array))
    if kept != held:
        raise InputError(
            f"{path}: {held - kept} of the {held} voxels of {what} lie outside the grid ({grid.describe()}); "
            f"the mask belongs to another scan or a larger field of view — pair it with "
            f"the CT it was drawn on"
        )
    return matched


def series_info(folder: Path) -> SeriesInfo:
    """UIDs of the DICOM series :func:`covidseg.io.image.read_image` reads from ``folder`` (headers only)."""
    import pydicom

    from covidseg.io.dicom import choose_series

    uid, files = choose_series(folder)
    sop_uids: set[str] = set()
    frames: set[str] = set()
    for name in files:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True,
                                 specific_tags=["SOPInstanceUID", "FrameOfReferenceUID"])
        except (pydicom.errors.InvalidDicomError, OSError, ValueError) as exc:
            raise InputError(f"{name}: not a readable DICOM file ({type(exc).__name__}: {exc}); remove it from "
                             f"{folder} or re-export the series") from None
        sop_uids.add(str(ds.get("SOPInstanceUID", "")))
        frames.add(str(ds.get("FrameOfReferenceUID", "")))
    if len(frames) > 1:
        log.warning("%s: the series' slices carry %d frames of reference; checking references against %s",
                    folder, len(frames), sorted(frames)[0])
    return SeriesInfo(folder=Path(folder), series_uid=str(uid), frame_of_reference_uid=sorted(frames)[0],
                      sop_uids=frozenset(sop_uids - {""}))


def grid_of(image: CTImage) -> Grid:
    """The grid of ``image``; for a DICOM series also its UIDs, so that references to other series are refused."""
    if image.source == "dicom" and Path(image.path).is_dir():
        return Grid(image=image, series=series_info(Path(image.path)))
    return Grid(image=image)


def label_map_image(path: Path) -> CTImage:
    """A NIfTI label map as a canonical uint8 :class:`CTImage` (its voxels and its file's geometry).

    Raises:
        InputError: as :func:`covidseg.io.image.read_mask` (unreadable, non-integer values, ...).
    """
    import dataclasses

    import nibabel as nib

    from covidseg.io.image import orientation_transform, read_mask

    canonical = read_mask(path)
    header_only: Any = nib.load(str(path))  # read_mask has checked the file; this reads its header only
    affine = np.asarray(header_only.affine, dtype=np.float64)
    x, y, z = (int(n) for n in header_only.shape[:3])
    image = CTImage(array=canonical, spacing=(1.0, 1.0, 1.0), affine=affine, original_shape=(x, y, z),
                    path=Path(path), ornt=orientation_transform(affine, path))
    d, h, w = (float(s) for s in np.sqrt((image.canonical_affine[:3, :3] ** 2).sum(axis=0)))
    return dataclasses.replace(image, spacing=(d, h, w))
