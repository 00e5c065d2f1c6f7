"""RTSTRUCT output (``segment --rtstruct``): read back with covidseg's own RTSTRUCT reader, compared with the NIfTI
masks covidseg writes.

The reader (:mod:`covidseg.evaluation.rtstruct`: pydicom, scikit-image's polygon fill of the pixels whose centres
are inside) rasterises each ROI onto the CT's canonical grid; the NIfTI masks are read with nibabel and put onto
that grid through their own affine, never through covidseg's orientation code, so a flipped, transposed or
shifted contour fails. Measured: Dice 1.000000 for every ROI of every case (the real series' expert lungs and
infection blobs; the oblique, reversed-slice and non-square-pixel synthetic series): the contours run on the voxel
edges, so the round trip gives every voxel back. rt-utils' own contours (through the border pixels' centres), on
the same lungs of the real series, give Dice 0.990 per lung, all inside covidseg's: the reference test below.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from covidseg.cli.main import run as cli
from covidseg.errors import EXIT_USER, InputError
from covidseg.evaluation.geometry import Grid, grid_of
from covidseg.evaluation.structures import read_structures
from covidseg.io.dicom_seg import SEGMENTS
from covidseg.io.image import read_image, write_mask
from covidseg.io.rtstruct import RTSTRUCT_FILE, write_rtstruct
from covidseg.io.volume import CTImage
from dicom_series import dciodvfy_clean, write_dicom_series
from real_ct import REAL_CT, load_image, pancreas_reference
from test_dicom_seg import GEOMETRIES, _series

needs_rt_utils = pytest.mark.skipif(importlib.util.find_spec("rt_utils") is None,
                                    reason="rt-utils not installed (pip install 'covidseg[rtstruct]')")

RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
"""RT Structure Set Storage SOP Class UID."""
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
REAL_SERIES = REAL_CT / "pancreas-ct-cb-001" / "dicom"
PLANE_TOL_MM = 1e-3
WINDOW = "8x32x32"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _masks(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Canonical lungs (two blobs, 1 on the left = higher columns, 2 right, a hole in the left one) and an
    infection of random specks (single voxels, voxels touching at a corner) plus a ring."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    lungs = np.zeros(shape, np.uint8)
    lungs[((x - 0.45) / 0.45) ** 2 + (y / 0.8) ** 2 + (z / 0.9) ** 2 < 1] = 1
    lungs[((x + 0.45) / 0.45) ** 2 + (y / 0.8) ** 2 + (z / 0.9) ** 2 < 1] = 2
    k, j = d // 2, h // 2
    i = int(np.median(np.nonzero(lungs[k, j] == 1)[0]))
    assert all(lungs[k, j + dj, i + di] == 1 for dj, di in ((-1, 0), (1, 0), (0, -1), (0, 1)))
    lungs[k, j, i] = 0  # a hole: its own contour, read by exclusive or
    infection = (rng.random(shape) > 0.97) & (lungs > 0)
    infection[k, j - 1:j + 2, w // 4 - 1:w // 4 + 2] = True  # a ring around (j, w // 4)
    infection[k, j, w // 4] = False
    infection[k - 1, 1, 1] = infection[k - 1, 2, 2] = True  # two voxels touching at a corner
    return lungs, infection.astype(np.uint8)


def _on_grid(file_mask: np.ndarray, lps_affine: np.ndarray, grid: Grid) -> np.ndarray:
    """A mask on its file's voxel grid put onto the canonical grid through the affines alone (exact or fails)."""
    idx = np.argwhere(file_mask)
    out = np.zeros(grid.shape, bool)
    if idx.size:
        canonical = (np.linalg.inv(grid.lps_affine) @ lps_affine @ np.c_[idx, np.ones(len(idx))].T)[:3].T
        assert np.abs(canonical - np.rint(canonical)).max() < 1e-3
        out[tuple(np.rint(canonical).astype(int).T)] = True
    return out


