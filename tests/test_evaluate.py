"""covidseg.evaluation and `covidseg evaluate`: NIfTI, RTSTRUCT and DICOM-SEG references on one grid, MONAI as the
reference for the metrics, positions checked in LPS mm straight from the DICOM headers, every bad input an error."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from covidseg.cli.main import run as cli
from covidseg.errors import EXIT_USER, ConfigError, InputError
from covidseg.evaluation import (
    Grid,
    default_label,
    evaluate,
    format_table,
    grid_of,
    parse_map,
    rasterise_polygons,
    read_reference,
    read_structures,
    score,
)
from covidseg.evaluation.labels import COVIDSEG_JOINT, label_map_defaults
from covidseg.io.image import make_ct_image, read_image, write_mask
from dicom_series import write_dicom_series

RT_STRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ct" / "pancreas-ct-cb-001"
FLIPPED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
"""Rows run to the patient's right and slices from head to feet: two axes the canonical grid reverses."""
_C, _S = math.cos(math.radians(12)), math.sin(math.radians(12))
OBLIQUE = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)
"""Slices rotated by 12 degrees about the patient's z axis."""
BOX = (slice(1, 5), slice(2, 6), slice(3, 10))
"""Foreground of the synthetic series, as DICOM (slice k, row j, column i) index ranges."""


# ------------------------------------------------------------------------------------------------ helpers


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, np.uint8), affine), str(path))
    return path


