"""Reading CT volumes and label masks, and writing masks back with the input's exact geometry.

:func:`read_image` returns a :class:`~covidseg.io.volume.CTImage` in the canonical ``(D, H, W)`` orientation
(:mod:`covidseg.io.volume`); :func:`write_mask` and :func:`write_volume` map a canonical array back to the file's
own voxel order and affine. Inputs are NIfTI files (``.nii``, ``.nii.gz``, read with nibabel), NRRD and
MetaImage files (SimpleITK, :mod:`covidseg.io.itk`) and DICOM series (a folder, read with SimpleITK, see
:mod:`covidseg.io.dicom`). Every failure a user can cause (missing, truncated or corrupt file,
2D or 4D image, a scan too large for memory, a mask drawn on another grid, unexpected labels) raises
:class:`~covidseg.errors.InputError` with one line naming the file, what was found and the fix.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from covidseg.errors import InputError
from covidseg.io.atomic import atomic_path
from covidseg.io.dicom import read_dicom_series
from covidseg.io.formats import is_dicom_file_name, is_itk_image, is_nifti
from covidseg.io.itk import read_itk_image
from covidseg.io.volume import CTImage, check_voxel_count, make_ct_image, orientation_transform, to_canonical
from covidseg.io.volume import squeeze_to_3d as _squeeze_to_3d

AFFINE_ATOL = 1e-3
"""Tolerance (mm, and mm per voxel for the 3x3 part) when comparing a mask's geometry with its CT's."""
XFORM_SCANNER = 1
"""NIfTI qform/sform code 'scanner' used for volumes that came from DICOM."""


# --------------------------------------------------------------------------------------------- NIfTI


def _load_nifti(path: Path) -> Any:
    """``nib.load`` with every header failure turned into an InputError naming the file."""
    try:
        img = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, OSError, EOFError,
            zlib.error, ValueError, OverflowError, TypeError, IndexError) as exc:
        raise InputError(
            f"{path}: not a readable NIfTI file ({_reason(exc)}); re-download or re-export it"
        ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: expected a NIfTI image, found {type(img).__name__}; convert it to .nii.gz")
    return img


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_nifti_data(img: Any, path: Path, dtype: Any) -> np.ndarray:
    """Decode the voxels (applying scl_slope/inter); truncated or corrupt data -> InputError."""
    try:
        proxy = img.dataobj
        if np.dtype(dtype).kind == "f" and getattr(proxy, "slope", None) == 1 and getattr(proxy, "inter", None) == 0:
            # no scaling: the stored integers cast once (get_fdata gives the same values about 1.5x slower)
            data = np.asanyarray(proxy)
            data = data if data.dtype == dtype else data.astype(dtype)
        elif np.dtype(dtype).kind == "f":
            data = img.get_fdata(dtype=dtype, caching="unchanged")
        else:
            data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, OSError, ValueError, OverflowError, TypeError, MemoryError) as exc:
        if isinstance(exc, MemoryError):
            raise InputError(
                f"{path}: not enough memory to load {'x'.join(map(str, img.shape))} voxels; "
                f"use a machine with more RAM or crop the scan"
            ) from None
        raise InputError(
            f"{path}: the file is truncated or corrupt ({_reason(exc)}); re-download or re-export it"
        ) from None
    if data.dtype.kind not in "biuf":
        raise InputError(f"{path}: voxel type {data.dtype} is not a scalar image; convert it to a grey-level CT")
    return np.asarray(data)


def _read_nifti(path: Path, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray, Any]:
    img = _load_nifti(path)
    shape3 = _squeeze_to_3d(img.shape, path)
    check_voxel_count(shape3, path)
    data = _read_nifti_data(img, path, dtype).reshape(shape3)
    return data, np.asarray(img.affine, dtype=np.float64), img.header.copy()


# --------------------------------------------------------------------------------------------- public API


def read_image(path: str | Path, series: str | None = None) -> CTImage:
    """Read a CT volume: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``,
    ``.mhd``) file, or a folder holding a DICOM series.

    Args:
        path: image file or DICOM folder (several series: :func:`covidseg.io.dicom.choose_series` picks the CT).
        series: the Series Instance UID to read from a DICOM folder (``None``: the chosen one).

    Returns:
        The volume in canonical ``(D, H, W)`` order (float32, the file's own values) with spacing in mm and the
        file's RAS affine.

    Raises:
        InputError: missing, unreadable, truncated or corrupt input; 2D or 4D image; too many voxels; a DICOM
            series with missing or duplicated slices or uneven spacing.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; give a .nii/.nii.gz file or a DICOM folder")
    if path.is_dir():
        return read_dicom_series(path, series=series)
    if is_itk_image(path):
        return read_itk_image(path)
    if not is_nifti(path):
        hint = " (for DICOM give the folder that holds the series)" if is_dicom_file_name(path) else ""
        raise InputError(f"{path}: unsupported file type '{''.join(path.suffixes) or path.name}'; give a .nii, "
                         f".nii.gz, .nrrd, .nhdr, .mha or .mhd file or a DICOM folder{hint}")
    data, affine, header = _read_nifti(path)
    return make_ct_image(data, affine, path, header=header, source="nifti")


def _mask_values(data: np.ndarray, path: Path) -> np.ndarray:
    """Label array as uint8; non-finite, fractional, negative or >255 values -> InputError."""
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise InputError(f"{path}: the mask holds NaN or infinite values; a mask must hold integer labels")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise InputError(f"{path}: the mask holds fractional values (e.g. {data[rounded != data].flat[0]!r}); "
                             f"a mask must hold integer labels — threshold or round it")
        data = rounded
    if data.size and (data.min() < 0 or data.max() > np.iinfo(np.uint8).max):
        raise InputError(f"{path}: mask labels range {data.min()}..{data.max()}, expected 0..255 integer labels; "
                         f"give a label mask (e.g. 0 background, 1 left lung, 2 right lung)")
    return data.astype(np.uint8, copy=False)


def label_values(mask: np.ndarray) -> list[int]:
    """Sorted label values present in a uint8 mask (fast: a bincount)."""
    counts = np.bincount(mask.ravel(), minlength=1)
    return [int(v) for v in np.flatnonzero(counts)]


def read_mask(path: str | Path, like: CTImage | None = None, labels: Collection[int] | None = None) -> np.ndarray:
    """Read a label mask (NIfTI) into canonical ``(D, H, W)`` uint8.

    Args:
        path: ``.nii`` / ``.nii.gz`` mask.
        like: the CT the mask belongs to; its voxel grid (canonical shape and affine, to
            :data:`AFFINE_ATOL`) must be the mask's.
        labels: allowed label values (e.g. ``{0, 1, 2}``); others raise InputError. ``None`` accepts 0..255.

    Raises:
        InputError: unreadable/truncated file, non-integer values, another grid than ``like``, labels outside
            ``labels``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: mask file not found; check the path or the dataset layout")
    if not is_nifti(path):
        raise InputError(f"{path}: unsupported mask type; give a .nii or .nii.gz label mask")
    img = _load_nifti(path)
    shape3 = _squeeze_to_3d(img.shape, path)
    check_voxel_count(shape3, path)
    data = _mask_values(_read_nifti_data(img, path, img.get_data_dtype()).reshape(shape3), path)
    affine = np.asarray(img.affine, dtype=np.float64)
    transform = orientation_transform(affine, path)
    canonical = to_canonical(data, transform)
    if like is not None:
        mask_geometry = CTImage(array=canonical, spacing=(1.0, 1.0, 1.0), affine=affine,
                                original_shape=shape3, path=path, ornt=transform)
        if canonical.shape != like.shape:
            raise InputError(
                f"{path}: mask shape {shape3} (canonical {canonical.shape}) does not match the CT {like.path} "
                f"{like.original_shape} (canonical {like.shape}); pair the mask with the CT it was drawn on, or "
                f"resample it onto the CT grid with nearest-neighbour interpolation"
            )
        diff = np.abs(mask_geometry.canonical_affine - like.canonical_affine)
        if diff.max() > AFFINE_ATOL * max(1.0, float(np.abs(like.affine[:3, 3]).max()) / 100.0):
            raise InputError(
                f"{path}: mask geometry (affine) differs from the CT {like.path} by up to {diff.max():.4g} mm; "
                f"it was drawn on another grid — resample it onto the CT with nearest-neighbour interpolation, "
                f"or copy the CT's header if only the header is wrong"
            )
    if labels is not None:
        found = label_values(canonical)
        extra = sorted(set(found) - set(int(v) for v in labels))
        if extra:
            raise InputError(
                f"{path}: unexpected label values {extra} (found {found}, expected a subset of "
                f"{sorted(int(v) for v in labels)}); check that this is the right kind of mask"
            )
    return canonical


def _output_header(like: CTImage, dtype: Any) -> Any:
    if like.header is not None:
        header = like.header.copy()
    else:
        header = nib.Nifti1Header()
        header.set_qform(like.affine, code=XFORM_SCANNER)
        header.set_sform(like.affine, code=XFORM_SCANNER)
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    return header


def _write_nifti(file_array: np.ndarray, like: CTImage, path: Path, dtype: Any) -> Path:
    path = Path(path)
    if not is_nifti(path):
        raise InputError(f"{path}: output must end in .nii.gz or .nii")
    if path.exists() and like.path.exists() and path.resolve() == like.path.resolve():
        raise InputError(f"{path}: refusing to overwrite the input scan; choose another output path")
    header = _output_header(like, dtype)
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    if like.header is None:
        img = klass(np.asarray(file_array, dtype=dtype), like.affine, header=header)
        img.set_qform(like.affine, code=XFORM_SCANNER)
        img.set_sform(like.affine, code=XFORM_SCANNER)
    else:
        img = klass(np.asarray(file_array, dtype=dtype), like.affine, header=header)
    img.set_data_dtype(dtype)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def write_mask(mask: np.ndarray, like: CTImage, path: str | Path) -> Path:
    """Write a canonical ``(D, H, W)`` label mask as a uint8 NIfTI with exactly ``like``'s shape and affine.

    The CT's own NIfTI header (qform and sform with their codes) is copied, so the mask overlays the CT in
    3D Slicer / ITK-SNAP; for a DICOM input both are set to the converted affine with code 'scanner'.
    Written atomically; refuses to overwrite the input itself.
    """
    mask = np.asarray(mask)
    if mask.shape != like.shape:
        raise ValueError(f"mask of shape {mask.shape} does not match the canonical CT shape {like.shape}")
    if mask.dtype != np.uint8:
        if mask.dtype.kind == "b":
            mask = mask.astype(np.uint8)
        else:
            if mask.size and (mask.min() < 0 or mask.max() > np.iinfo(np.uint8).max):
                raise ValueError(f"mask labels {mask.min()}..{mask.max()} do not fit uint8")
            mask = mask.astype(np.uint8)
    return _write_nifti(like.to_original(mask), like, Path(path), np.uint8)


def write_volume(array: np.ndarray, like: CTImage, path: str | Path, dtype: Any = np.float32) -> Path:
    """Write a canonical ``(D, H, W)`` (or ``(K, D, H, W)``) array as NIfTI on ``like``'s grid (atomic).

    Channels, when given, are stored as the 4th NIfTI axis (``(X, Y, Z, K)``).
    """
    array = np.asarray(array)
    return _write_nifti(like.to_original(array), like, Path(path), np.dtype(dtype))
