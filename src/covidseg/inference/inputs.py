"""What ``segment`` was given: the cases behind an input path, and the name of each case.

An input is an image file (NIfTI, NRRD, MetaImage), a DICOM folder (one series), a folder of them, or a text
file listing them (:func:`find_inputs`). A case is named after its file without the image suffix (``case_001.nii.gz`` ->
``case_001``), or, for a DICOM series, after its metadata (PatientID and SeriesNumber,
:func:`covidseg.io.dicom.series_name`), since the folders a PACS exports are often all called ``DICOM``
(:func:`case_name`).
"""

from __future__ import annotations

from pathlib import Path

from covidseg.errors import InputError
from covidseg.io.dicom import series_name
from covidseg.io.formats import is_dicom_file_name, is_image_file_name, strip_image_suffix

DICOM_PREAMBLE = b"DICM"
"""The four bytes at offset 128 of a DICOM file."""


def case_name(path: Path | str, series: str | None = None) -> str:
    """``case_001.nii.gz`` -> ``case_001``; a DICOM folder -> ``PatientID_seriesN`` from its metadata (the
    folder's name where the files do not say; ``series``: of that Series Instance UID)."""
    path = Path(path)
    if path.is_dir():
        return series_name(path, series)
    return strip_image_suffix(path.name)


def _is_image_file(path: Path) -> bool:
    return path.is_file() and is_image_file_name(path.name)


def _read_list(path: Path) -> list[Path]:
    """The inputs a text file lists, one a line (``#`` starts a comment; relative paths from the list's folder)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if is_dicom_file_name(path) or head[128:132] == DICOM_PREAMBLE:
        raise InputError(f"{path}: a single DICOM file; give the folder that holds the series (all its "
                         "slices) instead")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise InputError(f"{path}: neither a NIfTI file nor a readable text list of inputs ({exc}); give a "
                         ".nii/.nii.gz file, a DICOM folder or a list with one path a line") from None
    if "\x00" in text:
        raise InputError(f"{path}: not an image file (the name must end in .nii, .nii.gz, .nrrd, .nhdr, .mha "
                         "or .mhd) and not a text list of inputs; rename it or give an image file, a DICOM folder "
                         "or a list")
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    items = [Path(ln) if Path(ln).is_absolute() else path.parent / ln for ln in lines if ln]
    if not items:
        raise InputError(f"{path}: the list of inputs is empty; write one NIfTI file or DICOM folder a line")
    return items


def find_inputs(input_path: Path | str) -> tuple[list[Path], bool]:
    """The cases behind ``input_path`` and whether it was a batch (a folder of cases or a list file).

    An image file (NIfTI, NRRD, MetaImage) or a folder holding files but no image files and no sub-folders (a
    DICOM series) is one case; a folder with image files and/or sub-folders is a batch (each image file and each
    sub-folder a case); any other
    file is read as a list, one path a line (``#`` starts a comment; relative paths are relative to the list).

    Raises:
        InputError: missing input, an empty folder or list, a single DICOM file.
    """
    path = Path(input_path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; give a .nii/.nii.gz file, a DICOM folder, a folder of "
                         "them or a text file listing them")
    if path.is_file():
        if is_image_file_name(path.name):
            return [path], False
        return _read_list(path), True
    entries = sorted(path.iterdir())
    niftis = [p for p in entries if _is_image_file(p)]
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    files = [p for p in entries if p.is_file() and not p.name.startswith(".")]
    if not niftis and not folders:
        if not files:
            raise InputError(f"{path}: empty folder; give a NIfTI file, a DICOM folder or a folder of them")
        return [path], False  # a DICOM series
    return niftis + folders, True