def _blob_labels(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A label map (X, Y, Z) with a 'left lung' (1), 'right lung' (2) and a few 'lesions' (3)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    out = np.zeros(shape, np.uint8)
    for label, cx in ((1, 0.7), (2, 0.3)):
        r = ((x - cx * shape[0]) / (0.2 * shape[0])) ** 2 + ((y - 0.5 * shape[1]) / (0.35 * shape[1])) ** 2 + \
            ((z - 0.5 * shape[2]) / (0.45 * shape[2])) ** 2
        out[r + rng.normal(0, 0.08, shape) < 1] = label
    lesions = ndimage.binary_dilation(rng.random(shape) > 0.997, iterations=2) & (out > 0)
    out[lesions] = 3
    return out


def _dicom_series(folder: Path, direction: tuple[float, ...] = FLIPPED,
                  series_uid: str = "1.2.826.0.1.3680043.2.1125.77",
                  frame_uid: str = "1.2.826.0.1.3680043.2.1125.9") -> list[Path]:
    """A 6-slice series (12 x 10 pixels of 0.8 x 0.6 mm, 2.5 mm slices) with a 1000 HU box at :data:`BOX`.

    SimpleITK writes the pixels; pydicom adds what a SEG/RTSTRUCT refers to (frame of reference, patient, study).
    """
    volume = np.zeros((6, 10, 12), np.int16)
    volume[BOX] = 1000
    files = write_dicom_series(folder, volume, origin=(10.0, -20.0, 30.0), spacing=(0.8, 0.6, 2.5),
                               direction=direction, series_uid=series_uid)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID, ds.PatientName, ds.StudyID, ds.SeriesNumber = "EVAL01", "Eval^Test", "1", 1
        ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber, ds.ReferringPhysicianName = "", "O", "", ""
        ds.SliceThickness = ds.SpacingBetweenSlices = 2.5  # SimpleITK's 2D slices say 1
        ds.save_as(path)
    return files


def _sorted_headers(files: list[Path]) -> list[Dataset]:
    """The slices in the order of DICOM slice index k (position along the slice normal)."""
    headers = [pydicom.dcmread(f) for f in files]
    return sorted(headers, key=lambda d: int(d.InstanceNumber))


def _lps(ds: Dataset, i: float, j: float) -> np.ndarray:
    """LPS mm of column i, row j of one slice, by the DICOM formula (PS3.3 C.7.6.2.1.1): no covidseg code."""
    ipp = np.asarray(ds.ImagePositionPatient, float)
    iop = np.asarray(ds.ImageOrientationPatient, float)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    return ipp + i * col_mm * iop[:3] + j * row_mm * iop[3:]


def _box_contours(headers: list[Dataset]) -> list[np.ndarray]:
    """One closed contour per slice of :data:`BOX`, through the half-voxel corners of the box (LPS mm)."""
    (k0, k1), (j0, j1), (i0, i1) = ((s.start, s.stop) for s in BOX)
    corners = ((i0 - 0.5, j0 - 0.5), (i1 - 0.5, j0 - 0.5), (i1 - 0.5, j1 - 0.5), (i0 - 0.5, j1 - 0.5))
    return [np.array([_lps(headers[k], i, j) for i, j in corners]) for k in range(k0, k1)]


def _write_rtstruct(path: Path, headers: list[Dataset], rois: dict[str, list[np.ndarray]],
                    series_uid: str | None = None, frame_uid: str | None = None) -> Path:
    """A minimal RTSTRUCT (pydicom) referencing the series of ``headers``, one ROI per entry of ``rois``."""
    first = headers[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCT_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RT_STRUCT_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID, \
        "RTSTRUCT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = first.StudyInstanceUID, generate_uid(), "EVAL01"
    ds.StructureSetLabel = "test"
    frame = frame_uid or first.FrameOfReferenceUID
    images = [Dataset() for _ in headers]
    for item, h in zip(images, headers, strict=True):
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT_IMAGE_STORAGE, h.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = series_uid or first.SeriesInstanceUID
    series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    ref = Dataset()
    ref.FrameOfReferenceUID = frame
    ref.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [ref]
    ds.StructureSetROISequence, ds.ROIContourSequence = [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, frame, name
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        items = []
        for points in contours:
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
            c.ContourData = [f"{v:.6f}" for v in np.asarray(points).ravel()]
            items.append(c)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber, roi_contour.ContourSequence = number, items
        ds.ROIContourSequence.append(roi_contour)
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_seg(path: Path, files: list[Path], segments: dict[str, np.ndarray]) -> Path:
    """A binary DICOM-SEG written with highdicom; each mask is (frames, rows, cols) in the order of ``files``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in files]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=name, segmented_property_category=codes.SCT.Organ,
            segmented_property_type=codes.SCT.Lung, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, name in enumerate(segments, start=1)
    ]
    pixels = np.stack([np.asarray(m, np.uint8) for m in segments.values()], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=2,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="covidseg tests",
        manufacturer_model_name="tests", software_versions="0", device_serial_number="0")
    seg.save_as(str(path))
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == EXIT_USER, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The synthetic series, its CT, its RTSTRUCT and SEG, and the box as a NIfTI written by covidseg."""
    root = tmp_path_factory.mktemp("series")
    files = _dicom_series(root / "dicom")
    headers = _sorted_headers(files)
    ct = read_image(root / "dicom")
    expected = ct.array > 500
    rtstruct = _write_rtstruct(root / "rtstruct.dcm", headers, {"Lung_L": _box_contours(headers), "Body": []})
    sources = [pydicom.dcmread(f) for f in files]
    seg = _write_seg(root / "seg.dcm", files, {"Left lung": np.stack([s.pixel_array > 500 for s in sources])})
    lungs = write_mask(expected.astype(np.uint8), ct, root / "out" / "lungs.nii.gz")
    return {"root": root, "files": files, "headers": headers, "ct": ct, "expected": expected,
            "rtstruct": rtstruct, "seg": seg, "lungs": lungs}


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name, label", [
    ("LUNG_L", "left_lung"), ("Lung_L", "left_lung"), ("Left lung", "left_lung"), ("lung-left", "left_lung"),
    ("LungLeft", "left_lung"), ("lung_upper_lobe_left", "left_lung"), ("LUNG_R", "right_lung"),
    ("Right Lung", "right_lung"), ("Lung_Rt", "right_lung"), ("Lungs", "lungs"), ("Lung", "lungs"),
    ("Both lungs", "lungs"), ("Infection", "infection"), ("GGO", "infection"), ("lesion 2", "infection"),
    ("COVID-19 consolidation", "infection"), ("Lungs-GTV", None), ("Lung_CTV", None), ("lung lower lobe", None),
    ("Lung L+R", None), ("Bowel_sm_planCT", None), ("ROI", None), ("left kidney", None), ("1", None),
])
def test_structure_names_map_to_labels(name, label):
    assert default_label(name) == label


def test_label_map_defaults_follow_covidseg_files_then_the_file_name():
    assert label_map_defaults("lungs", [1, 2]) == {1: "left_lung", 2: "right_lung"}
    assert label_map_defaults("infection", [1]) == {1: "infection"}
    assert label_map_defaults("expert_lesions", [1]) == {1: "infection"}
    assert label_map_defaults("expert_lesions", [1, 2]) == COVIDSEG_JOINT  # not binary: the joint convention
    assert label_map_defaults("case07", [1]) == COVIDSEG_JOINT


def test_parse_map_normalises_and_refuses_bad_items():
    assert parse_map(["LUNG_L=Left-Lung", "a=b=lungs", "GTV=none"]) == {"lung_l": "left_lung", "a=b": "lungs",
                                                                        "gtv": "none"}
    for bad in (["LUNG_L"], ["=left_lung"], ["LUNG_L=liver"], ["x=lungs", "X=lungs"]):
        with pytest.raises(ConfigError):
            parse_map(bad)


# ------------------------------------------------------------------------------------------------ NIfTI


def _monai(pred: np.ndarray, ref: np.ndarray, spacing, tol: float) -> tuple[float, float, float]:
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    g = torch.from_numpy(ref[None, None].astype(np.float32))
    dice = compute_dice(p, g, include_background=True)
    nsd = compute_surface_dice(p, g, class_thresholds=[tol], include_background=True, spacing=list(spacing))
    hd = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=list(spacing))
    return float(dice.item()), float(nsd.item()), float(hd.item())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_nifti_against_nifti_matches_monai(tmp_path):
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-40.0, 12.0, 100.0)
    pred = _nifti(tmp_path / "pred.nii.gz", _blob_labels((40, 36, 14), 0), affine)
    ref = _nifti(tmp_path / "expert.nii.gz", _blob_labels((40, 36, 14), 1), affine)
    result = evaluate(pred, ref)
    assert list(result.scores) == ["left_lung", "right_lung", "infection"]
    ct = make_ct_image(np.zeros((40, 36, 14)), affine, pred)  # canonical (D, H, W) = (z, y, x) flipped to LPS
    for value, label in COVIDSEG_JOINT.items():
        p = ct.from_original(nib.load(pred).get_fdata() == value)
        g = ct.from_original(nib.load(ref).get_fdata() == value)
        tol = 3.0 if label == "infection" else 1.0
        dice, nsd, hd95 = _monai(p, g, ct.spacing, tol)
        got = result.scores[label]
        assert got.dice == pytest.approx(dice, abs=1e-6)
        assert got.nsd == pytest.approx(nsd, abs=1e-6)
        assert got.hd95_mm == pytest.approx(hd95, rel=1e-5)
        assert got.tolerance_mm == tol
        assert got.pred_voxels == int(p.sum()) and got.ref_voxels == int(g.sum())
        assert got.ref_ml == pytest.approx(g.sum() * 0.7 * 0.8 * 2.5 / 1000)
    assert 0.3 < result.scores["left_lung"].dice < 1.0  # different blobs: a score that can fail both ways


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_tolerance_applies_to_every_label_and_matches_monai(tmp_path):
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    pred = _nifti(tmp_path / "pred.nii.gz", _blob_labels((30, 30, 10), 2), affine)
    ref = _nifti(tmp_path / "ref.nii.gz", _blob_labels((30, 30, 10), 3), affine)
    result = evaluate(pred, ref, tolerance_mm=2.0)
    ct = make_ct_image(np.zeros((30, 30, 10)), affine, pred)
    p = ct.from_original(nib.load(pred).get_fdata() == 2)
    g = ct.from_original(nib.load(ref).get_fdata() == 2)
    assert result.scores["right_lung"].nsd == pytest.approx(_monai(p, g, ct.spacing, 2.0)[1], abs=1e-6)
    assert {s.tolerance_mm for s in result.scores.values()} == {2.0}