def _nifti_expected(folder: Path, grid: Grid) -> list[np.ndarray]:
    """Left lung, right lung, infection of ``lungs.nii.gz`` / ``infection.nii.gz`` on ``grid`` (nibabel only)."""
    lungs, infection = (nib.load(str(folder / name)) for name in ("lungs.nii.gz", "infection.nii.gz"))
    lung_data, infection_data = np.asarray(lungs.dataobj), np.asarray(infection.dataobj)
    return [_on_grid(lung_data == 1, LPS @ lungs.affine, grid), _on_grid(lung_data == 2, LPS @ lungs.affine, grid),
            _on_grid(infection_data > 0, LPS @ infection.affine, grid)]


def check_references(path: Path, image: CTImage) -> pydicom.Dataset:
    """The RTSTRUCT's Frame of Reference, series and instances are the series'; each contour lies in the plane
    of the slice it references."""
    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTSTRUCT" and ds.SOPClassUID == RTSTRUCT_STORAGE
    sources = {str(h.SOPInstanceUID): h for h in (pydicom.dcmread(f, stop_before_pixels=True)
                                                   for f in image.series_files)}
    first = next(iter(sources.values()))
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    (series,) = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == image.series_uid
    assert {str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence} == set(sources)
    assert [r.ROIName for r in ds.StructureSetROISequence] == [s.label for s in SEGMENTS]
    for roi, item, seg in zip(ds.StructureSetROISequence, ds.ROIContourSequence, SEGMENTS, strict=True):
        assert roi.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC" and int(item.ReferencedROINumber) == int(roi.ROINumber)
        assert list(item.ROIDisplayColor) == [int(round(255 * c)) for c in seg.color]
        for contour in item.get("ContourSequence", []):
            source = sources[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            assert contour.ContourGeometricType == "CLOSED_PLANAR" and int(contour.NumberOfContourPoints) == len(points)
            cosines = np.asarray(source.ImageOrientationPatient, float)
            normal = np.cross(cosines[:3], cosines[3:])
            offset = (points - np.asarray(source.ImagePositionPatient, float)) @ normal
            assert np.abs(offset).max() < PLANE_TOL_MM, (roi.ROIName, np.abs(offset).max())
    return ds


def check_rtstruct_against_nifti(path: Path, image: CTImage, folder: Path) -> list[float]:
    """Dice of each ROI, read with covidseg's reader, against the NIfTI masks in ``folder``."""
    grid = grid_of(image)
    kind, structures = read_structures(path, grid)
    assert kind == "RTSTRUCT"
    assert [s.default for s in structures] == ["left_lung", "right_lung", "infection"]
    expected = _nifti_expected(folder, grid)
    got = [s.load() for s in structures]
    dice = [_dice(a, b) for a, b in zip(got, expected, strict=True)]
    assert min(dice) >= 0.99, dice
    for structure, mine, mask in zip(structures, got, expected, strict=True):  # the contours run on voxel edges
        assert np.array_equal(mine, mask), structure.name
    return dice


def _write_case(image: CTImage, lungs: np.ndarray, infection: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_mask(lungs, image, folder / "lungs.nii.gz")
    write_mask(infection, image, folder / "infection.nii.gz")
    result = write_rtstruct(lungs, infection, image, folder / RTSTRUCT_FILE, model="unet-test")
    assert result.path == folder / RTSTRUCT_FILE and not list(folder.glob(".*"))  # atomic: no temporary left
    return result.path


# --------------------------------------------------------------------------------------------- synthetic series


@needs_rt_utils
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_rtstruct_of_a_synthetic_series_equals_the_nifti_masks(tmp_path: Path, name: str) -> None:
    """Oblique slices, slices whose files and Instance Numbers run against their positions, non-square pixels
    (0.9 x 0.55 mm): Dice 1.000000 per ROI."""
    image = _series(tmp_path / "series", name)
    lungs, infection = _masks(image.shape, seed=len(name))
    path = _write_case(image, lungs, infection, tmp_path / "out")
    ds = check_references(path, image)
    assert all(len(item.ContourSequence) > 0 for item in ds.ROIContourSequence)
    assert check_rtstruct_against_nifti(path, image, tmp_path / "out") == [1.0, 1.0, 1.0]


@needs_rt_utils
def test_empty_infection_is_described_without_contours_and_the_file_is_valid(tmp_path: Path) -> None:
    image = _series(tmp_path / "series", "oblique")
    lungs, _ = _masks(image.shape, seed=0)
    path = _write_case(image, lungs, np.zeros_like(lungs), tmp_path / "out")
    ds = check_references(path, image)
    assert "ContourSequence" not in ds.ROIContourSequence[2] and len(ds.ROIContourSequence[0].ContourSequence) > 0
    assert ds.RTROIObservationsSequence[2].ROIObservationLabel == "Infection"
    check_rtstruct_against_nifti(path, image, tmp_path / "out")
    assert ds.Manufacturer == "covidseg" and ds.ManufacturerModelName == "unet-test" and int(ds.SeriesNumber) == 902
    dciodvfy_clean("RTStructureSet", path)


@needs_rt_utils
def test_a_series_without_frame_of_reference_is_refused(tmp_path: Path) -> None:
    volume = np.zeros((4, 8, 8), np.int16)
    write_dicom_series(tmp_path / "series", volume, frame_uid=None)
    image = read_image(tmp_path / "series")
    with pytest.raises(InputError, match="Frame of Reference"):
        write_rtstruct(np.ones(image.shape, np.uint8), np.zeros(image.shape, np.uint8), image,
                       tmp_path / RTSTRUCT_FILE, model="m")
    assert not list(tmp_path.glob("*.dcm")) and not list(tmp_path.glob(".*"))


@needs_rt_utils
def test_rt_utils_own_placement_is_off_on_non_square_pixels(tmp_path: Path) -> None:
    """Why covidseg places the points itself (docs/interop.md): rt-utils' pixel-to-patient matrix scales the row
    direction by the row spacing; on square pixels it is the series' geometry, on 0.9 x 0.55 mm pixels it is not."""
    from rt_utils import image_helper

    from covidseg.io.rtstruct import file_lps_affine

    for name, square in (("oblique", True), ("non_square_pixels", False)):
        image = _series(tmp_path / name, name)
        headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in image.series_files),
                         key=image_helper.get_slice_position)
        placed = np.asarray(image_helper.get_pixel_to_patient_transformation_matrix(headers), float)
        truth = file_lps_affine(image)[:3, :2]  # the grid's column and row steps (mm per pixel)
        assert np.allclose(placed[:3, :2], truth, atol=1e-4) == square, name


