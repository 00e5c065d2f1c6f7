"""Reading a prediction or a reference as structures on the evaluation grid, whatever its format.

Formats (the same for PRED and REF):

* a covidseg output folder: ``lungs.nii.gz`` (1 left lung, 2 right lung) and/or ``infection.nii.gz`` (1);
* a NIfTI label map or binary mask (``.nii``, ``.nii.gz``): one structure per non-zero value, named by the value
  (defaults: :func:`~covidseg.evaluation.labels.label_map_defaults`);
* a DICOM-SEG (:mod:`covidseg.evaluation.seg`) or an RTSTRUCT (:mod:`covidseg.evaluation.rtstruct`), any file
  name; they need the CT series' grid: ``--ct DIR``, or the grid of a NIfTI on the other side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from covidseg.errors import InputError
from covidseg.evaluation.geometry import Grid, grid_of, label_map_image, onto_grid
from covidseg.evaluation.labels import COVIDSEG_INFECTION, COVIDSEG_LUNGS, Structure, label_map_defaults
from covidseg.io.image import CTImage, is_nifti, label_values

LUNGS_FILE = "lungs.nii.gz"
INFECTION_FILE = "infection.nii.gz"
FORMATS = "a covidseg output folder, a NIfTI label map (.nii/.nii.gz), a DICOM-SEG or an RTSTRUCT file"
COVIDSEG_NAMES = {LUNGS_FILE: {1: "left lung", 2: "right lung"}, INFECTION_FILE: {1: "infection"}}
"""Structure names of covidseg's own outputs."""


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _label_structures(image: CTImage, grid: Grid, names: dict[int, str] | None = None,
                      defaults: dict[int, str] | None = None) -> list[Structure]:
    """One structure per non-zero value of a canonical label map (on its own grid), put onto ``grid`` lazily."""
    path = Path(image.path)
    values = [v for v in label_values(image.array) if v != 0]
    defaults = defaults if defaults is not None else label_map_defaults(_nifti_stem(path), values)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.canonical_affine
    structures = []
    for value in values:
        name = (names or {}).get(value, str(value))
        what = f"label {value} of {path.name}"

        def load(value: int = value, what: str = what) -> np.ndarray:
            return onto_grid(image.array == value, lps, grid, path, what).astype(bool, copy=False)

        structures.append(Structure(name=name, origin=what, default=defaults.get(value), load=load))
    return structures


def _folder_structures(folder: Path, grid: Grid) -> list[Structure]:
    found = [name for name in (LUNGS_FILE, INFECTION_FILE) if (folder / name).is_file()]
    if not found:
        raise InputError(f"{folder}: a folder with neither {LUNGS_FILE} nor {INFECTION_FILE}; give {FORMATS} "
                         f"(a CT's DICOM folder goes to --ct)")
    structures: list[Structure] = []
    for name in found:
        defaults = COVIDSEG_LUNGS if name == LUNGS_FILE else COVIDSEG_INFECTION
        image = label_map_image(folder / name)
        extra = sorted(set(label_values(image.array)) - {0} - set(defaults))
        if extra:
            raise InputError(f"{folder / name}: labels {extra} are not covidseg's ({sorted(defaults)}); pass the "
                             f"file itself with --map (or --pred-map) VALUE=LABEL")
        found_here = _label_structures(image, grid, COVIDSEG_NAMES[name], defaults)
        present = {s.name for s in found_here}
        for value, label_name in COVIDSEG_NAMES[name].items():
            if label_name not in present:  # an absent label is an empty structure: an empty infection still scores
                found_here.append(Structure(name=label_name, origin=f"label {value} of {name} (empty)",
                                            default=defaults[value], load=lambda: np.zeros(grid.shape, bool)))
        structures += found_here
    return structures


def open_dicom(path: Path) -> Any:
    """Read a DICOM file with pydicom; InputError naming the file when it is not one."""
    import pydicom

    try:
        return pydicom.dcmread(str(path))
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc}); give {FORMATS}, or "
                         f"re-export it") from None


def read_structures(path: str | Path, grid: Grid) -> tuple[str, list[Structure]]:
    """The structures a prediction or reference file holds, on ``grid``.

    Args:
        path: see the module docstring for the formats.
        grid: the evaluation grid (:func:`evaluation_grid`).

    Returns:
        ``(format, structures)`` with format one of ``"covidseg"``, ``"nifti"``, ``"SEG"``, ``"RTSTRUCT"``.

    Raises:
        InputError: missing or unreadable file, an unsupported DICOM object, a reference to another series.
    """
    from covidseg.evaluation.rtstruct import MODALITY as RT_MODALITY
    from covidseg.evaluation.rtstruct import rtstruct_structures
    from covidseg.evaluation.seg import MODALITY as SEG_MODALITY
    from covidseg.evaluation.seg import seg_structures

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; give {FORMATS}")
    if path.is_dir():
        return "covidseg", _folder_structures(path, grid)
    if is_nifti(path):
        return "nifti", _label_structures(label_map_image(path), grid)
    ds = open_dicom(path)
    modality = str(ds.get("Modality", "")).upper()
    if modality == RT_MODALITY:
        return RT_MODALITY, rtstruct_structures(ds, path, grid)
    if modality == SEG_MODALITY:
        return SEG_MODALITY, seg_structures(ds, path, grid)
    hint = " (a CT slice: give the series' folder to --ct)" if modality in ("CT", "MR", "PT") else ""
    raise InputError(f"{path}: a DICOM {modality or 'object without Modality'}{hint}; give {FORMATS}")


def _nifti_source(path: Path) -> Path | None:
    """The NIfTI file whose grid ``path`` stands for (itself, or a covidseg folder's first mask), if any."""
    if path.is_dir():
        for name in (LUNGS_FILE, INFECTION_FILE):
            if (path / name).is_file():
                return path / name
        return None
    return path if is_nifti(path) and path.is_file() else None


def evaluation_grid(pred: str | Path, ref: str | Path, ct: str | Path | None = None) -> Grid:
    """The grid to score on: the CT series of ``ct`` if given, else the prediction's NIfTI, else the reference's.

    Raises:
        InputError: ``ct`` is unreadable, or neither side is a NIfTI and no ``ct`` is given.
    """
    if ct is not None:
        from covidseg.io.image import read_image

        return grid_of(read_image(ct))
    for side in (Path(pred), Path(ref)):
        source = _nifti_source(side)
        if source is not None:
            return grid_of(label_map_image(source))
    for side in (Path(pred), Path(ref)):
        if not side.exists():
            raise InputError(f"{side}: no such file or folder; give {FORMATS}")
    raise InputError(f"{pred} and {ref}: neither is a NIfTI file or covidseg folder, so the CT's grid is unknown; "
                     f"give the CT series they were drawn on with --ct DIR")