def test_reference_in_another_axis_order_or_cropped_scores_the_same(tmp_path):
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-40.0, 12.0, 100.0)
    labels = _blob_labels((40, 36, 14), 1)
    pred = _nifti(tmp_path / "pred.nii.gz", _blob_labels((40, 36, 14), 0), affine)
    same = evaluate(pred, _nifti(tmp_path / "ref.nii.gz", labels, affine))
    # the reference stored with axes (z, x, y) and x flipped: the same voxels in world space
    stored = np.transpose(labels, (2, 0, 1))[:, ::-1, :]  # new (c, x', y): x' = 39 - x
    swap = np.zeros((4, 4))
    swap[0, 1], swap[1, 2], swap[2, 0], swap[3, 3] = -1.0, 1.0, 1.0, 1.0  # new (c, x', y) -> old (x, y, c)
    swap[0, 3] = 39.0
    moved = evaluate(pred, _nifti(tmp_path / "ref_zxy.nii.gz", stored, affine @ swap))
    # a crop of the reference (the box around its foreground), its affine shifted by whole voxels
    nz = np.argwhere(labels)
    lo, hi = nz.min(0), nz.max(0) + 1
    shift = np.eye(4)
    shift[:3, 3] = lo
    cropped = evaluate(pred, _nifti(tmp_path / "ref_crop.nii.gz",
                                    labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], affine @ shift))
    for other in (moved, cropped):
        for label, s in same.scores.items():
            assert other.scores[label].dice == s.dice and other.scores[label].hd95_mm == s.hd95_mm


