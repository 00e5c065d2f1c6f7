"""Inputs beyond NIfTI and hospital outputs, end to end: NRRD/MetaImage in and out, the DICOM series chosen in a
folder of several, compressed DICOM, bad series refused (one line, exit 2, no output), DICOM-SEG from `segment`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from covidseg.cli.main import run as cli
from covidseg.errors import EXIT_USER, InputError
from covidseg.io.dicom import series_name
from covidseg.io.image import read_image
from covidseg.io.itk import write_itk_mask
from dicom_series import write_dicom_series
from real_ct import REAL_CT
from test_dicom_seg import check_seg_against_nifti

ITK_FORMATS = (".nrrd", ".nhdr", ".mha", ".mhd")
WINDOW = "8x32x32"


def _oblique_itk(volume_zyx: np.ndarray) -> sitk.Image:
    """A SimpleITK image on a rotated, anisotropic grid (no axis aligned with the patient's)."""
    a, b = 0.3, 0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    image = sitk.GetImageFromArray(volume_zyx)
    image.SetOrigin((12.5, -40.0, 7.25))
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetDirection(tuple((rz @ rx @ np.diag([-1.0, 1.0, 1.0])).ravel()))
    return image


def _geometry(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing()), np.asarray(image.GetDirection())


# --------------------------------------------------------------------------------------------- NRRD, MetaImage


@pytest.mark.parametrize("suffix", ITK_FORMATS)
def test_nrrd_and_metaimage_read_like_their_nifti_twin(tmp_path: Path, suffix: str) -> None:
    volume = np.random.default_rng(0).integers(-1000, 400, size=(6, 9, 7)).astype(np.int16)
    image = _oblique_itk(volume)
    sitk.WriteImage(image, str(tmp_path / f"ct{suffix}"))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))  # the twin, written by SimpleITK, read by nibabel
    ours, twin = read_image(tmp_path / f"ct{suffix}"), read_image(tmp_path / "ct.nii.gz")
    assert ours.source == "itk" and twin.source == "nifti"
    np.testing.assert_array_equal(ours.array, twin.array)
    np.testing.assert_allclose(ours.canonical_affine, twin.canonical_affine, atol=1e-4)
    np.testing.assert_allclose(ours.spacing, twin.spacing, atol=1e-6)


@pytest.mark.parametrize("suffix", ITK_FORMATS)
def test_masks_written_in_the_input_format_keep_its_grid(tmp_path: Path, suffix: str) -> None:
    volume = np.random.default_rng(1).integers(-1000, 400, size=(6, 9, 7)).astype(np.int16)
    source = _oblique_itk(volume)
    sitk.WriteImage(source, str(tmp_path / f"ct{suffix}"))
    ct = read_image(tmp_path / f"ct{suffix}")
    mask = (ct.array > 0).astype(np.uint8) + (ct.array > 200)
    out = write_itk_mask(mask, ct, tmp_path / "out" / f"lungs{suffix}")
    back = sitk.ReadImage(str(out))
    for ours, theirs in zip(_geometry(back), _geometry(source), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    # voxel for voxel against the source's own stored values, through SimpleITK only
    expected = (volume > 0).astype(np.uint8) + (volume > 200)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), expected)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left


