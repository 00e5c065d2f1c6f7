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
                 "--set", f"inference.window={WINDOW}", "--set", "runtime.bf16=off"])
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
    for name in ("report.json", "report.csv", "overview.png", "report.html", "segmentation.seg.nrrd"):
        assert (out / name).is_file()
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
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
    assert "base64," in (out / "report.html").read_text(encoding="utf-8")
    # no overwrite without --force; with --force it works
    assert _run(["segment", str(case["ct"]), "-o", str(out), "--checkpoint", str(case["ckpt"])]) == 2
    assert not list(case["root"].glob(".out1.partial-*"))


def test_nifti_and_dicom_give_same_masks(case: dict[str, Path]) -> None:
    sitk = pytest.importorskip("SimpleITK")
    from dicom_series import write_dicom_series

    dicom = case["root"] / "DICOM"
    img = sitk.ReadImage(str(case["ct"]))
    write_dicom_series(dicom, sitk.GetArrayFromImage(img), img.GetOrigin(), img.GetSpacing(), img.GetDirection(),
                       patient_id="CASE-A", series_number=2)
    out = case["root"] / "same_dicom"
    assert _run(["segment", str(dicom), "-o", str(out), "--checkpoint", str(case["ckpt"]),
                 "--set", f"inference.window={WINDOW}"]) == 0
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["case"] == "CASE-A_series2"
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
    (["--checkpoint", "{missing}"], "model file not found"),
    (["--checkpoint", "{ct}"], "not a readable covidseg checkpoint"),  # a CT given as the model
    (["--checkpoint", "{ckpt}", "--device", "cuda"], "--device"),
])
def test_cli_errors_without_traceback(case: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                      argv: list[str], message: str) -> None:
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    argv = [a.format(missing=case["root"] / "nope.pt", ckpt=case["ckpt"], ct=case["ct"]) for a in argv]
    code = _run(["segment", str(case["ct"]), "-o", str(case["root"] / "err"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------- backends (issue 9)

PARITY_MIN_DICE = 0.999
"""Dice of the torch and ONNX Runtime infection masks (float32 both: they differ only by summation order)."""
PARITY_MAX_PROB_DIFF = 1e-4


def test_onnxruntime_backend_gives_the_same_masks(case: dict[str, Path]) -> None:
    pytest.importorskip("onnxruntime")
    from covidseg.export import export_model

    onnx_file = case["root"] / "tiny.onnx"
    export_model(case["ckpt"], "onnx", onnx_file, window=(8, 32, 32))
    out = case["root"] / "out_ort"
    assert _run(["segment", str(case["ct"]), "-o", str(out), "--checkpoint", str(onnx_file), "--backend",
                 "onnxruntime", "--probability", "--set", f"inference.window={WINDOW}"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["inference"]["backend"] == "onnxruntime" and report["inference"]["bf16"] is False
    torch_out = case["out"]
    p_torch, p_ort = (np.asarray(nib.load(o / "probability.nii.gz").dataobj) for o in (torch_out, out))
    assert float(np.abs(p_torch - p_ort).max()) <= PARITY_MAX_PROB_DIFF
    np.testing.assert_array_equal(np.asarray(nib.load(out / "lungs.nii.gz").dataobj),
                                  np.asarray(nib.load(torch_out / "lungs.nii.gz").dataobj))
    a, b = (np.asarray(nib.load(o / "infection.nii.gz").dataobj) > 0 for o in (torch_out, out))
    assert a.any()
    assert 2.0 * (a & b).sum() / (a.sum() + b.sum()) >= PARITY_MIN_DICE


def test_slicer_segmentation_holds_the_masks(case: dict[str, Path]) -> None:
    nrrd = pytest.importorskip("nrrd")
    data, header = nrrd.read(str(case["out"] / "segmentation.seg.nrrd"))
    lungs = np.asarray(nib.load(case["out"] / "lungs.nii.gz").dataobj)
    inf = np.asarray(nib.load(case["out"] / "infection.nii.gz").dataobj)
    assert data.shape == (2, *lungs.shape)  # layers (lungs, infection), then the file's own voxel order
    np.testing.assert_array_equal(data[0], lungs)
    np.testing.assert_array_equal(data[1] > 0, inf > 0)
    names = {header[f"Segment{i}_Name"] for i in range(3)}
    assert len(names) == 3


# --------------------------------------------------------------------------------------------- cohort (issue 9)

COHORT_CASES = 6
COHORT_TIMEOUT_S = 120


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_segment(cases_file: Path, out: Path, ckpt: Path) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                        "SLURM_JOB_ID", "COVIDSEG_JOB_ID")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "covidseg", "segment", str(cases_file), "-o", str(out),
           "--checkpoint", str(ckpt), "--threads", "1", "--set", f"inference.window={WINDOW}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=COHORT_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_torchrun_cohort_segments_each_case_once_and_a_rerun_does_nothing(case: dict[str, Path]) -> None:
    """Issue 9's acceptance: 2 processes, 6 phantom cases, 6 results written once each and a summary; the same
    command again does no work."""
    import csv

    from covidseg.inference.cohort import STATUS_DIR, read_status, status_path

    inputs = case["root"] / "cohort_in"
    inputs.mkdir()
    data = case["ct"].read_bytes()
    cases = []
    for i in range(COHORT_CASES):
        path = inputs / f"p{i}.nii.gz"
        path.write_bytes(data)
        cases.append(path)
    cases_file = case["root"] / "cases.txt"
    cases_file.write_text("\n".join(p.name for p in cases) + "\n")  # relative to the list's folder
    cases_file.rename(inputs / "cases.txt")
    cases_file = inputs / "cases.txt"
    out = case["root"] / "cohort_out"

    _torchrun_segment(cases_file, out, case["ckpt"])
    ids = [f"p{i}" for i in range(COHORT_CASES)]
    status = {c: read_status(status_path(out, c)) for c in ids}
    assert all(s is not None and s["status"] == "done" for s in status.values())
    assert {s["rank"] for s in status.values() if s} == {0, 1}
    markers = [read_status(out / STATUS_DIR / f"rank-{r}-of-2.json") for r in range(2)]
    attempts = {c: a for m in markers if m for c, a in m["attempts"].items()}
    assert sorted(attempts) == ids and all(attempts[c] == status[c]["attempt"] for c in ids)  # once each
    stamps = {}
    for c in ids:
        for name in ("lungs.nii.gz", "infection.nii.gz", "segmentation.seg.nrrd", "report.json"):
            stamps[c, name] = (out / c / name).stat().st_mtime_ns
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["case_id"] for r in rows) == ids and {r["status"] for r in rows} == {"done"}
    assert all(float(r["both_lung_ml"]) > 0 for r in rows)

    second = _torchrun_segment(cases_file, out, case["ckpt"])
    assert "0 of 3 case(s) segmented" in second and "3 already done" in second
    for c in ids:
        assert read_status(status_path(out, c))["attempt"] == status[c]["attempt"]  # type: ignore[index]
        for name in ("lungs.nii.gz", "infection.nii.gz", "segmentation.seg.nrrd", "report.json"):
            assert (out / c / name).stat().st_mtime_ns == stamps[c, name]


@pytest.mark.parametrize("net_input, lung_model", [("lung_only", False), ("original", False), ("lung_only", True)])
def test_segment_image_feeds_the_network_what_training_feeds_it(case: dict[str, Path], tmp_path: Path,
                                                               net_input: str, lung_model: bool) -> None:
    """The probabilities equal ``predict_volume`` on the whole-volume input built as training builds it (the
    pipeline builds a lung-only input over the lungs' box only, and skips the normalised CT when it needs none)."""
    from covidseg.inference.case import CaseSegmentation, segment_image
    from covidseg.inference.pipeline import SegmentOptions, load_stages
    from covidseg.inference.sliding_window import mask_box, predict_volume
    from covidseg.intensity import lung_only, normalize
    from covidseg.io.image import read_image

    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(base_width=4))
    cfg.train.input = net_input  # type: ignore[assignment]
    model = create_model(cfg.model)
    with torch.no_grad():
        model.head.bias.fill_(0.3)
    ckpt = save_checkpoint(tmp_path / "inf.pt", model, cfg, target="infection")
    lungs_opt = "classic"
    if lung_model:  # a random lung model whose head says "left lung" everywhere
        lcfg = Config(model=ModelConfig(base_width=4, out_channels=2))
        lmodel = create_model(lcfg.model)
        with torch.no_grad():
            lmodel.head.bias.copy_(torch.tensor([8.0, -8.0]))
        lungs_opt = str(save_checkpoint(tmp_path / "lung.pt", lmodel, lcfg, target="lung"))
    run_cfg = Config()
    run_cfg.inference.window = (8, 32, 32)
    run_cfg.runtime.bf16 = "off"
    stages = load_stages(SegmentOptions(checkpoint=ckpt, lungs=lungs_opt), run_cfg, "cpu")
    image = read_image(case["ct"])
    seg = segment_image(image, stages)
    assert isinstance(seg, CaseSegmentation)

    lung = seg.lungs > 0
    assert lung.any()
    assert seg.lung_method == ("classical" if not lung_model else f"model {lungs_opt}")
    intensity = cfg.intensity  # the checkpoint's own
    normalized = normalize(image.array, intensity)
    x = lung_only(normalized, seg.lungs, intensity) if net_input == "lung_only" else normalized
    margin = tuple(int(np.ceil(run_cfg.inference.box_margin_mm / s)) for s in image.spacing)
    box = mask_box(lung, margin)
    assert seg.box == box and box is not None
    expected = predict_volume(model.eval(), x, run_cfg.inference, box=box, mask=lung,
                              runtime=run_cfg.runtime)[0]
    np.testing.assert_array_equal(seg.probability, expected)
    threshold = run_cfg.inference.threshold
    np.testing.assert_array_equal(seg.infection, ((expected >= threshold) & lung).astype(np.uint8))
    assert seg.outside_ml == pytest.approx(((expected >= threshold) & ~lung).sum() * image.voxel_volume_ml)