@pytest.mark.parametrize("change, needle", [
    ("spacing", "voxel size or axis directions differ"),
    ("half_voxel", "fraction of a voxel"),
    ("outside", "lie outside the grid"),
    ("sheared_crop", "cannot be put onto the grid"),
])
def test_reference_on_another_grid_is_refused(tmp_path, change, needle):
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    labels = _blob_labels((30, 30, 10), 1)
    other = affine.copy()
    if change == "sheared_crop":  # both sheared (a tilted gantry stored as shear): only the very same grid works
        affine[0, 2] = 0.4
        shift = np.eye(4)
        shift[0, 3] = 1.0
        other = affine @ shift
        pred = _nifti(tmp_path / "pred.nii.gz", labels, affine)
        with pytest.raises(InputError, match=needle):
            evaluate(pred, _nifti(tmp_path / "ref.nii.gz", labels[1:], other))
        return
    if change == "spacing":
        other[0, 0] = 0.75
    elif change == "half_voxel":
        other[0, 3] += 0.35
    else:
        other[0, 3] += 0.7 * 20  # shifted by 20 whole voxels: part of the mask falls off the grid
    pred = _nifti(tmp_path / "pred.nii.gz", labels, affine)
    ref = _nifti(tmp_path / "ref.nii.gz", labels, other)
    with pytest.raises(InputError, match=needle):
        evaluate(pred, ref)