def test_bad_nrrd_and_metaimage_inputs_raise_input_error(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match="2D image"):
        read_image(tmp_path / "flat.nrrd")
    vector = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "rgb.mha"))
    with pytest.raises(InputError, match="components per voxel"):
        read_image(tmp_path / "rgb.mha")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(tmp_path / "cut.nrrd"))
    data = (tmp_path / "cut.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(data[: len(data) - 40])
    with pytest.raises(InputError, match="cut.nrrd"):
        read_image(tmp_path / "cut.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(tmp_path / "lost.mhd"))
    (tmp_path / "lost.raw").unlink()
    with pytest.raises(InputError, match="lost.mhd"):
        read_image(tmp_path / "lost.mhd")
    (tmp_path / "junk.nrrd").write_bytes(b"NRRD0004\ntype: nonsense\n\n")
    with pytest.raises(InputError, match="junk.nrrd"):
        read_image(tmp_path / "junk.nrrd")


# --------------------------------------------------------------------------------------------- `segment`


def _segment(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        cli(["segment", *args, "--set", f"inference.window={WINDOW}", "--set", "runtime.bf16=off"])
    return int(exc.value.code or 0), capsys.readouterr().err


def _assert_refused(code: int, err: str, out: Path, *needles: str) -> None:
    """Exit 2, one line naming the problem, no traceback, no output folder (complete or partial)."""
    assert code == EXIT_USER, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert "Traceback" not in err and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def test_segment_an_nrrd_writes_masks_in_nrrd_and_nifti(tmp_path: Path, tiny_ckpt: Path, phantom_sitk: sitk.Image,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    sitk.WriteImage(phantom_sitk, str(tmp_path / "CT.nrrd"))
    code, err = _segment([str(tmp_path / "CT.nrrd"), "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_ckpt)], capsys)
    assert code == 0, err
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["case"] == "CT"
    for name in ("lungs", "infection"):
        ours, nifti = sitk.ReadImage(str(out / f"{name}.nrrd")), sitk.ReadImage(str(out / f"{name}.nii.gz"))
        for a, b, c in zip(_geometry(ours), _geometry(phantom_sitk), _geometry(nifti), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
            np.testing.assert_allclose(c, b, atol=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(nifti))
    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lungs.nrrd")))
    assert (lungs == 1).any() and (lungs == 2).any()
    assert not (out / "segmentation.dcm").exists()


def _phantom_series(folder: Path, image: sitk.Image, uid: str, number: int, **kw: object) -> list[Path]:
    return write_dicom_series(folder, sitk.GetArrayFromImage(image), image.GetOrigin(), image.GetSpacing(),
                              image.GetDirection(), series_uid=uid, patient_id="P7", series_number=number,
                              **kw)  # type: ignore[arg-type]


def test_segment_a_dicom_series_writes_a_seg_of_its_masks(tmp_path: Path, tiny_ckpt: Path, phantom_sitk: sitk.Image,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    _phantom_series(tmp_path / "DICOM", phantom_sitk, "1.2.826.0.1.3680043.2.1125.501", 4)
    code, err = _segment([str(tmp_path / "DICOM"), "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_ckpt)], capsys)
    assert code == 0, err
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["case"] == "P7_series4"
    assert report["dicom_seg"] == {"file": "segmentation.dcm", "series_instance_uid": "1.2.826.0.1.3680043.2.1125.501"}
    assert np.asarray(nib.load(out / "infection.nii.gz").dataobj).any()
    check_seg_against_nifti(out / "segmentation.dcm", read_image(tmp_path / "DICOM"), out / "lungs.nii.gz",
                            out / "infection.nii.gz")


def test_a_series_without_frame_of_reference_gets_the_other_outputs(tmp_path: Path, tiny_ckpt: Path,
                                                                     phantom_sitk: sitk.Image,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _phantom_series(tmp_path / "DICOM", phantom_sitk, "1.2.826.0.1.3680043.2.1125.502", 5, frame_uid=None)
    code, err = _segment([str(tmp_path / "DICOM"), "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_ckpt)], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["dicom_seg"]["file"] is None and "Frame Of Reference" in report["dicom_seg"]["reason"]
    assert (tmp_path / "out" / "lungs.nii.gz").is_file() and not (tmp_path / "out" / "segmentation.dcm").exists()


@pytest.mark.slow
def test_segment_the_real_series_writes_a_seg_equal_to_its_lungs(tmp_path: Path, tiny_ckpt: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    series = REAL_CT / "pancreas-ct-cb-001" / "dicom"
    if not series.is_dir():
        pytest.skip(f"real series not found at {series.resolve()} (a clone without ../shared)")
    with pytest.raises(SystemExit) as exc:
        cli(["segment", str(series), "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_ckpt),
             "--set", "inference.window=16x128x128", "--set", "runtime.bf16=off"])
    assert int(exc.value.code or 0) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    ds = pydicom.dcmread(out / "segmentation.dcm", stop_before_pixels=True)
    assert ds.Modality == "SEG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(
        sorted(series.iterdir())[0], stop_before_pixels=True).SeriesInstanceUID
    assert (np.asarray(nib.load(out / "lungs.nii.gz").dataobj) > 0).sum() > 100_000  # the lung bases were found
    check_seg_against_nifti(out / "segmentation.dcm", read_image(series), out / "lungs.nii.gz",
                            out / "infection.nii.gz")


# --------------------------------------------------------------------------------------------- which series


def _small_series(folder: Path, uid: str, slices: int, number: int, **kw: object) -> list[Path]:
    volume = np.random.default_rng(number).integers(-1000, 400, size=(slices, 8, 8)).astype(np.int16)
    return write_dicom_series(folder, volume, origin=(0.0, 0.0, 0.0), spacing=(0.8, 0.8, 2.0), series_uid=uid,
                              patient_id="P9", series_number=number, **kw)  # type: ignore[arg-type]


def _set_tags(files: list[Path], **tags: object) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(path)


def test_the_ct_series_is_chosen_by_modality_image_type_and_slices(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "exam"
    _set_tags(_small_series(folder, "1.2.3.61", 5, 2), ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    _set_tags(_small_series(folder, "1.2.3.62", 9, 3), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    _set_tags(_small_series(folder, "1.2.3.63", 12, 4), Modality="PT")
    _set_tags(_small_series(folder, "1.2.3.64", 7, 5), ImageType=["DERIVED", "SECONDARY", "AXIAL"])
    with caplog.at_level(logging.WARNING, logger="covidseg"):
        ct = read_image(folder)
    assert ct.series_uid == "1.2.3.61" and ct.shape[0] == 5
    assert "4 DICOM series; using 1.2.3.61" in caplog.text and "1.2.3.63 (PT" in caplog.text
    assert read_image(folder, series="1.2.3.64").shape[0] == 7
    assert series_name(folder) == "P9_series2" and series_name(folder, "1.2.3.64") == "P9_series5"
    with pytest.raises(InputError, match=r"no series 9\.9 in this folder; it holds: 1\.2\.3\.61"):
        read_image(folder, series="9.9")


def test_an_ambiguous_folder_is_refused_with_the_series_listed(tmp_path: Path, tiny_ckpt: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "exam"
    _small_series(folder, "1.2.3.71", 6, 2)
    _small_series(folder, "1.2.3.72", 6, 3)
    code, err = _segment([str(folder), "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_ckpt)], capsys)
    _assert_refused(code, err, tmp_path / "out", "1.2.3.71", "1.2.3.72", "--series")
    pt = tmp_path / "pet"
    _set_tags(_small_series(pt, "1.2.3.73", 6, 2), Modality="PT")
    with pytest.raises(InputError, match="no CT series"):
        read_image(pt)


# --------------------------------------------------------------------------------------------- bad series


def test_bad_series_are_refused_in_one_line_with_no_output(tmp_path: Path, tiny_ckpt: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    tilted = _small_series(tmp_path / "tilt", "1.2.3.81", 8, 2)
    for k, path in enumerate(sorted(tilted)):  # the table moves along z, the slices keep their axial orientation:
        ds = pydicom.dcmread(path)  # a 15-degree gantry tilt shears the stack by tan(15) * 2 mm a slice
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * 2.0 * np.tan(np.radians(15.0)), z]
        ds.save_as(path)
    _small_series(tmp_path / "gap", "1.2.3.82", 8, 3, drop=4)
    mixed = _small_series(tmp_path / "mixed", "1.2.3.83", 8, 4)
    _set_tags([mixed[3]], ImageOrientationPatient=[1, 0, 0, 0, 0.9, 0.435889894])
    for name, needles in (("tilt", ("sheared by 15.00 degrees", "gantry", "dcm2niix")),
                          ("gap", ("1 missing slice(s)",)), ("mixed", ("slice orientation",))):
        out = tmp_path / f"out_{name}"
        code, err = _segment([str(tmp_path / name), "-o", str(out), "--checkpoint", str(tiny_ckpt)], capsys)
        _assert_refused(code, err, out, *needles)


# --------------------------------------------------------------------------------------------- compressed


PYDICOM_ENCODED = ("RLELossless", "JPEGLSLossless")
"""Transfer syntaxes pydicom itself compresses to (RLE natively, JPEG-LS through pyjpegls)."""
GDCM_ENCODED = {"JPEGLosslessSV1": "JPEG", "JPEG2000Lossless": "JPEG2000"}
"""Transfer syntaxes (pydicom's names) that GDCM encodes inside SimpleITK, with the name of its compressor."""


def _compress_with_pydicom(path: Path, syntax: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    ds.compress(getattr(pydicom.uid, syntax))
    return ds


def _compress_with_gdcm(path: Path, syntax: str, scratch: Path) -> pydicom.Dataset:
    """The original file with its pixel data replaced by GDCM's lossless encoding (every other tag kept)."""
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.KeepOriginalImageUIDOn()
    writer.SetUseCompression(True)
    writer.SetCompressor(GDCM_ENCODED[syntax])
    writer.SetFileName(str(scratch))
    writer.Execute(sitk.ReadImage(str(path)))
    encoded, ds = pydicom.dcmread(scratch), pydicom.dcmread(path)
    for key in ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):  # those of the encoded stream
        setattr(ds, key, encoded.get(key))
    ds.PixelData = encoded.PixelData
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = encoded.file_meta.TransferSyntaxUID
    return ds


@pytest.mark.parametrize("syntax", [*PYDICOM_ENCODED, *GDCM_ENCODED])
def test_compressed_slices_of_the_real_series_read_as_the_uncompressed(tmp_path: Path, syntax: str) -> None:
    series = REAL_CT / "pancreas-ct-cb-001" / "dicom"
    if not series.is_dir():
        pytest.skip(f"real series not found at {series.resolve()} (a clone without ../shared)")
    files = sorted(series.iterdir())[60:66]  # six neighbouring slices: a complete short series
    (tmp_path / "plain").mkdir()
    for path in files:
        shutil.copy(path, tmp_path / "plain" / path.name)
    plain = read_image(tmp_path / "plain")
    folder = tmp_path / syntax
    folder.mkdir()
    for path in files:
        ds = (_compress_with_pydicom(path, syntax) if syntax in PYDICOM_ENCODED
              else _compress_with_gdcm(path, syntax, tmp_path / "encoded.dcm"))
        ds.save_as(folder / path.name)
    assert pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID == getattr(pydicom.uid, syntax)
    packed = read_image(folder)
    np.testing.assert_array_equal(packed.array, plain.array)
    np.testing.assert_allclose(packed.affine, plain.affine, atol=1e-6)
