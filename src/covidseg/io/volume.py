"""The canonical CT volume (:class:`CTImage`), its geometry, and the guard on the size of what is read.

Canonical orientation (docs/architecture.md): the file's voxel grid reoriented to LPS+ (x -> Left,
y -> Posterior, z -> Superior) with nibabel's orientation tools, then transposed to ``(z, y, x)``, so a canonical
array is ``(D, H, W)`` = (slices inferior -> superior, rows anterior -> posterior, columns right -> left) and
``imshow(volume[k])`` shows an axial slice in radiological convention. The reorientation is a pure permutation
and flip of axes (no resampling), so :meth:`CTImage.to_original` inverts it exactly.

Every reader builds its :class:`CTImage` with :func:`make_ct_image` from the file's voxel array and its RAS affine
(:mod:`covidseg.io.image` for NIfTI, :mod:`covidseg.io.dicom` for DICOM series), so all inputs share one geometry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from covidseg.errors import ConfigError, InputError

MAX_VOXELS_DEFAULT = 1_200_000_000
"""Largest scan read by default (voxels; 4.8 GB as float32). Override with ``$COVIDSEG_MAX_VOXELS``."""
MAX_VOXELS_ENV = "COVIDSEG_MAX_VOXELS"
"""Environment variable that raises (or lowers) the voxel-count guard."""
MIN_SLICES = 2
"""A volume with fewer voxels than this along an axis is a 2D image."""
CANONICAL_AXCODES = ("L", "P", "S")
"""Voxel axes of the reoriented grid before the ``(z, y, x)`` transpose."""


def max_voxels() -> int:
    """The voxel-count guard: ``$COVIDSEG_MAX_VOXELS`` if set, else :data:`MAX_VOXELS_DEFAULT`."""
    raw = os.environ.get(MAX_VOXELS_ENV)
    if raw is None or not raw.strip():
        return MAX_VOXELS_DEFAULT
    try:
        value = int(float(raw))
    except ValueError:
        raise ConfigError(f"${MAX_VOXELS_ENV}={raw!r} is not a number; give a voxel count like 1.2e9") from None
    if value <= 0:
        raise ConfigError(f"${MAX_VOXELS_ENV}={raw!r} must be positive; give a voxel count like 1.2e9")
    return value


def check_voxel_count(shape: tuple[int, ...], path: Path) -> None:
    """Refuse a scan larger than :func:`max_voxels` before loading it (instead of being killed for memory)."""
    count = int(np.prod([int(s) for s in shape], dtype=np.int64))
    limit = max_voxels()
    if count > limit:
        raise InputError(
            f"{path}: {'x'.join(map(str, shape))} = {count:.3g} voxels is more than the {limit:.3g} allowed "
            f"(about {4 * count / 1e9:.1f} GB as float32); crop or downsample the scan, or raise the limit with "
            f"{MAX_VOXELS_ENV}=<voxels> on a machine with enough memory"
        )


def squeeze_to_3d(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """Accept ``(X, Y, Z)`` and ``(X, Y, Z, 1, ...)``; refuse 2D, single-slice and 4D images."""
    dims = tuple(int(s) for s in shape)
    if not dims or min(dims) <= 0:
        raise InputError(f"{path}: the header gives the image shape {dims}, with zero or negative sizes; the file "
                         f"is corrupt — re-download or re-export it")
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    if len(dims) > 3:
        raise InputError(
            f"{path}: a {len(dims)}D image of shape {dims} (several volumes); covidseg needs one 3D CT volume — "
            f"extract one, e.g. nibabel's img.slicer[..., 0], and pass that file"
        )
    if len(dims) < 3 or min(dims) < MIN_SLICES:
        raise InputError(
            f"{path}: a 2D image of shape {dims}; covidseg segments 3D CT volumes (NIfTI, NRRD, MetaImage or a "
            f"DICOM series) — give the whole volume (for single 2D slices use `covidseg semiseg`)"
        )
    return dims  # type: ignore[return-value]


@dataclass
class CTImage:
    """A CT volume in canonical ``(D, H, W)`` orientation, with what is needed to map back to the file.

    Attributes:
        array: canonical ``(D, H, W)`` float32 volume holding the file's own values (HU or 0..255).
        spacing: voxel size in mm along ``(D, H, W)``.
        affine: 4x4 RAS affine of the *file's* voxel grid, as nibabel reads it (for DICOM: converted from
            ITK's LPS origin/direction/spacing).
        original_shape: shape of the file's voxel grid (3 dims).
        path: the file or DICOM folder it was read from.
        ornt: nibabel orientation transform from the file's axes to LPS+ axes (see
            ``nibabel.orientations.ornt_transform``).
        header: the NIfTI header of the source (``None`` for DICOM); copied into written masks so that their
            qform/sform match the CT's exactly.
        source: ``"nifti"``, ``"dicom"`` or ``"itk"`` (NRRD and MetaImage, read with SimpleITK).
        series_files: for a DICOM series, its files in the order of the file grid's third axis (file ``k`` is
            slice ``k`` of :meth:`to_original`'s array); what a DICOM-SEG references. Empty otherwise.
        series_uid: for a DICOM series, its Series Instance UID (``""`` otherwise).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    original_shape: tuple[int, int, int]
    path: Path
    ornt: np.ndarray = field(repr=False, default_factory=lambda: np.array([[0, 1], [1, 1], [2, 1]], float))
    header: Any = field(repr=False, default=None)
    source: str = "nifti"
    series_files: tuple[Path, ...] = field(repr=False, default=())
    series_uid: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical ``(D, H, W)`` shape."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (spacing product in mm^3 / 1000)."""
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def canonical_affine(self) -> np.ndarray:
        """4x4 RAS affine mapping canonical ``(d, h, w)`` indices to millimetres."""
        lps_affine = self.affine @ inv_ornt_aff(self.ornt, self.original_shape)
        permute = np.zeros((4, 4))
        permute[0, 2] = permute[1, 1] = permute[2, 0] = permute[3, 3] = 1.0  # (d, h, w) -> (x, y, z) indices
        return lps_affine @ permute

    def from_original(self, file_array: np.ndarray) -> np.ndarray:
        """File voxel order ``(X, Y, Z)`` -> canonical ``(D, H, W)`` (contiguous copy; no resampling)."""
        if tuple(file_array.shape[:3]) != tuple(self.original_shape):
            raise ValueError(f"array of shape {file_array.shape} does not match the file grid {self.original_shape}")
        return to_canonical(file_array, self.ornt)

    def to_original(self, canonical_array: np.ndarray) -> np.ndarray:
        """Canonical ``(..., D, H, W)`` -> the file's voxel order ``(X, Y, Z, ...)`` (leading axes move last).

        A 3D array comes back with exactly :attr:`original_shape`; extra leading axes (channels) are put after
        the spatial ones, as NIfTI stores them.
        """
        if tuple(canonical_array.shape[-3:]) != self.shape:
            raise ValueError(f"array of shape {canonical_array.shape} does not end with the canonical {self.shape}")
        lead = canonical_array.ndim - 3
        # (..., z, y, x) -> (x, y, z, ...): undo the transpose, then the flips/permutation
        lps = np.moveaxis(canonical_array, [lead, lead + 1, lead + 2], [2, 1, 0])
        return apply_orientation(lps, _inverse_transform(self.ornt))