def test_overrides_replace_the_defaults_of_their_label_and_unmapped_are_listed(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    ref_labels = np.zeros((20, 20, 8), np.uint8)
    ref_labels[2:8, 3:15, 1:7] = 2     # left lung as label 2 (as reference_labels.nii.gz)
    ref_labels[11:18, 3:15, 1:7] = 3   # right lung as 3
    ref_labels[9:11, 5:9, 2:4] = 1     # bowel as 1
    pred_labels = np.zeros_like(ref_labels)
    pred_labels[ref_labels == 2] = 1
    pred_labels[ref_labels == 3] = 2
    pred = _nifti(tmp_path / "lungs.nii.gz", pred_labels, affine)
    ref = _nifti(tmp_path / "rt_labels.nii.gz", ref_labels, affine)
    result = evaluate(pred, ref, ref_map=parse_map(["2=left_lung", "3=right_lung"]))
    assert set(result.scores) == {"left_lung", "right_lung"}
    assert result.scores["left_lung"].dice == 1.0 and result.scores["right_lung"].dice == 1.0
    assert result.unmapped["reference"] == ["label 1 of rt_labels.nii.gz"]
    table = format_table(result)
    assert "label 1 of rt_labels.nii.gz" in table and "--map NAME=LABEL" in table
    lungs_only = evaluate(pred, ref, ref_map=parse_map(["2=lungs", "3=lungs", "1=none"]))
    assert list(lungs_only.scores) == ["lungs"] and lungs_only.scores["lungs"].dice == 1.0
    assert lungs_only.scores["lungs"].pred_structures == ["1", "2"]


def test_covidseg_folder_scores_an_empty_infection(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    lungs = np.zeros((20, 20, 8), np.uint8)
    lungs[2:8, 3:15, 1:7], lungs[11:18, 3:15, 1:7] = 1, 2
    out = tmp_path / "OUT"
    out.mkdir()
    _nifti(out / "lungs.nii.gz", lungs, affine)
    _nifti(out / "infection.nii.gz", np.zeros_like(lungs), affine)
    result = evaluate(out, out)
    assert {k: v.dice for k, v in result.scores.items()} == {"left_lung": 1.0, "right_lung": 1.0, "infection": 1.0}
    assert result.scores["infection"].hd95_mm == 0.0  # both empty: the convention of covidseg.metrics


def test_score_of_masks_in_memory():
    ref = {"left_lung": np.zeros((4, 6, 6), bool), "infection": np.zeros((4, 6, 6), bool)}
    ref["left_lung"][1:3, 1:5, 1:3] = True
    pred = {"left_lung": ref["left_lung"].copy(), "right_lung": np.zeros((4, 6, 6), bool)}
    pred["left_lung"][1:3, 1:5, 3] = True
    scores = score(pred, ref, (2.0, 1.0, 1.0))
    assert list(scores) == ["left_lung"]  # infection: the prediction has none to score
    assert scores["left_lung"].dice == pytest.approx(2 * 16 / (16 + 24))


def test_reference_slices_leave_out_the_prediction_beyond_the_reference():
    """A reference contoured on slices 1-2 of 4 (an RTSTRUCT that stops short of the scan's edge): the lung the
    prediction finds on slices 0 and 3 is counted and, with ``reference_slices``, left out of the scores."""
    ref = {"left_lung": np.zeros((4, 6, 6), bool)}
    ref["left_lung"][1:3, 1:5, 1:4] = True
    pred = {"left_lung": np.zeros((4, 6, 6), bool)}
    pred["left_lung"][:, 1:5, 1:4] = True
    plain = score(pred, ref, (2.0, 1.0, 1.0))["left_lung"]
    assert plain.dice == pytest.approx(2 * 24 / (24 + 48))
    assert plain.pred_ml_beyond_ref_slices == pytest.approx(24 * 2.0 / 1000) and plain.ref_slices == [1, 2]
    within = score(pred, ref, (2.0, 1.0, 1.0), reference_slices=True)["left_lung"]
    assert within.dice == 1.0 and within.within_ref_slices and within.pred_voxels == 24
    assert within.pred_ml_beyond_ref_slices == plain.pred_ml_beyond_ref_slices
    # an empty reference spans no slice: the whole prediction is beyond it, and scored as it is without the option
    empty = score(pred, {"left_lung": np.zeros((4, 6, 6), bool)}, (2.0, 1.0, 1.0), reference_slices=True)
    assert empty["left_lung"].ref_slices is None and empty["left_lung"].dice == 0.0


def test_cli_reports_and_optionally_drops_the_prediction_beyond_the_reference(tmp_path, capsys):
    import json

    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    pred_map = np.zeros((12, 10, 6), np.uint8)
    pred_map[2:6, 2:8, :] = 1  # file axes (x, y, z): the left lung on every slice
    ref_map = pred_map.copy()
    ref_map[..., 5] = 0  # the reference stops a slice short of the top
    pred = _nifti(tmp_path / "pred.nii.gz", pred_map, affine)
    ref = _nifti(tmp_path / "ref.nii.gz", ref_map, affine)
    code, out, err = _run(["evaluate", str(pred), str(ref)], capsys)
    assert code == 0, err
    assert "axial slices the reference does not reach" in out and "--reference-slices scores only" in out
    code, out, err = _run(["evaluate", str(pred), str(ref), "--reference-slices", "--json",
                           str(tmp_path / "s.json")], capsys)
    assert code == 0, err
    assert "left out (--reference-slices)" in out
    scores = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["scores"]
    assert scores["left_lung"]["dice"] == 1.0 and scores["left_lung"]["within_ref_slices"] is True


# ------------------------------------------------------------------------------------------------ RTSTRUCT


def _index_grid(shape: tuple[int, int, int] = (3, 20, 24)) -> Grid:
    """A grid whose LPS mm are its canonical indices scaled: d -> z (2 mm), h -> y (0.5 mm), w -> x (1 mm)."""
    ras = np.array([[-1.0, 0, 0, 0], [0, -0.5, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])  # file axes (x, y, z), LPS
    image = make_ct_image(np.zeros(shape[::-1], np.float32), ras, Path("grid.nii.gz"))
    return Grid(image=image)


def _at(grid: Grid, d: float, hw: list[tuple[float, float]]) -> np.ndarray:
    """LPS points of canonical (d, h, w) positions on ``grid``."""
    pts = np.array([[d, h, w, 1.0] for h, w in hw]).T
    return (grid.lps_affine @ pts)[:3].T


def test_rasteriser_fills_pixel_centres_inside_a_known_polygon():
    grid = _index_grid()
    assert np.allclose(grid.lps_affine, [[0, 0, 1, 0], [0, 0.5, 0, 0], [2, 0, 0, 0], [0, 0, 0, 1]])
    # a rectangle through half-pixel corners: rows 3..8, columns 5..14 exactly
    rect = _at(grid, 1, [(2.5, 4.5), (2.5, 14.5), (8.5, 14.5), (8.5, 4.5)])
    # a triangle with vertices on pixel centres' diagonals: inside = h > 10.2 and w > 2.2 and h + w < 20.3
    tri = _at(grid, 2, [(10.2, 2.2), (18.1, 2.2), (10.2, 10.1)])
    mask = rasterise_polygons([rect, tri], grid, Path("x"), "test")
    expected = np.zeros(grid.shape, bool)
    expected[1, 3:9, 5:15] = True
    h, w = np.mgrid[0:20, 0:24]
    expected[2] = (h > 10.2) & (w > 2.2) & (h + w < 20.3)
    assert np.array_equal(mask, expected)
    # a second contour inside the first on the same slice cuts a hole (exclusive or)
    hole = _at(grid, 1, [(4.5, 7.5), (4.5, 10.5), (6.5, 10.5), (6.5, 7.5)])
    ring = rasterise_polygons([rect, hole], grid, Path("x"), "test")
    expected[1, 5:7, 8:11] = False
    assert np.array_equal(ring[1], expected[1])


def test_rasterised_area_matches_the_polygon_area():
    grid = _index_grid((1, 200, 200))
    theta = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    hw = [(100 + 61.3 * np.sin(t), 97 + 44.7 * np.cos(t)) for t in theta]
    mask = rasterise_polygons([_at(grid, 0, hw)], grid, Path("x"), "ellipse")
    h, w = np.array(hw).T
    shoelace = 0.5 * abs(np.dot(h, np.roll(w, 1)) - np.dot(w, np.roll(h, 1)))
    assert mask.sum() == pytest.approx(shoelace, rel=2e-3)


@pytest.mark.parametrize("where, needle", [
    (1.5, "between two slices"), (7, "outside the CT's 3 slices"), (None, "not in an axial plane"),
])
def test_contours_off_the_grid_are_refused(where, needle):
    grid = _index_grid()
    if where is None:
        points = np.vstack([_at(grid, 0, [(2, 2), (2, 8)]), _at(grid, 2, [(8, 8)])])
    else:
        points = _at(grid, where, [(2, 2), (2, 8), (8, 8)])
    with pytest.raises(InputError, match=needle):
        rasterise_polygons([points], grid, Path("rt.dcm"), "ROI 1 'x'")


@pytest.mark.parametrize("direction", [FLIPPED, OBLIQUE], ids=["flipped", "oblique"])
def test_rtstruct_lands_on_the_ct_voxels_and_write_mask_keeps_them_in_lps(tmp_path, direction):
    files = _dicom_series(tmp_path / "dicom", direction=direction)
    headers = _sorted_headers(files)
    rt = _write_rtstruct(tmp_path / "rt.dcm", headers, {"Lung_L": _box_contours(headers)})
    ct = read_image(tmp_path / "dicom")
    ref = read_reference(rt, like=ct)
    assert list(ref) == ["left_lung"]
    assert np.array_equal(ref["left_lung"], ct.array > 500)  # the contour's voxels are the CT's bright voxels
    # the mask written as NIfTI holds exactly the box's voxel centres, in LPS mm by the DICOM formula
    img = nib.load(write_mask(ref["left_lung"], ct, tmp_path / "lungs.nii.gz"))
    ijk = np.argwhere(np.asarray(img.dataobj) > 0)
    lps = (np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    k, j, i = (np.arange(s.start, s.stop) for s in BOX)
    want = np.array([_lps(headers[kk], ii, jj) for kk in k for jj in j for ii in i])
    got = lps[np.lexsort(lps.T)]
    assert got.shape == want.shape
    assert np.allclose(got, want[np.lexsort(want.T)], atol=1e-3)


def test_rtstruct_scores_against_the_nifti_covidseg_wrote_with_or_without_ct(series):
    for ct in (None, series["root"] / "dicom"):
        result = evaluate(series["root"] / "out", series["rtstruct"], ct=ct)
        assert list(result.scores) == ["left_lung"] and result.scores["left_lung"].dice == 1.0
        assert result.unmapped["reference"] == ["ROI 2 'Body'"]
        assert result.not_in_reference == ["right_lung"]


def test_rtstruct_of_another_series_is_refused(series, tmp_path):
    headers = series["headers"]
    contours = _box_contours(headers)
    other_series = _write_rtstruct(tmp_path / "a.dcm", headers, {"Lung_L": contours}, series_uid="1.2.3.4")
    other_frame = _write_rtstruct(tmp_path / "b.dcm", headers, {"Lung_L": contours}, frame_uid="1.2.3.5")
    with pytest.raises(InputError, match="references series 1.2.3.4"):
        read_reference(other_series, like=series["ct"])
    with pytest.raises(InputError, match="frame of reference 1.2.3.5"):
        read_reference(other_frame, like=series["ct"])
    # drawn on a series whose slices sit half a slice away: caught by geometry when no UIDs can be checked
    shifted = [c + np.array([0.0, 0.0, 1.25]) for c in contours]
    moved = _write_rtstruct(tmp_path / "c.dcm", headers, {"Lung_L": shifted})
    with pytest.raises(InputError, match="between two slices"):
        evaluate(series["lungs"], moved)


# ------------------------------------------------------------------------------------------------ DICOM-SEG


def test_seg_written_by_highdicom_reads_back_voxel_exact(series, tmp_path):
    ct = series["ct"]
    ref = read_reference(series["seg"], like=ct)
    assert list(ref) == ["left_lung"] and np.array_equal(ref["left_lung"], series["expected"])
    # on the grid of covidseg's NIfTI for that series (no UIDs to check) the same voxels
    grid = grid_of(read_image(series["root"] / "dicom"))
    fmt, structures = read_structures(series["seg"], grid)
    assert fmt == "SEG" and [s.name for s in structures] == ["Left lung"]
    result = evaluate(series["root"] / "out", series["seg"])
    assert result.scores["left_lung"].dice == 1.0
    # two segments, frames in reverse order, the second empty on most slices (highdicom omits empty frames)
    files = series["files"][::-1]
    pixels = np.stack([pydicom.dcmread(f).pixel_array > 500 for f in files])
    small = np.zeros_like(pixels)
    small[2, 3:5, 4:7] = pixels[2, 3:5, 4:7]
    seg = _write_seg(tmp_path / "two.dcm", files, {"Left lung": pixels, "GGO": small})
    both = read_reference(seg, like=ct)
    assert np.array_equal(both["left_lung"], series["expected"])
    # the small segment is slice k = 3, rows 3..4, columns 4..6: the same voxels as a contour around them
    corners = ((3.5, 2.5), (6.5, 2.5), (6.5, 4.5), (3.5, 4.5))
    contour = np.array([_lps(series["headers"][3], i, j) for i, j in corners])
    rt = _write_rtstruct(tmp_path / "ggo_rt.dcm", series["headers"], {"GGO": [contour]})
    assert both["infection"].sum() == small.sum() == 6
    assert np.array_equal(both["infection"], read_reference(rt, like=ct)["infection"])


def test_seg_of_another_series_is_refused(series, tmp_path):
    files = _dicom_series(tmp_path / "other", series_uid="1.2.826.0.1.3680043.2.1125.78",
                          frame_uid="1.2.826.0.1.3680043.2.1125.10")
    pixels = np.stack([pydicom.dcmread(f).pixel_array > 500 for f in files])
    seg = _write_seg(tmp_path / "seg.dcm", files, {"Left lung": pixels})
    with pytest.raises(InputError, match="references series 1.2.826.0.1.3680043.2.1125.78"):
        read_reference(seg, like=series["ct"])


# ------------------------------------------------------------------------------------------------ real RTSTRUCT


def test_real_rtstruct_lungs_agree_with_the_rasterised_labels(tmp_path, capsys, monkeypatch):
    """Our rasterisation of LUNG_L / LUNG_R (the reference) against the throw-away label map (the prediction)."""
    import json

    if not (REAL / "rtstruct.dcm").is_file():
        pytest.skip(f"{REAL} is absent (the project's shared real CTs; a user's clone has none)")
    out_json = tmp_path / "real.json"
    code, out, err = _run(["evaluate", str(REAL / "reference_labels.nii.gz"), str(REAL / "rtstruct.dcm"),
                           "--ct", str(REAL / "dicom"), "--pred-map", "2=left_lung", "--pred-map", "3=right_lung",
                           "--json", str(out_json)], capsys)
    assert code == 0, err
    scores = json.loads(out_json.read_text())["scores"]
    assert set(scores) == {"left_lung", "right_lung"}
    assert all(s["dice"] >= 0.98 for s in scores.values()), scores
    assert "Bowel_sm_planCT" in out and "Stomach_duo_planCT" in out  # unmapped ROIs are listed
    # the rasterised area of each lung is the area its polygons enclose (shoelace)
    monkeypatch.setattr(pydicom.config, "use_DS_numpy", True)
    ds = pydicom.dcmread(REAL / "rtstruct.dcm")
    names = {int(r.ROINumber): r.ROIName for r in ds.StructureSetROISequence}
    pixel_mm2 = float(np.prod(np.asarray(pydicom.dcmread(next((REAL / "dicom").iterdir())).PixelSpacing, float)))
    for roi in ds.ROIContourSequence:
        label = {"LUNG_L": "left_lung", "LUNG_R": "right_lung"}.get(names[int(roi.ReferencedROINumber)])
        if label is None:
            continue
        area = 0.0
        for c in roi.ContourSequence:
            p = np.asarray(c.ContourData, float).reshape(-1, 3)
            area += 0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1)))
        assert scores[label]["ref_voxels"] == pytest.approx(area / pixel_mm2, rel=1e-3)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_prints_the_table_and_writes_json(series, tmp_path, capsys):
    import json

    out_json = tmp_path / "scores.json"
    code, out, err = _run(["evaluate", str(series["root"] / "out"), str(series["rtstruct"]), "--ct",
                           str(series["root"] / "dicom"), "--json", str(out_json)], capsys)
    assert code == 0, err
    header, rule, row = out.splitlines()[:3]
    assert header.split()[:3] == ["label", "Dice", "NSD"] and row.split()[:2] == ["left_lung", "1.0000"]
    assert "ROI 2 'Body'" in out
    data = json.loads(out_json.read_text())
    assert data["scores"]["left_lung"]["dice"] == 1.0
    assert data["scores"]["left_lung"]["ref_voxels"] == int(series["expected"].sum())
    assert data["grid"]["series_uid"] == "1.2.826.0.1.3680043.2.1125.77"
    assert data["formats"] == {"prediction": "covidseg", "reference": "RTSTRUCT"}


def test_cli_help_explains_with_examples(capsys):
    from covidseg.cli._common import DESCRIPTION_WIDTH

    code, out, _ = _run(["evaluate", "--help"], capsys)
    assert code == 0
    assert all(len(line) <= DESCRIPTION_WIDTH for line in out.splitlines())
    for needle in ("RTSTRUCT", "DICOM-SEG", "--map NAME=LABEL", "LUNG_L", "examples:", "covidseg evaluate OUT"):
        assert needle in out


@pytest.mark.parametrize("case", ["missing", "not_dicom", "ct_slice", "other_series", "grid", "no_match",
                                  "no_grid", "bad_map", "map_unknown_name", "tolerance", "json_is_input",
                                  "folder_without_masks"])
def test_cli_bad_inputs_are_one_line_errors(series, tmp_path, capsys, case):
    root = series["root"]
    pred, ref, extra = str(root / "out"), str(series["rtstruct"]), ["--ct", str(root / "dicom")]
    needles: tuple[str, ...]
    if case == "missing":
        ref, needles = str(tmp_path / "nope.dcm"), ("nope.dcm", "no such file")
    elif case == "not_dicom":
        (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all" * 20)
        ref, needles = str(tmp_path / "junk.dcm"), ("junk.dcm", "not a readable DICOM file")
    elif case == "ct_slice":
        ref, needles = str(series["files"][0]), ("a DICOM CT", "--ct")
    elif case == "other_series":
        rt = _write_rtstruct(tmp_path / "rt.dcm", series["headers"], {"Lung_L": _box_contours(series["headers"])},
                             series_uid="1.2.3.4")
        ref, needles = str(rt), ("rt.dcm", "references series 1.2.3.4", "--ct")
    elif case == "grid":
        img = nib.load(series["lungs"])
        affine = img.affine.copy()
        affine[:3, :3] *= 1.1
        ref, extra = str(_nifti(tmp_path / "other.nii.gz", np.asarray(img.dataobj), affine)), []
        needles = ("other.nii.gz", "another voxel grid", "resample")
    elif case == "no_match":
        rt = _write_rtstruct(tmp_path / "rt.dcm", series["headers"], {"Kidney": _box_contours(series["headers"])})
        ref, needles = str(rt), ("rt.dcm", "no structure maps", "Kidney", "--map NAME=LABEL")
    elif case == "no_grid":
        pred, extra, needles = str(series["seg"]), [], ("neither is a NIfTI", "--ct DIR")
    elif case == "bad_map":
        extra, needles = extra + ["--map", "LUNG_L"], ("--map", "NAME=LABEL")
    elif case == "map_unknown_name":
        extra, needles = extra + ["--map", "Lung_X=left_lung"], ("rtstruct.dcm", "'lung_x'", "Lung_L, Body")
    elif case == "tolerance":
        extra, needles = extra + ["--tolerance-mm", "0"], ("--tolerance-mm", "positive")
    elif case == "json_is_input":
        extra, needles = extra + ["--json", ref], ("refusing to overwrite",)
    else:
        (tmp_path / "empty").mkdir()
        pred, needles = str(tmp_path / "empty"), ("neither lungs.nii.gz nor infection.nii.gz",)
    before = Path(series["rtstruct"]).read_bytes()
    code, out, err = _run(["evaluate", pred, ref, *extra], capsys)
    _assert_user_error(code, err, *needles)
    assert Path(series["rtstruct"]).read_bytes() == before