# --------------------------------------------------------------------------------------------- the real series


@pytest.fixture(scope="module")
def real_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[CTImage, Path]:
    """The real series, its expert lungs and six ellipsoids inside them as infection, written as NIfTI and
    RTSTRUCT."""
    if not REAL_SERIES.is_dir():
        pytest.skip(f"real series not found at {REAL_SERIES.resolve()} (a clone without ../shared)")
    image = load_image("pancreas-ct-cb-001")
    lungs = pancreas_reference()
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij", sparse=True)
    infection = np.zeros(image.shape, bool)
    for d, h, w in np.argwhere(lungs > 0)[rng.choice(int((lungs > 0).sum()), 6)]:
        infection |= ((zz - d) / 6.0) ** 2 + ((yy - h) / 25.0) ** 2 + ((xx - w) / 20.0) ** 2 < 1
    infection &= lungs > 0
    folder = tmp_path_factory.mktemp("real_rt")
    _write_case(image, lungs, infection.astype(np.uint8), folder)
    return image, folder


@needs_rt_utils
def test_rtstruct_of_the_real_series_equals_the_nifti_masks(real_case: tuple[CTImage, Path]) -> None:
    """pancreas-ct-cb-001 (134 slices of 512 x 512, 1.07 mm pixels): Dice 1.000000 per ROI."""
    image, folder = real_case
    check_references(folder / RTSTRUCT_FILE, image)
    assert check_rtstruct_against_nifti(folder / RTSTRUCT_FILE, image, folder) == [1.0, 1.0, 1.0]


