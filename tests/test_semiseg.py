"""COVID-SemiSeg loader, augmentation, folds, 2D training, checkpoint and the `covidseg semiseg` commands."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from covidseg.config import AugmentConfig, SemisegConfig
from covidseg.errors import ConfigError, InputError
from covidseg.semiseg.data import load_folder, resize_stack
from covidseg.semiseg.train import cross_validate, make_folds, predict_slices, save_semiseg_checkpoint
from covidseg.training.augment import (
    AugmentParams,
    SliceAugment,
    affine_theta,
    apply_params,
    draw_params,
    gaussian_blur,
)
from covidseg.training.slices import train_model

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "covid-semiseg" / "train"
TINY = dict(size=(32, 32), base_width=4, depth=2, epochs=1, batch_size=2, amp="off", device="cpu")
"""Settings small enough for a CPU test (seconds)."""


def write_folder(root: Path, n: int = 4, multiclass: bool = True, seed: int = 0) -> Path:
    """A COVID-SemiSeg-layout folder of ``n`` small synthetic slices of varying sizes."""
    rng = np.random.default_rng(seed)
    for sub in ("Imgs", "GT") + (("GT-multiclass",) if multiclass else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = 30 + 3 * i, 36 + 2 * i
        img = (rng.random((h, w)) * 120).astype(np.uint8)
        gt = np.zeros((h, w), np.uint8)
        gt[5:15 + i, 8:20] = 255
        img[gt > 0] += 100  # a bright lesion
        Image.fromarray(img).save(root / "Imgs" / f"{i}.jpg")
        Image.fromarray(gt).save(root / "GT" / f"{i}.png")
        if multiclass:
            Image.fromarray((gt > 0).astype(np.uint8) * (1 + i % 2)).save(root / "GT-multiclass" / f"{i}.png")
    return root


# --------------------------------------------------------------------------------------------- loader


def test_loader_pairs_by_stem_in_natural_order(tmp_path: Path) -> None:
    root = write_folder(tmp_path, n=3)
    (root / "Imgs" / "2.jpg").rename(root / "Imgs" / "10.jpg")
    (root / "GT" / "2.png").rename(root / "GT" / "10.png")
    (root / "GT-multiclass" / "2.png").rename(root / "GT-multiclass" / "10.png")
    (root / "Imgs" / ".DS_Store").write_bytes(b"junk")
    slices = load_folder(root)
    assert [s.name for s in slices] == ["0", "1", "10"]
    s = slices[1]
    assert s.image.dtype == np.float32 and 0.0 <= s.image.min() and s.image.max() <= 1.0
    assert s.mask.dtype == np.uint8 and set(np.unique(s.mask)) == {0, 1}
    assert s.shape == (33, 38) and s.mask.shape == s.shape
    assert s.multiclass is not None and set(np.unique(s.multiclass)) == {0, 2}
    assert int(s.mask.sum()) == (15 + 1 - 5) * 12


def test_loader_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="folder not found"):
        load_folder(tmp_path / "missing")
    with pytest.raises(InputError, match="no Imgs/"):
        load_folder(tmp_path)
    root = write_folder(tmp_path / "a", n=2, multiclass=False)
    (root / "GT" / "1.png").unlink()
    with pytest.raises(InputError, match=r"Imgs/1\.jpg: no matching mask"):
        load_folder(root)
    root = write_folder(tmp_path / "b", n=2, multiclass=False)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "GT" / "7.png")
    with pytest.raises(InputError, match=r"GT/7\.png: no matching slice"):
        load_folder(root)
    root = write_folder(tmp_path / "c", n=2, multiclass=False)
    (root / "Imgs" / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match=r"Imgs/0\.jpg: not a readable image"):
        load_folder(root)
    root = write_folder(tmp_path / "d", n=2, multiclass=False)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "GT" / "0.png")
    with pytest.raises(InputError, match=r"GT/0\.png: mask size 5x5 differs"):
        load_folder(root)
    root = write_folder(tmp_path / "e", n=2, multiclass=True)
    (root / "GT-multiclass" / "1.png").unlink()
    with pytest.raises(InputError, match="GT-multiclass/ and Imgs/ do not hold the same slices"):
        load_folder(root)


def test_resize_stack(tmp_path: Path) -> None:
    slices = load_folder(write_folder(tmp_path, n=3))
    images, masks = resize_stack(slices, (32, 48))
    assert images.shape == masks.shape == (3, 1, 32, 48)
    assert images.dtype == torch.float32 and set(torch.unique(masks).tolist()) <= {0.0, 1.0}
    assert masks.sum() > 0


@pytest.mark.skipif(not REAL.is_dir(), reason=f"COVID-SemiSeg slices not present at {REAL}")
def test_real_folder_and_pinned_folds() -> None:
    slices = load_folder(REAL)
    assert len(slices) == 50
    assert all(s.multiclass is not None for s in slices)
    assert all(s.mask.any() for s in slices)  # every training slice holds infection
    folds = make_folds(len(slices), 5, seed=0)
    names = [[slices[i].name for i in fold] for fold in folds]
    assert names[0] == ["2", "3", "4", "25", "27", "30", "31", "33", "43", "45"]
    assert names[4] == ["5", "11", "19", "20", "37", "40", "42", "49", "51", "67"]


# --------------------------------------------------------------------------------------------- folds


def test_folds_are_seeded_and_pinned() -> None:
    folds = make_folds(50, 5, seed=0)
    assert folds[0] == [2, 3, 4, 18, 20, 23, 24, 26, 34, 36]
    assert folds[4] == [5, 7, 14, 15, 29, 31, 33, 39, 41, 49]
    assert sorted(i for f in folds for i in f) == list(range(50))
    assert [len(f) for f in make_folds(7, 3, seed=1)] == [3, 2, 2]
    assert make_folds(50, 5, seed=1) != folds
    with pytest.raises(ConfigError, match="--folds 1"):
        make_folds(50, 1)


# --------------------------------------------------------------------------------------------- augmentation


def _batch(seed: int = 0, b: int = 2, n: int = 33) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 1, n, n, generator=g)
    masks = (torch.rand(b, 1, n, n, generator=g) > 0.7).float()
    return images, masks


def test_identity_params_leave_the_batch_unchanged() -> None:
    images, masks = _batch()
    out, out_m = apply_params(images, masks, AugmentParams.identity(2))
    assert torch.allclose(out, images, atol=1e-5)
    assert torch.equal(out_m, masks)


def test_flips_and_quarter_turn_are_exact() -> None:
    images, masks = _batch()
    p = AugmentParams.identity(2)
    p.flip_h = torch.tensor([True, False])
    p.flip_v = torch.tensor([False, True])
    out, out_m = apply_params(images, masks, p)
    assert torch.allclose(out[0], images[0].flip(-1), atol=1e-5)
    assert torch.allclose(out[1], images[1].flip(-2), atol=1e-5)
    assert torch.equal(out_m[0], masks[0].flip(-1))
    q = AugmentParams.identity(2)
    q.angle = torch.full((2,), math.pi / 2)
    out, out_m = apply_params(images, masks, q)
    assert torch.allclose(out, torch.rot90(images, 1, dims=(2, 3)), atol=1e-5)
    assert torch.equal(out_m, torch.rot90(masks, 1, dims=(2, 3)))


def test_affine_matches_scipy_reference() -> None:
    images, _ = _batch(n=33)
    p = AugmentParams.identity(1)
    p.angle, p.zoom, p.flip_h = torch.tensor([0.3]), torch.tensor([1.2]), torch.tensor([True])
    out, _ = apply_params(images[:1], None, p)
    a = affine_theta(p)[0, :, :2].numpy().astype(np.float64)  # (x, y) -> (x, y), x = column
    m = np.array([[a[1, 1], a[1, 0]], [a[0, 1], a[0, 0]]])  # the same map in (row, column)
    centre = np.array([16.0, 16.0])
    ref = ndimage.affine_transform(images[0, 0].double().numpy(), m, offset=centre - m @ centre, order=1,
                                   mode="constant", cval=0.0)
    inner = (slice(4, -4), slice(4, -4))  # the borders differ only in how "outside" is blended
    assert np.allclose(out[0, 0].numpy()[inner], ref[inner], atol=1e-5)


def test_gamma_matches_monai() -> None:
    monai_transforms = pytest.importorskip("monai.transforms")
    images, _ = _batch(b=1)
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 0.0, 1.0  # MONAI rescales by the image's own range
    p = AugmentParams.identity(1)
    p.gamma = torch.tensor([1.4])
    out, _ = apply_params(images, None, p)
    ref = monai_transforms.AdjustContrast(gamma=1.4)(images[0])
    assert torch.allclose(out[0], torch.as_tensor(ref), atol=1e-5)


def test_augmentation_is_seeded_and_replayable() -> None:
    images, masks = _batch(b=4)
    a1, a2, a3 = SliceAugment(seed=3), SliceAugment(seed=3), SliceAugment(seed=4)
    x1, y1 = a1(images, masks)
    x2, y2 = a2(images, masks)
    x3, _ = a3(images, masks)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert a1.last_params is not None
    xr, yr = apply_params(images, masks, a1.last_params)
    assert torch.equal(xr, x1) and torch.equal(yr, y1)
    assert 0.0 <= float(x1.min()) and float(x1.max()) <= 1.0
    assert set(torch.unique(y1).tolist()) <= {0.0, 1.0}
    off = SliceAugment(AugmentConfig(flip_h=0, flip_v=0, p_affine=0, p_intensity=0), seed=0)
    xo, yo = off(images, masks)
    assert torch.allclose(xo, images, atol=1e-5) and torch.equal(yo, masks)


def test_noise_and_kernel_are_off_by_default_and_draw_nothing() -> None:
    params = draw_params(4, AugmentConfig(), torch.Generator().manual_seed(0))
    assert params.noise_std is None and params.kernel_amount is None
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    draw_params(4, AugmentConfig(), g1)
    draw_params(4, AugmentConfig(p_noise=1.0, p_kernel=1.0), g2)
    # the usual draws come first and are the same; only the switched-on ones draw more
    assert not torch.equal(g1.get_state(), g2.get_state())
    a = draw_params(4, AugmentConfig(), torch.Generator().manual_seed(5))
    b = draw_params(4, AugmentConfig(p_noise=1.0, p_kernel=1.0), torch.Generator().manual_seed(5))
    assert torch.equal(a.angle, b.angle) and torch.equal(a.gamma, b.gamma)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_gaussian_blur_matches_scipy(sigma: float) -> None:
    images, _ = _batch(b=2, n=33)
    out = gaussian_blur(images, torch.tensor([sigma, 1.0]))
    ref = ndimage.gaussian_filter(images[0, 0].double().numpy(), sigma, mode="mirror", truncate=3.0)
    assert np.allclose(out[0, 0].numpy(), ref, atol=1e-5)


def test_noise_is_replayed_and_has_its_std() -> None:
    images = torch.full((3, 1, 64, 64), 0.5)
    p = AugmentParams.identity(3)
    p.noise_std = torch.tensor([0.0, 0.02, 0.05])
    p.noise_seed = torch.tensor([1, 2, 3])
    out, _ = apply_params(images, None, p)
    again, _ = apply_params(images, None, p)
    assert torch.equal(out, again)
    assert torch.equal(out[0], images[0])
    assert abs(float((out[1] - 0.5).std()) - 0.02) < 0.003
    assert abs(float((out[2] - 0.5).std()) - 0.05) < 0.006


def test_kernel_sharpens_and_softens() -> None:
    images, _ = _batch(b=3, n=48)
    p = AugmentParams.identity(3)
    p.kernel_amount = torch.tensor([0.0, 2.0, -1.0])
    p.kernel_sigma = torch.tensor([1.0, 1.0, 1.0])
    images = images * 0.5 + 0.25  # room for the overshoot before the [0, 1] clip
    out, _ = apply_params(images, None, p)
    blur = gaussian_blur(images, torch.ones(3))
    assert torch.allclose(out[0], images[0], atol=1e-5)
    assert torch.allclose(out[2], blur[2], atol=1e-5)  # amount -1: the blur itself
    detail = (images[1] - blur[1]).abs().mean()
    assert float((out[1] - gaussian_blur(out[1:2], torch.ones(1))[0]).abs().mean()) > 2.0 * float(detail)


def test_bad_augment_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="p_noise"):
        SliceAugment(AugmentConfig(p_noise=1.5))
    with pytest.raises(ConfigError, match="kernel_sigma"):
        SliceAugment(AugmentConfig(p_kernel=0.5, kernel_sigma=(0.0, 1.0)))


def test_augmentation_with_noise_and_kernel_is_seeded_and_replayable() -> None:
    images, masks = _batch(b=4)
    cfg = AugmentConfig(p_noise=1.0, p_kernel=1.0)
    a1, a2 = SliceAugment(cfg, seed=3), SliceAugment(cfg, seed=3)
    x1, y1 = a1(images, masks)
    x2, _ = a2(images, masks)
    assert torch.equal(x1, x2)
    assert a1.last_params is not None
    xr, yr = apply_params(images, masks, a1.last_params)
    assert torch.equal(xr, x1) and torch.equal(yr, y1)
    plain, _ = SliceAugment(seed=3)(images, masks)
    assert not torch.equal(plain, x1)


# --------------------------------------------------------------------------------------------- training


def test_training_is_deterministic_and_cv_scores(tmp_path: Path) -> None:
    slices = load_folder(write_folder(tmp_path, n=4))
    cfg = SemisegConfig(variant="unet-fv-paspp-ds-2d", **TINY)
    images, masks = resize_stack(slices, cfg.size)
    device = torch.device("cpu")
    m1 = train_model(images, masks, cfg, device, progress=False)
    m2 = train_model(images, masks, cfg, device, progress=False)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    probs = predict_slices(m1, slices, cfg.size, device)
    assert [p.shape for p in probs] == [s.shape for s in slices]  # back at each GT's size
    assert all(0.0 <= p.min() and p.max() <= 1.0 for p in probs)
    # flip TTA: the mean of the mirrorings' logits, resized back as one map
    mirrored = [dataclasses.replace(s, image=s.image[::-1, ::-1].copy()) for s in slices]
    lr, every = (predict_slices(m1, slices, cfg.size, device, flip_tta=t) for t in ("lr", "all"))
    assert all(np.isfinite(p).all() and 0.0 <= p.min() and p.max() <= 1.0 for p in lr + every)
    for p, q in zip(every, predict_slices(m1, mirrored, cfg.size, device, flip_tta="all"), strict=True):
        np.testing.assert_allclose(p, q[::-1, ::-1], atol=1e-5)  # the four mirrorings are a symmetric set
    folds_seen: list[int] = []
    cv = cross_validate(slices, SemisegConfig(variant="unet-2d", folds=2, **TINY), device, progress=False,
                        on_fold=lambda f: folds_seen.append(f["fold"]))
    assert folds_seen == [0, 1] and len(cv["folds"]) == 2
    assert sorted(n for f in cv["folds"] for n in f["test"]) == ["0", "1", "2", "3"]
    for key in ("mean_dice_infnet", "dice_at_0_5", "iou", "sensitivity", "specificity", "precision"):
        assert 0.0 <= cv["mean"][key] <= 1.0 and cv["sd"][key] >= 0.0
    with pytest.raises(ConfigError, match="2D variant"):
        train_model(images, masks, SemisegConfig(variant="unet", **TINY), device, progress=False)


def test_a_2d_run_is_its_batch_source_and_the_shared_step(tmp_path: Path) -> None:
    """One epoch of one batch of train_model gives the weights of the 3D trainer's step (training.loop) on the
    first batch of SliceBatches, with the same seed: the 2D trainer adds no step of its own."""
    from covidseg.training.loop import make_engine, train_step
    from covidseg.training.slices import SliceBatches, build_model

    cfg = SemisegConfig(variant="unet-fv-paspp-ds-2d", **{**TINY, "batch_size": 4})
    images, masks = resize_stack(load_folder(write_folder(tmp_path, n=4)), cfg.size)
    cpu = torch.device("cpu")
    trained = train_model(images, masks, cfg, cpu, progress=False)  # 1 epoch = 1 step of 4 slices
    torch.manual_seed(cfg.seed)
    engine = make_engine(build_model(cfg), cpu, spatial_dims=2, learning_rate=cfg.learning_rate, amp="off",
                         bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight)
    engine.net.train()
    x, y = SliceBatches(images, masks, None, cfg, cfg.seed, cpu).batch(0)
    train_step(engine, x, y)
    for k, v in trained.state_dict().items():
        assert torch.equal(v, engine.model.state_dict()[k]), k
    other = make_engine(build_model(cfg), cpu, spatial_dims=2, learning_rate=cfg.learning_rate, amp="off",
                        bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight)  # other weights: the check can fail
    assert not all(torch.equal(v, other.model.state_dict()[k]) for k, v in trained.state_dict().items()
                   if v.is_floating_point())


class _Ramps(torch.nn.Module):
    """Logit = the input plus a ramp along the rows and one along the columns: each mirror changes the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.linspace(-1.0, 1.0, x.shape[-2]).view(-1, 1) + torch.linspace(-2.0, 2.0, x.shape[-1])