def _inverse_transform(transform: np.ndarray) -> np.ndarray:
    """The ``ornt`` transform undoing ``transform`` (file axis i -> LPS axis ``transform[i, 0]``, flipped if -1)."""
    inverse = np.zeros_like(np.asarray(transform, dtype=float))
    for file_axis, (lps_axis, flip) in enumerate(transform):
        inverse[int(lps_axis)] = (file_axis, flip)
    return inverse


def to_canonical(file_array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """File voxel order ``(X, Y, Z, ...)`` -> canonical ``(D, H, W)`` (or ``(..., D, H, W)``) by the ``ornt``
    ``transform`` of :func:`orientation_transform` (a contiguous copy; no resampling)."""
    lps = apply_orientation(file_array, transform)  # (x=L, y=P, z=S, ...)
    return np.ascontiguousarray(np.moveaxis(lps, [0, 1, 2], [2, 1, 0]) if lps.ndim == 3 else
                                np.moveaxis(lps, [0, 1, 2], [-1, -2, -3]))


def orientation_transform(affine: np.ndarray, path: Path) -> np.ndarray:
    """nibabel ``ornt`` transform from the voxel axes of ``affine`` to LPS+ axes."""
    if not np.all(np.isfinite(affine)):
        raise InputError(
            f"{path}: its affine holds NaN or infinite values ({np.asarray(affine)[:3].tolist()}); fix the "
            f"header's qform/sform (e.g. re-export it from the scanner's DICOM)"
        )
    start = io_orientation(affine)
    if not np.all(np.isfinite(start)):
        raise InputError(
            f"{path}: its affine has no valid orientation (zero or repeated axes: {affine[:3, :3].tolist()}); "
            f"fix the header's qform/sform (e.g. re-export it from the scanner's DICOM)"
        )
    return ornt_transform(start, axcodes2ornt(CANONICAL_AXCODES))


def make_ct_image(file_array: np.ndarray, affine: np.ndarray, path: Path, header: Any = None,
                  source: str = "nifti") -> CTImage:
    """Build a :class:`CTImage` from a 3D array in the file's voxel order and its RAS affine."""
    affine = np.asarray(affine, dtype=np.float64)
    transform = orientation_transform(affine, path)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    lps_spacing = [0.0, 0.0, 0.0]
    for file_axis, (lps_axis, _flip) in enumerate(transform):
        lps_spacing[int(lps_axis)] = float(zooms[file_axis])
    if min(lps_spacing) <= 0:
        raise InputError(f"{path}: voxel spacing {lps_spacing} mm is not positive; fix the header's pixdim/affine")
    canonical = to_canonical(np.asarray(file_array), transform).astype(np.float32, copy=False)
    return CTImage(
        array=canonical,
        spacing=(lps_spacing[2], lps_spacing[1], lps_spacing[0]),
        affine=affine,
        original_shape=tuple(int(s) for s in file_array.shape[:3]),  # type: ignore[arg-type]
        path=Path(path),
        ornt=transform,
        header=header,
        source=source,
    )
