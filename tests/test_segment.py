"""`covidseg segment` end to end on a small phantom with a tiny random-weight checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from covidseg.checkpoint import save_checkpoint
from covidseg.cli.main import run as cli
from covidseg.config import Config, ModelConfig
from covidseg.models import create_model
from covidseg.phantom import make_phantom

SCALE = 0.15
"""Phantom scale: about 77x77 pixels and 40 slices, a few seconds per case on 2 cores."""
WINDOW = "8x32x32"
"""Sliding window of the tests (the tiny volume holds several windows)."""


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("segment")
    ph = make_phantom("coronacases", seed=1, scale=SCALE)
    ct = root / "case_a.nii.gz"
    nib.save(nib.Nifti1Image(ph.stored_ct(), ph.affine), ct)
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(base_width=4))
    model = create_model(cfg.model)
    with torch.no_grad():  # a bias so that some voxels pass the threshold: masks not trivially empty
        model.head.bias.fill_(0.3)
    ckpt = save_checkpoint(root / "tiny.pt", model, cfg, target="infection")
    out = root / "out1"
    code = _run(["segment", str(ct), "-o", str(out), "--checkpoint", str(ckpt), "--probability", "--html",
                 "--set", f"inference.window={WINDOW}"])
    assert code == 0
    return {"root": root, "ct": ct, "ckpt": ckpt, "out": out}


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    return int(exc.value.code or 0)


def test_outputs_geometry_and_volumes(case: dict[str, Path]) -> None:
    out = case["out"]
    src = nib.load(case["ct"])
    for name in ("lungs.nii.gz", "infection.nii.gz", "probability.nii.gz"):
        img = nib.load(out / name)
        assert img.shape[:3] == src.shape
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    for name in ("report.json", "report.csv", "overview.png", "report.html"):
        assert (out / name).is_file()
    report = json.loads((out / "report.json").read_text())
    lungs = np.asarray(nib.load(out / "lungs.nii.gz").dataobj)
    inf = np.asarray(nib.load(out / "infection.nii.gz").dataobj)
    voxel_ml = float(np.prod(src.header.get_zooms()[:3])) / 1000.0
    assert report["voxel_volume_ml"] == pytest.approx(voxel_ml)
    for label, name in ((1, "left"), (2, "right")):
        assert report["lungs"][name]["lung_ml"] == pytest.approx((lungs == label).sum() * voxel_ml)
        assert report["lungs"][name]["infection_ml"] == pytest.approx(((lungs == label) & (inf > 0)).sum() * voxel_ml)
    assert not (inf[lungs == 0]).any()  # infection clipped to the lungs
    assert report["lungs"]["both"]["infection_ml"] > 0  # the biased model predicts something
    assert "Pan et al." in report["severity_source"]
    assert "base64," in (out / "report.html").read_text()
    # no overwrite without --force; with --force it works
    assert _run(["segment", str(case["ct"]), "-o", str(out), "--checkpoint", str(case["ckpt"])]) == 2
    assert not list(case["root"].glob(".out1.partial-*"))


def test_nifti_and_dicom_give_same_masks(case: dict[str, Path]) -> None:
    sitk = pytest.importorskip("SimpleITK")
    dicom = case["root"] / "case_a_dicom"
    dicom.mkdir()
    img = sitk.Cast(sitk.ReadImage(str(case["ct"])), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = img.GetDirection()
    series = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in {
            "0008|0060": "CT", "0020|000e": series, "0020|000d": series + ".0", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series}.{k + 1}", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0037": "\\".join(map(str, direction[0:3] + direction[3:6])),
            "0028|1052": "0", "0028|1053": "1",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(dicom / f"{k:04d}.dcm"))
        writer.Execute(sl)
    out = case["root"] / "same_dicom"
    assert _run(["segment", str(dicom), "-o", str(out), "--checkpoint", str(case["ckpt"]),
                 "--set", f"inference.window={WINDOW}"]) == 0
    outs = [case["out"], out]
    for mask in ("lungs.nii.gz", "infection.nii.gz"):
        a, b = (nib.load(o / mask) for o in outs)
        a_can = nib.as_closest_canonical(a)
        b_can = nib.as_closest_canonical(b)
        np.testing.assert_allclose(a_can.affine, b_can.affine, atol=1e-3)
        np.testing.assert_array_equal(np.asarray(a_can.dataobj), np.asarray(b_can.dataobj))


def test_batch_folder_reports_failure(case: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    batch = case["root"] / "batch"
    batch.mkdir()
    (batch / "good.nii.gz").write_bytes(case["ct"].read_bytes())
    (batch / "broken.nii.gz").write_bytes(b"not a nifti")
    out = case["root"] / "batch_out"
    code = _run(["segment", str(batch), "-o", str(out), "--checkpoint", str(case["ckpt"]),
                 "--set", f"inference.window={WINDOW}"])
    assert code == 2
    assert (out / "good" / "report.json").is_file()
    assert not (out / "broken").exists()
    text = capsys.readouterr().out
    assert "1 of 2 case(s) segmented; 1 failed" in text and "broken.nii.gz" in text


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{missing}"], "checkpoint not found"),
    ([], "covidseg demo"),
    (["--checkpoint", "{ckpt}", "--device", "cuda"], "--device"),
])
def test_cli_errors_without_traceback(case: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                      argv: list[str], message: str) -> None:
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    argv = [a.format(missing=case["root"] / "nope.pt", ckpt=case["ckpt"]) for a in argv]
    code = _run(["segment", str(case["ct"]), "-o", str(case["root"] / "err"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