def test_cv_prediction_averages_the_mirrorings_logits(tmp_path: Path) -> None:
    """The cross-validation's ``flip_tta``: ``lr`` the slice and its left-right mirror, ``all`` the four mirrorings
    (at the slice's own size nothing is resized, so the mean of the logits can be written down)."""
    from covidseg.config import FLIP_TTA

    slices = load_folder(write_folder(tmp_path, n=1))
    x = torch.from_numpy(np.stack([s.image for s in slices]))[:, None]
    model, size = _Ramps(), slices[0].shape
    logits = [model(x)] + [torch.flip(model(torch.flip(x, d)), d) for d in FLIP_TTA["all"]]
    for tta, n in (("off", 1), ("lr", 2), ("all", 4)):
        want = torch.sigmoid(sum(logits[:n]) / n)[:, 0].numpy()
        got = np.stack(predict_slices(model, slices, size, torch.device("cpu"), amp="off", flip_tta=tta))
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=tta)


def test_checkpoint_roundtrip_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from covidseg.cli.main import run as cli
    from covidseg.semiseg.evaluate import evaluate_folder, load_semiseg_model

    root = write_folder(tmp_path / "data", n=3)
    slices = load_folder(root)
    cfg = SemisegConfig(variant="unet-fv-se-2d", **TINY)
    images, masks = resize_stack(slices, cfg.size)
    model = train_model(images, masks, cfg, torch.device("cpu"), progress=False)
    ckpt = save_semiseg_checkpoint(tmp_path / "m.pt", model, cfg)
    loaded, meta = load_semiseg_model(ckpt, torch.device("cpu"))
    assert meta["input_size"] == [32, 32] and meta["weights_dtype"] == "float16"
    assert next(loaded.parameters()).dtype == torch.float32
    p_orig = predict_slices(model, slices, cfg.size, torch.device("cpu"))
    p_load = predict_slices(loaded, slices, cfg.size, torch.device("cpu"))
    assert all(np.allclose(a, b, atol=2e-2) for a, b in zip(p_orig, p_load, strict=True))  # fp16 weights

    result = evaluate_folder(ckpt, root, device="cpu")
    assert result["n_images"] == 3 and len(result["per_image"]) == 3
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exc:
        cli(["semiseg", "evaluate", "--checkpoint", str(ckpt), "--data", str(root), "--json", str(out),
             "--device", "cpu"])
    assert exc.value.code in (0, None)
    data = json.loads(out.read_text(encoding="utf-8"))
    for key in ("n_images", "mean_dice_infnet", "dice_at_0_5", "iou", "sensitivity", "specificity", "precision"):
        assert key in data
    assert data["mean_dice_infnet"] == pytest.approx(result["mean_dice_infnet"])
    assert [r["name"] for r in data["per_image"]] == ["0", "1", "2"]
    assert "mean_dice_infnet" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exc:
        cli(["semiseg", "evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(root),
             "--json", str(out)])
    assert exc.value.code == 2
    assert "checkpoint not found" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        cli(["semiseg", "train", "--data", str(root), "--out", str(tmp_path / "run"), "--augment-kernel", "1.5"])
    assert exc.value.code == 2
    assert "--augment-kernel 1.5: a probability" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_train_smoke(tmp_path: Path) -> None:
    from covidseg.cli.main import run as cli

    root = write_folder(tmp_path / "data", n=4)
    run_dir = tmp_path / "run"
    args = ["semiseg", "train", "--data", str(root), "--out", str(run_dir), "--folds", "2", "--epochs", "1",
            "--variant", "unet-2d", "--device", "cpu", "--base-width", "4", "--batch-size", "2", "--size", "32"]
    with pytest.raises(SystemExit) as exc:
        cli(args)
    assert exc.value.code in (0, None)
    cv = json.loads((run_dir / "cv.json").read_text(encoding="utf-8"))
    assert len(cv["folds"]) == 2 and (run_dir / "final.pt").is_file()
    assert json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["config"]["variant"] == "unet-2d"
    with pytest.raises(SystemExit) as exc:
        cli(args)
    assert exc.value.code == 2  # the run folder is not overwritten without --force