def _polygon_volume_ml(item: pydicom.Dataset, orientation: np.ndarray, gap_mm: float) -> float:
    """An ROI's volume as an RT system computes it: the contours' areas (shoelace; holes wind the other way, so
    they subtract) times the slice gap."""
    total = 0.0
    for contour in item.get("ContourSequence", []):
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        u, v = points @ orientation[:3], points @ orientation[3:]
        total += 0.5 * float(np.sum(u * np.roll(v, -1) - np.roll(u, -1) * v))
    return abs(total) * gap_mm / 1000.0


@needs_rt_utils
def test_contour_areas_give_the_voxel_volumes_of_the_real_series(real_case: tuple[CTImage, Path]) -> None:
    """Polygon areas x slice gap against voxel counts x voxel volume: 1435.78 / 1435.85 mL (left lung), 1442.16 /
    1442.23 mL (right), a ratio of 0.99995 (marching squares cuts 1/8 pixel off each convex corner and adds it at
    each concave one)."""
    image, folder = real_case
    ds = pydicom.dcmread(folder / RTSTRUCT_FILE)
    orientation = np.asarray(pydicom.dcmread(image.series_files[0], stop_before_pixels=True).ImageOrientationPatient,
                             float)
    expected = _nifti_expected(folder, grid_of(image))
    for item, mask in zip(ds.ROIContourSequence, expected, strict=True):
        voxels_ml = float(mask.sum()) * image.voxel_volume_ml
        assert voxels_ml > 1.0
        assert abs(_polygon_volume_ml(item, orientation, image.spacing[0]) / voxels_ml - 1.0) < 1e-3


@needs_rt_utils
def test_rtstruct_of_the_real_series_passes_dciodvfy(real_case: tuple[CTImage, Path]) -> None:
    dciodvfy_clean("RTStructureSet", real_case[1] / RTSTRUCT_FILE)


@needs_rt_utils
@pytest.mark.filterwarnings("ignore:'FileDataset.is_:DeprecationWarning")  # rt-utils on pydicom 3
def test_rt_utils_own_contours_lie_inside_ours_half_a_pixel_short(real_case: tuple[CTImage, Path]) -> None:
    """The library as the reference: rt-utils' ``add_roi`` (OpenCV contours through the border pixels' centres)
    on the same masks, given in rt-utils' slice order as the test finds it (each slice's Image Position against
    the NIfTI affine), lands inside covidseg's ROIs, missing part of their border: Dice 0.9903 left, 0.9896 right
    (about 2 % of each lung's voxels missed; which border pixels a fill keeps depends on rounding, since their
    centres lie on the polygon)."""
    from rt_utils import ds_helper, image_helper
    from rt_utils.rtstruct import RTStruct

    image, folder = real_case
    headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in image.series_files),
                     key=image_helper.get_slice_position)
    nifti = nib.load(str(folder / "lungs.nii.gz"))
    data, to_voxel = np.asarray(nifti.dataobj), np.linalg.inv(LPS @ nifti.affine)
    slices = [int(np.rint((to_voxel @ [*map(float, h.ImagePositionPatient), 1.0])[2])) for h in headers]
    rt = RTStruct(headers, ds_helper.create_rtstruct_dataset(headers))
    for value, label in ((1, "Left lung"), (2, "Right lung")):
        rt.add_roi(mask=np.ascontiguousarray((data == value).transpose(1, 0, 2)[:, :, slices]), name=label)
    rt.ds.save_as(str(folder / "rt_utils.dcm"), enforce_file_format=True)
    grid = grid_of(image)
    ours = [s.load() for s in read_structures(folder / RTSTRUCT_FILE, grid)[1][:2]]
    theirs = [s.load() for s in read_structures(folder / "rt_utils.dcm", grid)[1]]
    for mine, reference in zip(ours, theirs, strict=True):
        assert reference.sum() > 100_000 and not (reference & ~mine).any()
        assert 0.98 < _dice(reference, mine) < 0.995, _dice(reference, mine)


