"""`covidseg segment` with the shipped 2D model (no --checkpoint), and how build_stages picks the infection stage."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from covidseg.checkpoint import SLICE_TASK, default_checkpoint, resolve_checkpoint, save_checkpoint
from covidseg.cli.main import run as cli
from covidseg.config import Config, ModelConfig, SemisegConfig
from covidseg.inference.backends import load_model
from covidseg.inference.stages import (
    PreparedCT,
    SliceInfection,
    SlidingWindowInfection,
    build_stages,
    drop_small_components,
    is_slice_model,
)
from covidseg.models import create_model
from covidseg.phantom import make_phantom
from covidseg.semiseg.train import save_semiseg_checkpoint
from covidseg.training.slices import build_model

SCALE = 0.15
"""Phantom scale: about 77x77 pixels and 40 slices."""


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    return int(exc.value.code or 0)


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("default")
    ph = make_phantom("coronacases", seed=1, scale=SCALE)
    ct = root / "case_a.nii.gz"
    nib.save(nib.Nifti1Image(ph.stored_ct(), ph.affine), ct)
    return ct


@pytest.fixture(scope="module")
def default_out(phantom_ct: Path) -> Path:
    out = phantom_ct.parent / "out_default"
    assert _run(["segment", str(phantom_ct), "-o", str(out), "--probability"]) == 0
    return out


def _slice_checkpoint(path: Path, bias: float = 2.0) -> Path:
    """A tiny random 2D model saved as ``covidseg semiseg train`` saves one (meta task, input size, threshold)."""
    cfg = SemisegConfig(size=(32, 32), base_width=4, depth=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # a bias so that the masks are not trivially empty
        model.head.bias.fill_(bias)  # type: ignore[union-attr]
    return save_semiseg_checkpoint(path, model, cfg, half=False)


def test_no_checkpoint_runs_the_shipped_model(phantom_ct: Path, default_out: Path) -> None:
    src = nib.load(phantom_ct)
    for name in ("lungs.nii.gz", "infection.nii.gz", "probability.nii.gz", "report.json", "overview.png"):
        assert (default_out / name).is_file()
    inf = np.asarray(nib.load(default_out / "infection.nii.gz").dataobj)
    lungs = np.asarray(nib.load(default_out / "lungs.nii.gz").dataobj)
    assert inf.shape == src.shape[:3]
    assert not inf[lungs == 0].any()
    report = json.loads((default_out / "report.json").read_text(encoding="utf-8"))
    model, inference = report["model"], report["inference"]
    assert model["name"] == "unet-fv-paspp-ds-2d"
    assert model["checkpoint"].startswith("default (shipped)")
    assert model["task"] == SLICE_TASK and "not a medical device" in model["use"]
    assert inference["runner"] == "slices" and inference["flip_tta"] == "all"
    assert inference["threshold"] == pytest.approx(0.5) and inference["slices_run"] > 0
    assert report["lung_findings"]["found"] is True  # the classical lung stage's findings reach the report
    assert report["lungs"]["both"]["infection_ml"] == pytest.approx(
        float(((lungs > 0) & (inf > 0)).sum()) * report["voxel_volume_ml"])


def test_checkpoint_default_is_the_same_model(phantom_ct: Path, default_out: Path) -> None:
    out = phantom_ct.parent / "out_named_default"
    assert _run(["segment", str(phantom_ct), "-o", str(out), "--checkpoint", "default"]) == 0
    for name in ("lungs.nii.gz", "infection.nii.gz"):
        a = np.asarray(nib.load(default_out / name).dataobj)
        b = np.asarray(nib.load(out / name).dataobj)
        np.testing.assert_array_equal(a, b)
    assert resolve_checkpoint(None) == resolve_checkpoint("default") == default_checkpoint()
    assert resolve_checkpoint("x.pt") == Path("x.pt")


def test_build_stages_picks_the_runner_from_the_checkpoint(tmp_path: Path) -> None:
    config = Config()
    slice_model = load_model(_slice_checkpoint(tmp_path / "slices.pt"))
    assert is_slice_model(slice_model)
    stage = build_stages(slice_model, None, config, "cpu").infection
    assert isinstance(stage, SliceInfection)
    assert not stage.describe()["model"]["checkpoint"].startswith("default")
    for dims in (3, 2):  # covidseg train checkpoints, 3D or 2D, stay in sliding windows
        mc = ModelConfig(base_width=4) if dims == 3 else ModelConfig(name="unet-2d", spatial_dims=2, base_width=4)
        path = save_checkpoint(tmp_path / f"train{dims}d.pt", create_model(mc), Config(model=mc), target="infection")
        loaded = load_model(path)
        assert not is_slice_model(loaded)
        assert isinstance(build_stages(loaded, None, config, "cpu").infection, SlidingWindowInfection)
    shipped = build_stages(load_model(default_checkpoint()), None, config, "cpu").infection
    assert isinstance(shipped, SliceInfection) and shipped.describe()["model"]["checkpoint"].startswith("default")


def test_slice_stage_stays_in_the_lungs_box_and_drops_specks(tmp_path: Path) -> None:
    model = load_model(_slice_checkpoint(tmp_path / "slices.pt", bias=4.0))  # probability ~1 everywhere it runs
    hu = np.full((20, 48, 48), 40.0, np.float32)
    lungs = np.zeros(hu.shape, np.uint8)
    lungs[5:15, 10:30, 8:20] = 2
    lungs[5:15, 10:30, 28:40] = 1
    hu[lungs > 0] = -850.0
    ct = PreparedCT(hu=hu, spacing=(2.0, 1.0, 1.0), path=tmp_path / "ct.nii.gz", convention="hu")
    stage = SliceInfection(model, "cpu", min_component_ml=0.0)
    found = stage.predict(ct, lungs)
    assert found.box is not None
    assert found.box[0] == slice(5, 15)
    outside = np.ones(hu.shape, bool)
    outside[found.box] = False
    assert not found.probability[outside].any()
    assert (found.probability[lungs > 0] >= stage.threshold).all()
    # a component of 10 x 20 x 12 voxels (4.8 mL per lung) is dropped with a 5 mL minimum, kept with 4 mL
    assert not (SliceInfection(model, "cpu", min_component_ml=5.0).predict(ct, lungs).probability[lungs > 0]
                >= 0.5).any()
    assert (SliceInfection(model, "cpu", min_component_ml=4.0).predict(ct, lungs).probability[lungs > 0]
            >= 0.5).all()


def test_drop_small_components_matches_scikit_image() -> None:
    morphology = pytest.importorskip("skimage.morphology")
    rng = np.random.default_rng(0)
    mask = rng.random((12, 16, 16)) > 0.8
    for min_voxels in (2, 3, 5, 9):
        expected = morphology.remove_small_objects(mask, max_size=min_voxels - 1, connectivity=3)
        np.testing.assert_array_equal(drop_small_components(mask, min_voxels), expected)


def test_no_lung_is_a_one_line_error_and_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    body = (yy - 24) ** 2 + (xx - 24) ** 2 < 20 ** 2  # a cylinder of soft tissue in air: a body without lungs
    water = np.where(body[None], rng.normal(40.0, 10.0, (24, 48, 48)), -1000.0).astype(np.int16)
    ct = tmp_path / "water.nii.gz"
    nib.save(nib.Nifti1Image(water, np.diag([1.0, 1.0, 2.0, 1.0])), ct)
    out = tmp_path / "out"
    assert _run(["segment", str(ct), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no lung" in err[0] and str(ct) in err[0]
    assert "Traceback" not in err[0]
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