def test_default_checkpoint_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import covidseg.checkpoint as ckpt
    import covidseg.semiseg.evaluate as ev

    monkeypatch.setattr(ckpt, "DEFAULT_WEIGHTS", "does-not-exist.pt")
    with pytest.raises(InputError, match="shipped COVID-SemiSeg model is not in this copy"):
        ev.default_checkpoint()


@pytest.mark.skipif(not REAL.is_dir(), reason=f"COVID-SemiSeg slices not present at {REAL}")
def test_shipped_default_model_evaluates_real_slices(tmp_path: Path) -> None:
    """The shipped weights load and segment real slices (4 of the slices it was trained on: a regression check of
    the file and the evaluation path, not a result)."""
    import shutil

    from covidseg.semiseg.evaluate import default_checkpoint, evaluate_folder

    sub = tmp_path / "subset"
    for kind, ext in (("Imgs", ".jpg"), ("GT", ".png")):
        (sub / kind).mkdir(parents=True)
        for stem in ("0", "1", "2", "3"):
            shutil.copy(REAL / kind / f"{stem}{ext}", sub / kind / f"{stem}{ext}")
    result = evaluate_folder(default_checkpoint(), sub, device="cpu")
    assert result["n_images"] == 4
    assert 0.5 < result["mean_dice_infnet"] <= 1.0


@pytest.mark.skipif(not REAL.is_dir(), reason=f"COVID-SemiSeg slices not present at {REAL}")
def test_cli_scores_the_default_model_without_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``covidseg semiseg evaluate --checkpoint default --data DIR`` prints the table; no file is written."""
    import shutil

    from covidseg.cli.main import run as cli

    sub = tmp_path / "subset"
    for kind, ext in (("Imgs", ".jpg"), ("GT", ".png")):
        (sub / kind).mkdir(parents=True)
        for stem in ("0", "1"):
            shutil.copy(REAL / kind / f"{stem}{ext}", sub / kind / f"{stem}{ext}")
    with pytest.raises(SystemExit) as exc:
        cli(["semiseg", "evaluate", "--checkpoint", "default", "--data", str(sub), "--device", "cpu"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "mean_dice_infnet" in out and "semiseg-2d.pt" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subset"]

