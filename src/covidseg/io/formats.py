"""File names of the image formats: which suffixes name what, in one place.

:data:`NIFTI_SUFFIXES` and :data:`ITK_SUFFIXES` are the files :func:`covidseg.io.image.read_image` reads (a
DICOM series is a folder); :data:`IMAGE_SUFFIXES` are every suffix that names a medical image file, dropped to make a case name
(``case_001.nii.gz`` and ``case_001.nrrd`` are both ``case_001``); :data:`DICOM_FILE_SUFFIXES` name single DICOM
slices, which are refused with a hint to give their folder.
"""

from __future__ import annotations

import re
from pathlib import Path

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
"""Suffixes of NIfTI files (compared in lower case), the longer first."""
ITK_SUFFIXES: tuple[str, ...] = (".nrrd", ".nhdr", ".mha", ".mhd")
"""Suffixes of NRRD (``.nrrd``, ``.nhdr`` with a detached data file) and MetaImage (``.mha``, ``.mhd`` with a
detached data file), read and written with SimpleITK (:mod:`covidseg.io.itk`)."""
DETACHED_SUFFIXES: tuple[str, ...] = (".nhdr", ".mhd")
"""Suffixes of headers whose voxels lie in a separate data file."""
IMAGE_SUFFIXES: tuple[str, ...] = (*NIFTI_SUFFIXES, *ITK_SUFFIXES)
"""Suffixes of image files (compared in lower case)."""
DICOM_FILE_SUFFIXES: tuple[str, ...] = (".dcm", ".ima")
"""Suffixes of single DICOM files."""
UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
"""Characters a case name does not keep (each run becomes ``_``): names become folder names on every system."""


def is_nifti(path: Path | str) -> bool:
    """True for ``.nii`` and ``.nii.gz`` names (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_itk_image(path: Path | str) -> bool:
    """True for NRRD and MetaImage names (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``, any case)."""
    return str(path).lower().endswith(ITK_SUFFIXES)


def is_image_file_name(path: Path | str) -> bool:
    """True for every name :func:`covidseg.io.image.read_image` reads as a file (NIfTI, NRRD, MetaImage)."""
    return is_nifti(path) or is_itk_image(path)


def image_suffix(path: Path | str) -> str:
    """The image suffix of ``path`` as written (``.nii.gz``, ``.nrrd``, ...), ``""`` when it has none."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[-len(suffix):]
    return ""


def is_dicom_file_name(path: Path | str) -> bool:
    """True for ``.dcm`` and ``.ima`` names (any case)."""
    return Path(path).suffix.lower() in DICOM_FILE_SUFFIXES


def strip_image_suffix(name: str) -> str:
    """``case_001.nii.gz`` -> ``case_001``: the name without its image suffix (names that are only a suffix, and
    names without one, stay as they are)."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def safe_file_name(text: str, fallback: str = "case") -> str:
    """``text`` as a file name that is safe everywhere: letters, digits, ``.``, ``_`` and ``-`` (each run of other
    characters becomes ``_``), no leading or trailing ``.``/``_``; ``fallback`` when nothing is left."""
    return UNSAFE_NAME_CHARACTERS.sub("_", text).strip("._") or fallback
