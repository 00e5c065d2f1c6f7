"""Orientation proven end to end: one CT stored in all 48 signed axis permutations (as NIfTI and as NRRD), and in
a DICOM series of several, segmented by the classical lungs: the masks land on the same world-space voxels.

Each stored copy is the same grid of voxels, reordered and flipped with its affine changed to match (nibabel's
``apply_orientation`` / ``inv_ornt_aff``), so every copy describes the same patient. The check does not use
covidseg's geometry: each written mask is read with SimpleITK and resampled (nearest neighbour, no transform)
onto the grid of the unpermuted copy's mask, then compared per label (Dice >= 0.999; it is 1 when nothing is lost).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nibabel.orientations import apply_orientation, inv_ornt_aff

from covidseg.inference.lungs import classical_lungs
from covidseg.io.dicom_seg import write_dicom_seg
from covidseg.io.image import read_image, write_mask
from covidseg.io.itk import write_itk_mask
from covidseg.phantom import make_phantom
from dicom_series import write_dicom_series
from test_dicom_seg import check_seg_against_nifti

MIN_DICE = 0.999
SCALE = 0.1
"""Phantom scale: 25 slices of 51 x 51 pixels, about 0.05 s of classical lungs per copy."""
SIGNED_PERMUTATIONS = [np.array([[axis, sign] for axis, sign in zip(perm, signs, strict=True)], float)
                       for perm in itertools.permutations(range(3))
                       for signs in itertools.product((1.0, -1.0), repeat=3)]
"""The 48 nibabel ``ornt`` arrays: each file axis to a new axis, kept or flipped."""
DICOM_PERMUTATIONS = (0, 9, 27, 36)
"""The copies also written as DICOM series: axial, coronal-like and sagittal-like slices, flips varying."""


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


@pytest.fixture(scope="module")
def source() -> tuple[np.ndarray, np.ndarray]:
    """The CT's file array (HU, int16) and RAS affine."""
    ph = make_phantom("coronacases", seed=3, scale=SCALE)
    return ph.stored_ct(), ph.affine


def _copy(data: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(apply_orientation(data, ornt)), affine @ inv_ornt_aff(ornt, data.shape)


def _lungs_of(path: Path, out: Path) -> Path:
    """Classical lungs of the CT at ``path``, written in its own geometry (NIfTI, or NRRD for an NRRD input)."""
    image = read_image(path)
    lungs = classical_lungs(image.array, image.spacing)
    if out.name.endswith(".nrrd"):
        return write_itk_mask(lungs, image, out)
    return write_mask(lungs, image, out)


def _compare(reference: sitk.Image, path: Path, what: str) -> None:
    moved = sitk.Resample(sitk.ReadImage(str(path)), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    ref, got = sitk.GetArrayFromImage(reference), sitk.GetArrayFromImage(moved)
    for label in (1, 2):
        assert (ref == label).sum() > 500, "the reference must hold both lungs"
        dice = _dice(ref == label, got == label)
        assert dice >= MIN_DICE, f"{what}: label {label} Dice {dice:.5f}"


@pytest.mark.parametrize("kind", ["nifti", "nrrd"])
def test_all_48_axis_orders_give_the_same_lungs_in_world_space(tmp_path: Path, source: tuple, kind: str) -> None:
    data, affine = source
    reference = None
    for n, ornt in enumerate(SIGNED_PERMUTATIONS):
        array, moved_affine = _copy(data, affine, ornt)
        nifti = tmp_path / f"ct_{n:02d}.nii.gz"
        nib.save(nib.Nifti1Image(array, moved_affine), str(nifti))
        path = nifti
        if kind == "nrrd":
            path = tmp_path / f"ct_{n:02d}.nrrd"
            sitk.WriteImage(sitk.ReadImage(str(nifti)), str(path))
            nifti.unlink()
        mask = _lungs_of(path, tmp_path / f"lungs_{n:02d}.{'nrrd' if kind == 'nrrd' else 'nii.gz'}")
        if reference is None:
            reference = sitk.ReadImage(str(mask))
            continue
        _compare(reference, mask, f"{kind} permutation {ornt[:, 0].astype(int).tolist()} "
                                  f"flips {ornt[:, 1].astype(int).tolist()}")


def test_dicom_series_in_four_axis_orders_give_the_same_lungs_and_seg(tmp_path: Path, source: tuple) -> None:
    data, affine = source
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "ct.nii.gz"))
    reference = sitk.ReadImage(str(_lungs_of(tmp_path / "ct.nii.gz", tmp_path / "reference.nii.gz")))
    for n in DICOM_PERMUTATIONS:
        array, moved_affine = _copy(data, affine, SIGNED_PERMUTATIONS[n])
        nib.save(nib.Nifti1Image(array, moved_affine), str(tmp_path / f"ct_{n:02d}.nii.gz"))
        itk = sitk.ReadImage(str(tmp_path / f"ct_{n:02d}.nii.gz"))
        folder = tmp_path / f"dicom_{n:02d}"
        write_dicom_series(folder, sitk.GetArrayFromImage(itk), itk.GetOrigin(), itk.GetSpacing(),
                           itk.GetDirection(), series_uid=f"1.2.826.0.1.3680043.2.1125.7{n:02d}")
        image = read_image(folder)
        lungs = classical_lungs(image.array, image.spacing)
        infection = ((lungs > 0) & (image.array > -700)).astype(np.uint8)
        write_mask(lungs, image, tmp_path / f"lungs_{n:02d}.nii.gz")
        write_mask(infection, image, tmp_path / f"infection_{n:02d}.nii.gz")
        _compare(reference, tmp_path / f"lungs_{n:02d}.nii.gz", f"DICOM permutation {n}")
        seg = write_dicom_seg(lungs, infection, image, tmp_path / f"seg_{n:02d}.dcm", model="classical")
        check_seg_against_nifti(seg, image, tmp_path / f"lungs_{n:02d}.nii.gz", tmp_path / f"infection_{n:02d}.nii.gz")