# --------------------------------------------------------------------------------------------- `segment --rtstruct`


def _phantom_series(folder: Path, image: sitk.Image, **kw: object) -> None:
    write_dicom_series(folder, sitk.GetArrayFromImage(image), image.GetOrigin(), image.GetSpacing(),
                       image.GetDirection(), series_uid="1.2.826.0.1.3680043.2.1125.601", patient_id="P8",
                       series_number=6, **kw)  # type: ignore[arg-type]


def _segment(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        cli(["segment", *args, "--set", f"inference.window={WINDOW}", "--set", "runtime.bf16=off"])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _assert_refused(code: int, err: str, out_dir: Path, *needles: str) -> None:
    """Exit 2, one line naming the problem and the fix, no traceback, no output folder."""
    assert code == EXIT_USER, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out_dir.exists() and not list(out_dir.parent.glob(f".{out_dir.name}.partial-*"))


@needs_rt_utils
def test_segment_with_rtstruct_writes_it_and_the_report_says_so(tmp_path: Path, tiny_ckpt: Path, phantom_sitk: sitk.Image,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _phantom_series(tmp_path / "DICOM", phantom_sitk)
    code, out, err = _segment([str(tmp_path / "DICOM"), "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_ckpt),
                               "--rtstruct"], capsys)
    assert code == 0, err
    assert "ROI mask is empty" not in out and len(out.splitlines()) == 1  # stdout holds the result line only
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    entry = report["rtstruct"]
    assert entry["file"] == RTSTRUCT_FILE and entry["series_instance_uid"] == "1.2.826.0.1.3680043.2.1125.601"
    assert entry["empty_rois"] == [] and min(entry["contours"].values()) > 0
    assert report["dicom_seg"]["file"] == "segmentation.dcm"
    image = read_image(tmp_path / "DICOM")
    check_references(tmp_path / "out" / RTSTRUCT_FILE, image)
    check_rtstruct_against_nifti(tmp_path / "out" / RTSTRUCT_FILE, image, tmp_path / "out")


@needs_rt_utils
def test_segment_without_frame_of_reference_keeps_the_other_outputs(tmp_path: Path, tiny_ckpt: Path,
                                                                     phantom_sitk: sitk.Image,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _phantom_series(tmp_path / "DICOM", phantom_sitk, frame_uid=None)
    code, _, err = _segment([str(tmp_path / "DICOM"), "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_ckpt),
                             "--rtstruct"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["rtstruct"]["file"] is None and "Frame of Reference" in report["rtstruct"]["reason"]
    assert (tmp_path / "out" / "lungs.nii.gz").is_file() and not (tmp_path / "out" / RTSTRUCT_FILE).exists()


def test_rtstruct_without_rt_utils_exits_2_before_any_work(tmp_path: Path, phantom_sitk: sitk.Image,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _phantom_series(tmp_path / "DICOM", phantom_sitk)
    monkeypatch.setitem(sys.modules, "rt_utils", None)  # ``import rt_utils`` raises ImportError
    missing = tmp_path / "no-such-checkpoint.pt"  # refused before the model would be looked for
    code, _, err = _segment([str(tmp_path / "DICOM"), "-o", str(tmp_path / "out"), "--checkpoint", str(missing),
                             "--rtstruct"], capsys)
    _assert_refused(code, err, tmp_path / "out", "rt-utils", "pip install 'covidseg[rtstruct]'")


@needs_rt_utils
def test_rtstruct_of_a_nifti_input_exits_2_before_any_work(tmp_path: Path, phantom_sitk: sitk.Image,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    sitk.WriteImage(phantom_sitk, str(tmp_path / "ct.nii.gz"))
    missing = tmp_path / "no-such-checkpoint.pt"
    code, _, err = _segment([str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "out"), "--checkpoint",
                             str(missing), "--rtstruct"], capsys)
    _assert_refused(code, err, tmp_path / "out", "ct.nii.gz", "DICOM series only", "leave out --rtstruct")
