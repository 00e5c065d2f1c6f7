"""DICOM-SEG output: read back with highdicom and with pydicom alone, every voxel equal to the NIfTI masks.

The NIfTI masks are written by covidseg (``write_mask``) and read with nibabel; the SEG frames are mapped onto
them by geometry only (each frame's Image Position (Patient) against the NIfTI affine), never through covidseg's
own slice order, so a flipped, permuted or shifted SEG fails.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from covidseg.io.dicom_seg import SEGMENTS, write_dicom_seg
from covidseg.io.image import read_image, read_mask, write_mask
from covidseg.io.volume import CTImage
from dicom_series import dciodvfy_clean, write_dicom_series
from real_ct import REAL_CT

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
"""Segmentation Storage SOP Class UID."""
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
REAL_SERIES = REAL_CT / "pancreas-ct-cb-001" / "dicom"


def _rotation(a: float, b: float) -> np.ndarray:
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


GEOMETRIES = {
    # name: (direction (row-major 3x3, columns = voxel axes in LPS), spacing (x, y, z) mm)
    "oblique": (tuple(_rotation(0.35, 0.2).ravel()), (0.7, 0.7, 2.0)),
    "reversed_slices": (tuple(np.diag([1.0, 1.0, -1.0]).ravel()), (0.8, 0.8, 2.5)),
    "non_square_pixels": (tuple(np.diag([-1.0, 1.0, 1.0]).ravel()), (0.9, 0.55, 1.5)),
}


def _masks(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Canonical lungs (two blobs, 1 on the left = higher columns, 2 right) and an infection inside them."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    lungs = np.zeros(shape, np.uint8)
    lungs[((x - 0.45) / 0.4) ** 2 + (y / 0.7) ** 2 + (z / 0.8) ** 2 < 1] = 1
    lungs[((x + 0.45) / 0.4) ** 2 + (y / 0.7) ** 2 + (z / 0.8) ** 2 < 1] = 2
    infection = ndimage.binary_dilation(rng.random(shape) > 0.995, iterations=1) & (lungs > 0)
    return lungs, infection.astype(np.uint8)


def _series(folder: Path, name: str) -> CTImage:
    direction, spacing = GEOMETRIES[name]
    volume = np.random.default_rng(1).integers(-1000, 300, size=(9, 14, 11)).astype(np.int16)
    files = write_dicom_series(folder, volume, origin=(-30.5, 12.0, 40.0), spacing=spacing, direction=direction,
                               series_uid=f"1.2.826.0.1.3680043.2.1125.{len(name)}", patient_id="SEG01",
                               series_number=3)
    if name == "reversed_slices":  # file names and Instance Numbers run against the slice positions
        for k, path in enumerate(files):
            ds = pydicom.dcmread(path)
            ds.InstanceNumber = len(files) - k
            ds.save_as(path.with_name(f"r{len(files) - k:03d}.tmp"))
            path.unlink()
        for path in folder.glob("r*.tmp"):
            path.rename(path.with_suffix(".dcm"))
    return read_image(folder)


def _nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), LPS @ img.affine


def _frames_with_pydicom(seg_path: Path) -> dict[int, list[tuple[np.ndarray, np.ndarray, str]]]:
    """segment number -> [(frame (rows, cols) bool, its Image Position (Patient), source SOP UID)]: pydicom only."""
    ds = pydicom.dcmread(seg_path)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    out: dict[int, list[tuple[np.ndarray, np.ndarray, str]]] = {}
    for frame, group in zip(pixels, ds.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float)
        source = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        out.setdefault(number, []).append((frame.astype(bool), position, source))
    return out


def _nifti_slice_of(position: np.ndarray, lps_affine: np.ndarray) -> int:
    """The NIfTI voxel-grid slice k whose voxel (0, 0, k) lies at ``position`` (LPS mm); asserts it is exact."""
    index = np.linalg.solve(lps_affine[:3, :3], position - lps_affine[:3, 3])
    assert np.allclose(index[:2], 0, atol=1e-3) and abs(index[2] - round(index[2])) < 1e-3, index
    return int(round(index[2]))


def _expected(lungs_file: np.ndarray, infection_file: np.ndarray, number: int) -> np.ndarray:
    return (lungs_file == number) if number in (1, 2) else (infection_file > 0)


def check_seg_against_nifti(seg_path: Path, image: CTImage, lungs_path: Path, infection_path: Path) -> None:
    """Every voxel of every segment of the SEG equals the NIfTI masks (pydicom, then highdicom)."""
    import highdicom as hd

    lungs_file, lps_affine = _nifti(lungs_path)
    infection_file, _ = _nifti(infection_path)
    ds = pydicom.dcmread(seg_path)
    assert ds.Modality == "SEG" and ds.SOPClassUID == SEG_STORAGE
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == image.series_uid
    sources = {str(h.SOPInstanceUID): h for h in (pydicom.dcmread(f, stop_before_pixels=True)
                                                   for f in image.series_files)}
    referenced = {str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= set(sources)
    assert ds.FrameOfReferenceUID == pydicom.dcmread(image.series_files[0], stop_before_pixels=True).FrameOfReferenceUID
    frames = _frames_with_pydicom(seg_path)
    assert [int(item.SegmentNumber) for item in ds.SegmentSequence] == [1, 2, 3]
    assert set(frames) <= {1, 2, 3}
    for number in (1, 2, 3):
        expected = _expected(lungs_file, infection_file, number)
        seen = np.zeros(lungs_file.shape, bool)
        for frame, position, source in frames.get(number, []):
            np.testing.assert_allclose(position, np.asarray(sources[source].ImagePositionPatient, float), atol=1e-4)
            k = _nifti_slice_of(position, lps_affine)
            assert np.array_equal(frame, expected[:, :, k].T), (number, k)
            seen[:, :, k] = frame.T
        assert np.array_equal(seen, expected), number  # the omitted frames are empty
    seg = hd.seg.segread(seg_path)
    inverse = np.linalg.inv(lps_affine)
    for number in seg.segment_numbers:
        volume = seg.get_volume(segment_numbers=[number], combine_segments=False)
        idx = np.argwhere(np.asarray(volume.array)[..., 0] > 0)
        expected = _expected(lungs_file, infection_file, number)
        got = np.zeros(expected.shape, bool)
        if idx.size:
            world = volume.affine @ np.c_[idx, np.ones(len(idx))].T
            vox = (inverse @ world)[:3].T
            assert np.abs(vox - np.rint(vox)).max() < 1e-3
            got[tuple(np.rint(vox).astype(int).T)] = True
        assert np.array_equal(got, expected), number


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_seg_of_a_synthetic_series_equals_the_nifti_masks(tmp_path: Path, name: str) -> None:
    image = _series(tmp_path / "series", name)
    lungs, infection = _masks(image.shape, seed=len(name))
    assert infection.any() and (lungs == 1).any() and (lungs == 2).any()
    seg_path = write_dicom_seg(lungs, infection, image, tmp_path / "segmentation.dcm", model="unet-test")
    write_mask(lungs, image, tmp_path / "lungs.nii.gz")
    write_mask(infection, image, tmp_path / "infection.nii.gz")
    check_seg_against_nifti(seg_path, image, tmp_path / "lungs.nii.gz", tmp_path / "infection.nii.gz")


def test_seg_codes_algorithm_and_empty_infection(tmp_path: Path) -> None:
    image = _series(tmp_path / "series", "oblique")
    lungs, _ = _masks(image.shape, seed=0)
    seg_path = write_dicom_seg(lungs, np.zeros_like(lungs), image, tmp_path / "segmentation.dcm", model="m-2d")
    ds = pydicom.dcmread(seg_path)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == [s.label for s in SEGMENTS]
    left, right, infection = ds.SegmentSequence
    for item, side in ((left, "7771000"), (right, "24028007")):
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # Anatomical Structure
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodingSchemeDesignator, kind.CodeValue) == ("SCT", "39607008")  # Lung
        assert kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == side
    assert infection.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert infection.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # Lesion
    assert infection.AnatomicRegionSequence[0].CodeValue == "39607008"
    for item in ds.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC" and item.SegmentAlgorithmName == "covidseg"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "covidseg" and "m-2d" in str(algorithm.AlgorithmParameters)
    assert ds.ManufacturerModelName == "m-2d"
    # the empty infection is still a described segment; it has no frame (all its frames are empty)
    assert 3 not in _frames_with_pydicom(seg_path)
    write_mask(lungs, image, tmp_path / "lungs.nii.gz")
    write_mask(np.zeros_like(lungs), image, tmp_path / "infection.nii.gz")
    check_seg_against_nifti(seg_path, image, tmp_path / "lungs.nii.gz", tmp_path / "infection.nii.gz")
    dciodvfy_clean("Segmentation", seg_path)


@pytest.fixture(scope="module")
def real_seg(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if not REAL_SERIES.is_dir():
        pytest.skip(f"real series not found at {REAL_SERIES.resolve()} (a clone without ../shared)")
    root = tmp_path_factory.mktemp("real_seg")
    image = read_image(REAL_SERIES)
    reference = read_mask(REAL_CT / "pancreas-ct-cb-001" / "reference_labels.nii.gz", like=image)
    lungs = np.zeros(image.shape, np.uint8)
    lungs[reference == 2], lungs[reference == 3] = 1, 2  # the expert LUNG_L, LUNG_R
    infection = ((lungs > 0) & (image.array > -700)).astype(np.uint8)  # dense parts of the lungs: some voxels
    write_mask(lungs, image, root / "lungs.nii.gz")
    write_mask(infection, image, root / "infection.nii.gz")
    seg_path = write_dicom_seg(lungs, infection, image, root / "segmentation.dcm", model="unet-test")
    return {"image": image, "seg": seg_path, "root": root}


def test_seg_of_the_real_series_equals_the_nifti_masks(real_seg: dict[str, object]) -> None:
    root = Path(str(real_seg["root"]))
    assert isinstance(real_seg["image"], CTImage)
    check_seg_against_nifti(Path(str(real_seg["seg"])), real_seg["image"], root / "lungs.nii.gz",
                            root / "infection.nii.gz")


def test_seg_of_the_real_series_passes_dciodvfy(real_seg: dict[str, object]) -> None:
    dciodvfy_clean("Segmentation", Path(str(real_seg["seg"])))
