"""NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) CTs and masks, read and written with SimpleITK.

SimpleITK gives each image its LPS origin, spacing and direction; :func:`covidseg.io.dicom.itk_to_ras_affine`
turns them into the RAS affine nibabel would give the same volume, so an NRRD or MetaImage CT reads to the same
canonical voxels and geometry as its NIfTI twin (:func:`covidseg.io.volume.make_ct_image`), with the same checks:
2D or 4D images, several components per voxel, too many voxels, a non-finite or degenerate geometry each raise
:class:`~covidseg.errors.InputError`. :func:`write_itk_mask` writes a canonical mask back in the input's own
format and voxel grid (origin, spacing and direction of the input; gzip/zlib compressed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from covidseg.errors import InputError
from covidseg.io.atomic import atomic_path
from covidseg.io.dicom import LPS_TO_RAS, itk_to_ras_affine
from covidseg.io.formats import DETACHED_SUFFIXES, image_suffix, is_itk_image
from covidseg.io.volume import CTImage, check_voxel_count, make_ct_image, squeeze_to_3d

SCALAR_KINDS = "biuf"
"""numpy kinds of grey-level voxels (bool, signed, unsigned, float)."""


def _sitk() -> Any:
    import SimpleITK as sitk

    return sitk


def _reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _information(path: Path) -> Any:
    """An ``ImageFileReader`` that has read the header of ``path`` (no voxels yet)."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable NRRD/MetaImage file ({_reason(exc)}); re-download or re-export "
                         f"it") from None
    return reader


def read_itk_image(path: str | Path) -> CTImage:
    """Read an NRRD or MetaImage CT into a :class:`~covidseg.io.volume.CTImage` (the file's own values).

    Raises:
        InputError: unreadable, truncated or corrupt file; 2D or 4D image; colour or vector voxels; more voxels
            than the guard allows; a degenerate geometry.
    """
    sitk = _sitk()
    path = Path(path)
    reader = _information(path)
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{path}: {reader.GetNumberOfComponents()} components per voxel (a colour or vector "
                         f"image); give a grey-level CT")
    size = tuple(int(s) for s in reader.GetSize())
    shape3 = squeeze_to_3d(size, path)
    check_voxel_count(shape3, path)
    try:
        image = reader.Execute()
    except (RuntimeError, MemoryError) as exc:
        raise InputError(f"{path}: the voxels cannot be read ({_reason(exc)}); the file (or its data file) is "
                         f"truncated or corrupt — re-download or re-export it") from None
    while image.GetDimension() > 3:  # (X, Y, Z, 1, ...): squeeze_to_3d has checked the extra sizes are 1
        image = image[(slice(None),) * (image.GetDimension() - 1) + (0,)]
    array_zyx = sitk.GetArrayFromImage(image)
    if array_zyx.dtype.kind not in SCALAR_KINDS:
        raise InputError(f"{path}: voxel type {array_zyx.dtype} is not a scalar image; convert it to a grey-level CT")
    affine = itk_to_ras_affine(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return make_ct_image(array_zyx.astype(np.float32).transpose(2, 1, 0), affine, path, header=None, source="itk")


def itk_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """SimpleITK ``(origin, spacing, direction)`` (LPS) of the voxel grid whose RAS affine is ``affine``."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)  # the flip is its own inverse
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    direction = lps[:3, :3] / spacing
    return tuple(lps[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def mask_path(like: CTImage, stem: str, folder: Path) -> Path:
    """``folder/<stem><suffix of like's file>`` (``lungs.nrrd`` for ``CT.nrrd``)."""
    return Path(folder) / f"{stem}{image_suffix(like.path).lower()}"


def write_itk_mask(mask: np.ndarray, like: CTImage, path: str | Path) -> Path:
    """Write a canonical ``(D, H, W)`` mask as uint8 NRRD/MetaImage on ``like``'s exact voxel grid.

    The format follows ``path``'s suffix; ``.nhdr`` and ``.mhd`` get their data file beside them
    (``lungs.raw.gz``, ``lungs.zraw``). Single files are written atomically; a header and its data file are
    written in a temporary folder and moved into place data first, header last.

    Raises:
        ValueError: ``mask`` is not on ``like``'s canonical grid or ``path`` is not an NRRD/MetaImage name.
        InputError: ``path`` is the input itself.
    """
    sitk = _sitk()
    path = Path(path)
    mask = np.asarray(mask)
    if mask.shape != like.shape:
        raise ValueError(f"mask of shape {mask.shape} does not match the canonical CT shape {like.shape}")
    if not is_itk_image(path):
        raise ValueError(f"{path}: not an NRRD or MetaImage name (.nrrd, .nhdr, .mha, .mhd)")
    if path.exists() and like.path.exists() and path.resolve() == like.path.resolve():
        raise InputError(f"{path}: refusing to overwrite the input scan; choose another output path")
    file_array = like.to_original(mask.astype(np.uint8, copy=False))  # (x, y, z)
    image = sitk.GetImageFromArray(np.ascontiguousarray(file_array.transpose(2, 1, 0)))
    origin, spacing, direction = itk_geometry(like.affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    if path.suffix.lower() not in DETACHED_SUFFIXES:
        with atomic_path(path) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        sitk.WriteImage(image, str(work / path.name), useCompression=True)
        header = work / path.name
        for item in sorted(work.iterdir(), key=lambda p: p == header):  # the header last
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
