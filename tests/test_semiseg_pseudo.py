"""Pseudo-labelled slices: their loader, pretraining -> fine-tuning, resumable training, and their place in CV."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from covidseg.config import SemisegConfig
from covidseg.errors import InputError
from covidseg.semiseg.data import load_folder, load_pseudo_folder, pseudo_case, resize_stack
from covidseg.semiseg.train import cross_validate, pretrain
from covidseg.training.slices import SliceBatches, build_model, train_model

PSEUDO = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "covid-semiseg" / "pseudo"
TINY = dict(size=(32, 32), base_width=4, depth=2, epochs=2, batch_size=4, amp="off", device="cpu",
            pretrain_epochs=1, pseudo_per_batch=2)
"""Settings small enough for a CPU test (seconds)."""
CPU = torch.device("cpu")


def write_pseudo(root: Path, cases: dict[str, int], seed: int = 0) -> Path:
    """A pseudo-labelled folder: ``Imgs/Data-1_<case>_<k>.jpg`` + ``GT/Data-1_<case>_<k>.png`` of noise + a blob."""
    rng = np.random.default_rng(seed)
    (root / "Imgs").mkdir(parents=True)
    (root / "GT").mkdir()
    for case, count in cases.items():
        for k in range(1, count + 1):
            h, w = 28 + k, 34
            img = (rng.random((h, w)) * 100).astype(np.uint8)
            gt = np.zeros((h, w), np.uint8)
            gt[4:10 + k, 6:16] = 255
            img[gt > 0] += 120
            Image.fromarray(img).save(root / "Imgs" / f"Data-1_{case}_{k}.jpg")
            Image.fromarray(gt).save(root / "GT" / f"Data-1_{case}_{k}.png")
    return root


def write_labelled(root: Path, n: int) -> Path:
    """A labelled folder ``Imgs/N.jpg`` + ``GT/N.png`` of ``n`` synthetic slices."""
    rng = np.random.default_rng(1)
    (root / "Imgs").mkdir(parents=True)
    (root / "GT").mkdir()
    for i in range(n):
        img = (rng.random((30, 36)) * 100).astype(np.uint8)
        gt = np.zeros((30, 36), np.uint8)
        gt[8:20, 10:18 + i] = 255
        img[gt > 0] += 120
        Image.fromarray(img).save(root / "Imgs" / f"{i}.jpg")
        Image.fromarray(gt).save(root / "GT" / f"{i}.png")
    return root


def test_pseudo_loader_orders_by_case_then_slice_number(tmp_path: Path) -> None:
    root = write_pseudo(tmp_path / "p", {"radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm": 2,
                                         "coronacases_org_001": 11})
    slices = load_pseudo_folder(root)
    names = [s.name for s in slices]
    assert names[:3] == ["Data-1_coronacases_org_001_1", "Data-1_coronacases_org_001_2",
                         "Data-1_coronacases_org_001_3"]
    assert names[10] == "Data-1_coronacases_org_001_11"  # numerically, not 1, 10, 11, 2
    assert pseudo_case(names[-1]) == ("radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm", 2)
    s = slices[4]
    assert s.shape == (33, 34) and s.mask.shape == s.shape and int(s.mask.sum()) == (10 + 5 - 4) * 10
    assert s.image.dtype == np.float32 and 0.0 <= s.image.min() and s.image.max() <= 1.0


def test_pseudo_loader_refuses_other_layouts(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"Imgs/0\.jpg: not named Data-1_<case>_<k>"):
        load_pseudo_folder(write_labelled(tmp_path / "l", 2))
    with pytest.raises(InputError, match="not a slice name"):
        pseudo_case("7")
    root = write_pseudo(tmp_path / "p", {"a": 2})
    (root / "GT" / "Data-1_a_2.png").unlink()
    with pytest.raises(InputError, match=r"Data-1_a_2\.jpg: no matching mask"):
        load_pseudo_folder(root)


@pytest.mark.skipif(not PSEUDO.is_dir(), reason="needs ../shared/data/covid-semiseg/pseudo (not in a user's clone)")
def test_pseudo_loader_on_the_real_folder() -> None:
    slices = load_pseudo_folder(PSEUDO)
    assert len(slices) == 1600
    cases = {pseudo_case(s.name)[0] for s in slices}
    assert len(cases) == 20
    assert all(s.mask.shape == s.image.shape for s in slices[::97])


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_pretrain_then_finetune_changes_the_weights(tmp_path: Path) -> None:
    pseudo = resize_stack(load_pseudo_folder(write_pseudo(tmp_path / "p", {"a": 6})), (32, 32))
    images, masks = resize_stack(load_folder(write_labelled(tmp_path / "l", 4)), (32, 32))
    cfg = SemisegConfig(variant="unet-fv-paspp-ds-2d", **TINY)
    torch.manual_seed(cfg.seed + 100)
    fresh = _weights(build_model(cfg))
    pre = pretrain(pseudo, cfg, CPU, progress=False)
    assert any(not torch.equal(pre[k], fresh[k]) for k in fresh if fresh[k].is_floating_point())
    tuned = _weights(train_model(images, masks, cfg, CPU, progress=False, init=pre, pseudo=pseudo))
    assert any(not torch.equal(tuned[k], pre[k]) for k in pre if pre[k].is_floating_point())
    # starting from the pretrained weights is not the same as starting fresh
    scratch = _weights(train_model(images, masks, cfg, CPU, progress=False, pseudo=pseudo))
    assert any(not torch.equal(tuned[k], scratch[k]) for k in pre if pre[k].is_floating_point())


def test_the_pseudo_label_stage_trains_at_its_own_size(tmp_path: Path) -> None:
    from covidseg.errors import ConfigError
    from covidseg.semiseg.train import pretrain_config

    slices = load_pseudo_folder(write_pseudo(tmp_path / "p", {"a": 6}))
    images, masks = resize_stack(load_folder(write_labelled(tmp_path / "l", 4)), (32, 32))
    cfg = SemisegConfig(variant="unet-fv-paspp-ds-2d", **{**TINY, "pretrain_size": (16, 16)})
    stage = pretrain_config(cfg)
    assert stage.size == (16, 16) and stage.pretrain_size is None and stage.pseudo_per_batch == 0
    assert pretrain_config(SemisegConfig(**TINY)).size == (32, 32)  # no pretrain_size: the stage runs at size
    with pytest.raises(ConfigError, match=r"trains at \(16, 16\)"):
        pretrain(resize_stack(slices, (32, 32)), cfg, CPU, progress=False)
    pre = pretrain(resize_stack(slices, (16, 16)), cfg, CPU, progress=False)
    # the same weights fine-tune and predict at 32 x 32 (fully convolutional)
    tuned = train_model(images, masks, cfg, CPU, progress=False, init=pre, pseudo=resize_stack(slices, (32, 32)))
    assert tuned(images[:2]).shape == (2, 1, 32, 32)


def test_each_stage_has_its_own_dice() -> None:
    """``batch_dice`` is the labelled stage's and ``pretrain_batch_dice`` the pseudo-label stage's; either reaches
    the loss the stage trains with."""
    from covidseg.losses import SegmentationLoss
    from covidseg.semiseg.train import pretrain_config
    from covidseg.training.loop import make_engine
    from covidseg.training.slices import build_model

    cfg = SemisegConfig(**{**TINY, "batch_dice": False})
    assert pretrain_config(cfg).batch_dice is True
    assert pretrain_config(dataclasses.replace(cfg, pretrain_batch_dice=False)).batch_dice is False
    for batch_dice in (True, False):
        engine = make_engine(build_model(SemisegConfig(**TINY)), CPU, spatial_dims=2, learning_rate=1e-3,
                             amp="off", bce_weight=0.5, dice_weight=1.0, batch_dice=batch_dice)
        loss = engine.criterion.loss
        assert isinstance(loss, SegmentationLoss) and loss.batch_dice is batch_dice


def test_the_loss_is_the_labelled_stages(tmp_path: Path) -> None:
    """``loss`` reaches the labelled stage's criterion (inside the deep-supervision weighting); the pseudo-label
    stage keeps the report's; a state saved before the setting existed resumes as ``bce-dice``."""
    from covidseg.losses import DeepSupervisionLoss, StructureLoss
    from covidseg.semiseg.train import pretrain_config
    from covidseg.training.loop import make_engine
    from covidseg.training.slices import build_model

    cfg = SemisegConfig(**{**TINY, "loss": "structure"})
    assert pretrain_config(cfg).loss == "bce-dice"
    engine = make_engine(build_model(cfg), CPU, spatial_dims=2, learning_rate=1e-3, amp="off", bce_weight=0.5,
                         dice_weight=1.0, loss=cfg.loss)
    assert isinstance(engine.criterion, DeepSupervisionLoss) and isinstance(engine.criterion.loss, StructureLoss)
    images, masks = resize_stack(load_folder(write_labelled(tmp_path / "l", 4)), (32, 32))
    torch.manual_seed(0)
    init = _weights(build_model(cfg))
    trained = {name: _weights(train_model(images, masks, dataclasses.replace(cfg, loss=name), CPU, progress=False,
                                          init=init)) for name in ("bce-dice", "structure")}
    assert any(not torch.equal(trained["bce-dice"][k], trained["structure"][k]) for k in init
               if init[k].is_floating_point())


class _Killed(Exception):
    """Stands for the process being killed."""


@pytest.mark.parametrize("extra", [{}, {"scales": (0.5, 1.0, 1.5), "ema_decay": 0.8}],
                         ids=["plain", "multiscale-ema"])
def test_resume_continues_to_the_uninterrupted_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      extra: dict) -> None:
    pseudo = resize_stack(load_pseudo_folder(write_pseudo(tmp_path / "p", {"a": 5})), (32, 32))
    images, masks = resize_stack(load_folder(write_labelled(tmp_path / "l", 6)), (32, 32))
    # 3 steps an epoch, 9 in all; with ``extra`` the scale draws and the weight average must be restored too
    cfg = SemisegConfig(variant="unet-fv-paspp-ds-2d", **{**TINY, "epochs": 3, **extra})
    full = _weights(train_model(images, masks, cfg, CPU, progress=False, pseudo=pseudo))

    state = tmp_path / "run.state.pt"
    real_batch = SliceBatches.batch
    calls = {"n": 0}

    def dying_batch(self: SliceBatches, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 5:  # mid-epoch: the second epoch's order and the generators must be restored
            raise _Killed
        return real_batch(self, step)

    monkeypatch.setattr(SliceBatches, "batch", dying_batch)
    with pytest.raises(_Killed):
        train_model(images, masks, cfg, CPU, progress=False, pseudo=pseudo, state_path=state, save_every_s=0)
    monkeypatch.setattr(SliceBatches, "batch", real_batch)
    saved = torch.load(state, weights_only=False)
    assert saved["step"] == 4
    resumed = _weights(train_model(images, masks, cfg, CPU, progress=False, pseudo=pseudo, state_path=state,
                                   save_every_s=0))
    for k in full:
        assert torch.equal(resumed[k], full[k]), k  # bit for bit on the CPU
    # a finished state ends the run at once with the same weights; other settings are refused
    again = _weights(train_model(images, masks, cfg, CPU, progress=False, pseudo=pseudo, state_path=state))
    assert all(torch.equal(again[k], resumed[k]) for k in full)
    from covidseg.errors import ConfigError

    with pytest.raises(ConfigError, match="other settings"):
        train_model(images, masks, SemisegConfig(variant="unet-fv-paspp-ds-2d", **{**TINY, "epochs": 4, **extra}),
                    CPU, progress=False, pseudo=pseudo, state_path=state)


def test_a_state_saved_before_a_setting_existed_resumes_at_its_default(tmp_path: Path) -> None:
    images, masks = resize_stack(load_folder(write_labelled(tmp_path / "l", 4)), (32, 32))
    cfg = SemisegConfig(variant="unet-2d", **{**TINY, "pseudo_per_batch": 0})
    state = tmp_path / "run.state.pt"
    done = _weights(train_model(images, masks, cfg, CPU, progress=False, state_path=state))
    saved = torch.load(state, weights_only=False)
    for key in ("scales", "ema_decay", "soup", "pretrain_size"):  # as an older covidseg wrote it
        del saved["config"][key]
    del saved["batches"]["scale"], saved["average"]
    torch.save(saved, state)
    again = _weights(train_model(images, masks, cfg, CPU, progress=False, state_path=state))
    assert all(torch.equal(again[k], done[k]) for k in done)
    from covidseg.errors import ConfigError

    with pytest.raises(ConfigError, match="other settings"):  # but not under a setting that is not the default
        train_model(images, masks, SemisegConfig(variant="unet-2d", **{**TINY, "pseudo_per_batch": 0,
                                                                          "ema_decay": 0.5}),
                    CPU, progress=False, state_path=state)


def test_a_state_resumes_under_another_prediction_setting(tmp_path: Path) -> None:
    """``flip_tta`` and ``threshold`` say how the model predicts, not how it trains: a finished state saved under
    one (here the bool an older covidseg wrote) ends at once under another with the same weights."""
    images, masks = resize_stack(load_folder(write_labelled(tmp_path / "l", 4)), (32, 32))
    cfg = SemisegConfig(variant="unet-2d", **{**TINY, "pseudo_per_batch": 0, "flip_tta": "lr"})
    state = tmp_path / "run.state.pt"
    done = _weights(train_model(images, masks, cfg, CPU, progress=False, state_path=state))
    saved = torch.load(state, weights_only=False)
    saved["config"]["flip_tta"] = True
    torch.save(saved, state)
    other = dataclasses.replace(cfg, flip_tta="all", threshold=0.4)
    again = _weights(train_model(images, masks, other, CPU, progress=False, state_path=state))
    assert all(torch.equal(again[k], done[k]) for k in done)


def test_multiscale_batches_take_each_size_and_keep_binary_masks(tmp_path: Path) -> None:
    from covidseg.errors import ConfigError
    from covidseg.training.slices import scaled_sizes

    assert scaled_sizes((192, 192), (0.75, 1.0, 1.25), 16) == [(144, 144), (192, 192), (240, 240)]
    assert scaled_sizes((32, 48), (0.1,), 16) == [(16, 16)]  # never below one multiple
    with pytest.raises(ConfigError, match="positive"):
        scaled_sizes((32, 32), (0.0,), 4)
    images, masks = resize_stack(load_folder(write_labelled(tmp_path / "l", 8)), (32, 32))
    cfg = SemisegConfig(**{**TINY, "pseudo_per_batch": 0, "scales": (0.5, 1.0, 1.5)})
    batches = SliceBatches(images, masks, None, cfg, seed=0, device=CPU)
    seen = set()
    for step in range(30):
        x, y = batches.batch(step)
        assert x.shape == y.shape and x.shape[-2:] in {(16, 16), (32, 32), (48, 48)}
        assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
        seen.add(tuple(x.shape[-2:]))
    assert len(seen) == 3
    one = SliceBatches(images, masks, None, SemisegConfig(**{**TINY, "pseudo_per_batch": 0}), seed=0, device=CPU)
    assert all(one.batch(step)[0].shape[-2:] == (32, 32) for step in range(10))
    larger = SliceBatches(images, masks, None, SemisegConfig(**{**TINY, "pseudo_per_batch": 0, "scales": (1.5,)}),
                          seed=0, device=CPU)
    assert all(larger.batch(step)[0].shape[-2:] == (48, 48) for step in range(3))


def test_ema_ends_with_the_moving_average_of_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights returned are ``avg = d * avg + (1 - d) * w`` over the steps (the first step's copied)."""
    from covidseg.training import slices as slices_mod

    images, masks = resize_stack(load_folder(write_labelled(tmp_path / "l", 8)), (32, 32))
    cfg = SemisegConfig(variant="unet-2d", **{**TINY, "pseudo_per_batch": 0, "ema_decay": 0.5})
    after_steps: list[dict[str, torch.Tensor]] = []
    real_step = slices_mod.train_step

    def recording_step(engine, x, y):  # type: ignore[no-untyped-def]
        value = real_step(engine, x, y)
        after_steps.append(_weights(engine.model))
        return value

    monkeypatch.setattr(slices_mod, "train_step", recording_step)
    out = _weights(train_model(images, masks, cfg, CPU, progress=False))
    assert len(after_steps) == 4  # 2 epochs x 2 steps
    expected = {k: v.clone() for k, v in after_steps[0].items()}
    for w in after_steps[1:]:
        for k, v in w.items():
            if v.is_floating_point():
                expected[k] = 0.5 * expected[k] + 0.5 * v
    floats = [k for k, v in expected.items() if v.is_floating_point()]
    for k in floats:
        torch.testing.assert_close(out[k], expected[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(out[k], after_steps[-1][k]) for k in floats)  # not the last step's weights
    from covidseg.errors import ConfigError

    with pytest.raises(ConfigError, match="ema_decay"):
        train_model(images, masks, SemisegConfig(**{**TINY, "ema_decay": 1.0}), CPU, progress=False)


def test_pseudo_slices_never_enter_a_held_out_fold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import covidseg.semiseg.train as tr

    slices = load_folder(write_labelled(tmp_path / "l", 6))
    pseudo_slices = load_pseudo_folder(write_pseudo(tmp_path / "p", {"a": 3}))
    pseudo = resize_stack(pseudo_slices, (32, 32))
    cfg = SemisegConfig(variant="unet-2d", folds=3, **{**TINY, "epochs": 1})
    scored: list[str] = []
    real_predict = tr.predict_slices

    def spy(model: torch.nn.Module, test: list, *args: object, **kw: object) -> list[np.ndarray]:
        scored.extend(s.name for s in test)
        return real_predict(model, test, *args, **kw)  # type: ignore[arg-type]

    trained_on: list[int] = []
    real_train = tr.train_soup  # what a fold trains with (one model, or a soup of them)

    def spy_train(images: torch.Tensor, *args: object, **kw: object) -> torch.nn.Module:
        assert kw["pseudo"] is pseudo  # every fold trains with the pseudo slices
        trained_on.append(int(images.shape[0]))
        return real_train(images, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tr, "predict_slices", spy)
    monkeypatch.setattr(tr, "train_soup", spy_train)
    cv = cross_validate(slices, cfg, CPU, progress=False, pseudo=pseudo, work_dir=tmp_path / "work")
    assert sorted(scored) == sorted(s.name for s in slices)  # every expert slice held out once, nothing else
    assert all(r["name"] in {s.name for s in slices} for f in cv["folds"] for r in f["rows"])
    assert trained_on == [4, 4, 4]  # the other folds' expert slices (pseudo slices are passed apart)
    # a rerun keeps the finished folds (read back, not retrained)
    trained_on.clear()
    again = cross_validate(slices, cfg, CPU, progress=False, pseudo=pseudo, work_dir=tmp_path / "work")
    assert trained_on == [] and again["mean"] == cv["mean"]


def test_shipped_model_records_what_inference_needs() -> None:
    """The default checkpoint says how to feed it: variant, width, depth, input size, input convention, threshold."""
    from covidseg.checkpoint import read_checkpoint
    from covidseg.semiseg.evaluate import default_checkpoint

    path = default_checkpoint()
    assert path.stat().st_size <= 20e6
    ckpt = read_checkpoint(path)
    meta = ckpt["meta"]
    assert meta["task"] == "semiseg-infection-2d" and meta["weights_dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in ckpt["state_dict"].values() if v.is_floating_point())
    cfg = meta["semiseg"]
    assert cfg["variant"] == "unet-fv-paspp-ds-2d" and ckpt["config"]["model"]["name"] == cfg["variant"]
    assert {"base_width", "depth", "size"} <= set(cfg) and meta["input_size"] == cfg["size"]
    assert 0.0 < meta["threshold"] < 1.0 and meta["flip_tta"] == "all"
    assert "/ 255" in meta["input"] and "COVID-SemiSeg" in meta["input"]
    assert meta["n_pseudo"] == 1600 and cfg["pretrain_epochs"] > 0 and cfg["pseudo_per_batch"] > 0


def _cv_script(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``benchmarks/semiseg_cv.py`` imported as a module."""
    return _bench_script(monkeypatch, "semiseg_cv")


def _bench_script(monkeypatch: pytest.MonkeyPatch, name: str) -> Any:
    """``benchmarks/<name>.py`` imported as a module."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", [str(root / "benchmarks"), *sys.path])
    spec.loader.exec_module(module)
    return module


def test_cv_benchmark_prints_its_table_on_an_ascii_console(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    module = _cv_script(monkeypatch)
    console = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", console)
    module.print_console("| 0.732 ± 0.026 |")  # the table's characters would raise UnicodeEncodeError in print()
    assert console.buffer.getvalue() == b"| 0.732 ? 0.026 |\n"


def test_cv_benchmark_runs_the_labelled_stage_with_scales_ema_soup_and_self_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/semiseg_cv.py end to end at toy size: pretraining at its own size, 2 folds with --scales, --ema,
    --soup and --relabel, no final model."""
    import json

    module = _cv_script(monkeypatch)
    labelled, pseudo = write_labelled(tmp_path / "l", 6), write_pseudo(tmp_path / "p", {"a": 4})
    out = tmp_path / "cv"
    argv = ["--data", str(labelled), "--pseudo", str(pseudo), "--out", str(out), "--device", "cpu",
            "--variants", "unet-2d", "--folds", "2", "--size", "32", "--base-width", "4", "--epochs", "1",
            "--pretrain-epochs", "1", "--pretrain-size", "16", "--batch-size", "4", "--pseudo-per-batch", "2", "--amp", "off",
            "--scales", "0.5,1,1.5", "--ema", "0.9", "--soup", "2", "--relabel", "1", "--no-final", "--no-progress"]
    assert module.main(argv) == 0
    report = json.loads((out / "semiseg_cv.json").read_text(encoding="utf-8"))
    assert report["settings"]["config"]["scales"] == [0.5, 1.0, 1.5]
    assert report["settings"]["config"]["ema_decay"] == 0.9
    assert report["settings"]["config"]["pretrain_size"] == [16, 16]
    pre = torch.load(out / "state" / "unet-2d" / "pretrain.state.pt", weights_only=False)
    assert pre["config"]["size"] == [16, 16]  # the pseudo-label stage ran at --pretrain-size, the folds at --size
    assert report["variants"]["unet-2d"]["complete"] and report["final"] is None
    assert not (out / "semiseg-2d.pt").exists()
    text = (out / "semiseg_cv.md").read_text(encoding="utf-8")
    assert "pretraining 1 epochs at lr 0.001 and 16x16 px" in text
    assert "0.5, 1, 1.5" in text and "decay 0.9" in text and "2 models from the same start" in text
    assert report["settings"]["config"]["soup"] == 2
    assert (out / "state" / "unet-2d" / "fold1.m1.state.pt").is_file()
    assert report["settings"]["config"]["relabel"] == 1 and "Self-training: 1 round(s)" in text
    assert (out / "state" / "unet-2d" / "fold1.r1.m1.state.pt").is_file()  # round 1's second soup member
    from covidseg.errors import ConfigError

    with pytest.raises(ConfigError, match="--scales"):
        module.main([*argv[:-4], "--scales", "big", "--no-progress"])


def test_a_soup_is_the_mean_of_its_members_each_resumable(tmp_path: Path) -> None:
    from covidseg.errors import ConfigError
    from covidseg.training.slices import SOUP_SEED_STRIDE, member_state_path, train_soup

    images, masks = resize_stack(load_folder(write_labelled(tmp_path / "l", 4)), (32, 32))
    one = SemisegConfig(variant="unet-fv-paspp-ds-2d", **{**TINY, "pseudo_per_batch": 0})
    soup = SemisegConfig(variant="unet-fv-paspp-ds-2d", **{**TINY, "pseudo_per_batch": 0, "soup": 3})
    init = _weights(build_model(one))
    members = [_weights(train_model(images, masks, soup, CPU, progress=False, init=init,
                                    seed=5 + SOUP_SEED_STRIDE * j)) for j in range(3)]
    state = tmp_path / "fold0.state.pt"
    out = _weights(train_soup(images, masks, soup, CPU, progress=False, init=init, seed=5, state_path=state))
    floats = [k for k, v in init.items() if v.is_floating_point()]
    for k in floats:
        torch.testing.assert_close(out[k], sum(m[k] for m in members) / 3, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(members[0][k], members[1][k]) for k in floats)  # the members differ
    assert member_state_path(state, 0) == state and member_state_path(state, 2) == tmp_path / "fold0.m2.state.pt"
    assert all(member_state_path(state, j).is_file() for j in range(3))
    again = _weights(train_soup(images, masks, soup, CPU, progress=False, init=init, seed=5, state_path=state))
    assert all(torch.equal(again[k], out[k]) for k in out)  # from the finished states
    single = _weights(train_soup(images, masks, one, CPU, progress=False, init=init, seed=5))
    assert all(torch.equal(single[k], _weights(train_model(images, masks, one, CPU, progress=False, init=init,
                                                           seed=5))[k]) for k in floats)
    with pytest.raises(ConfigError, match="soup"):
        train_soup(images, masks, SemisegConfig(**{**TINY, "soup": 0}), CPU, progress=False)


def test_cli_trains_semi_supervised_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``covidseg semiseg train --pseudo``: the pseudo-label stage at its own size, folds and final model from it,
    every stage's state kept, so a rerun after a kill continues and ``--force`` starts again."""
    import json

    from covidseg.checkpoint import load_checkpoint
    from covidseg.cli.main import run as cli
    from covidseg.semiseg import train as semiseg_train

    labelled, pseudo = write_labelled(tmp_path / "l", 4), write_pseudo(tmp_path / "p", {"a": 4})
    run_dir = tmp_path / "run"
    args = ["semiseg", "train", "--data", str(labelled), "--pseudo", str(pseudo), "--out", str(run_dir),
            "--folds", "2", "--epochs", "1", "--pretrain-epochs", "1", "--pretrain-size", "16", "--size", "32",
            "--variant", "unet-2d", "--device", "cpu", "--base-width", "4", "--batch-size", "2",
            "--pseudo-per-batch", "1", "--amp", "off", "--flip-tta"]
    real_final = semiseg_train.train_final

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt  # what Ctrl-C or a SIGTERM is inside the command

    monkeypatch.setattr("covidseg.semiseg.train.train_final", interrupted)
    with pytest.raises(SystemExit) as exc:  # stopped after the folds: their states and results are on disk
        cli(args)
    assert exc.value.code not in (0, None) and not (run_dir / "final.pt").exists()
    state = run_dir / "state"
    assert {p.name for p in state.iterdir()} >= {"pretrain.state.pt", "fold0.json", "fold1.json"}
    assert torch.load(state / "pretrain.state.pt", weights_only=False)["config"]["size"] == [16, 16]
    fold0 = (state / "fold0.json").read_text(encoding="utf-8")

    monkeypatch.setattr("covidseg.semiseg.train.train_final", real_final)
    with pytest.raises(SystemExit) as exc:  # other settings do not continue it (nor reuse its folds)
        cli([*args, "--lr", "0.01"])
    assert exc.value.code == 2 and not (run_dir / "final.pt").exists()
    with pytest.raises(SystemExit) as exc:  # the same command continues: the finished folds are not retrained
        cli(args)
    assert exc.value.code in (0, None)
    assert (state / "fold0.json").read_text(encoding="utf-8") == fold0
    record = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert record["n_pseudo"] == 4 and record["config"]["pretrain_size"] == [16, 16]
    assert record["config"]["pseudo_per_batch"] == 1 and record["config"]["flip_tta"]
    _, _, meta = load_checkpoint(run_dir / "final.pt")
    assert meta["n_pseudo"] == 4 and meta["flip_tta"] and meta["input_size"] == [32, 32]
    assert len(json.loads((run_dir / "cv.json").read_text(encoding="utf-8"))["folds"]) == 2

    with pytest.raises(SystemExit) as exc:  # --force starts again from nothing
        cli([*args, "--force"])
    assert exc.value.code in (0, None)
    assert (state / "fold0.json").is_file() and (run_dir / "final.pt").is_file()
    (state / "notes.txt").write_text("mine", encoding="utf-8")  # not the command's: --force leaves it
    with pytest.raises(SystemExit) as exc:
        cli([*args, "--force", "--no-final"])
    assert exc.value.code in (0, None) and (state / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (run_dir / "cv.json").is_file() and not (run_dir / "final.pt").exists()  # no final.pt of the old run
    with pytest.raises(SystemExit) as exc:
        cli([*args[:-1], "--pretrain-epochs", "0", "--force"])
    assert exc.value.code == 2


def test_cli_and_cv_benchmark_train_the_same_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``covidseg semiseg train --pseudo`` and ``benchmarks/semiseg_cv.py --pseudo`` with the same settings: the
    same folds' scores and the same final weights (the shipped model's recipe is reachable from the CLI)."""
    import json

    from covidseg.checkpoint import load_checkpoint
    from covidseg.cli.main import run as cli

    module = _cv_script(monkeypatch)
    labelled, pseudo = write_labelled(tmp_path / "l", 6), write_pseudo(tmp_path / "p", {"a": 4})
    common = ["--data", str(labelled), "--pseudo", str(pseudo), "--device", "cpu", "--folds", "2", "--size", "32",
              "--base-width", "4", "--epochs", "1", "--lr", "5e-4", "--pretrain-epochs", "1", "--pretrain-size",
              "16", "--batch-size", "4", "--pseudo-per-batch", "2", "--amp", "off", "--flip-tta",
              "--augment-noise", "0.3", "--augment-kernel", "0.3"]
    assert module.main([*common, "--out", str(tmp_path / "bench"), "--variants", "unet-fv-paspp-ds-2d",
                        "--no-progress"]) == 0
    with pytest.raises(SystemExit) as exc:
        cli(["semiseg", "train", *common, "--out", str(tmp_path / "cli"), "--variant", "unet-fv-paspp-ds-2d"])
    assert exc.value.code in (0, None)
    bench = json.loads((tmp_path / "bench" / "semiseg_cv.json").read_text(encoding="utf-8"))
    cv = json.loads((tmp_path / "cli" / "cv.json").read_text(encoding="utf-8"))
    assert [f["metrics"] for f in cv["folds"]] == [f["metrics"] for f in
                                                   bench["variants"]["unet-fv-paspp-ds-2d"]["folds"]]
    a, _, _ = load_checkpoint(tmp_path / "bench" / "semiseg-2d.pt")
    b, _, _ = load_checkpoint(tmp_path / "cli" / "final.pt")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    record = json.loads((tmp_path / "cli" / "config.json").read_text(encoding="utf-8"))
    assert record["config"]["augment"]["p_kernel"] == 0.3 == bench["settings"]["config"]["augment"]["p_noise"]

    # the held-out slices again, altered: the fold models are found and give their own scores back unaltered
    kernels = _bench_script(monkeypatch, "semiseg_kernels")
    out = tmp_path / "kernels.json"
    assert kernels.main(["--data", str(labelled), "--run", str(tmp_path / "bench"), "--alterations",
                         "sharpen:2,noise:8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))["alterations"]
    assert list(rows) == ["none", "sharpen:2", "noise:8"]
    assert rows["none"]["folds"] == pytest.approx([f["metrics"]["mean_dice_infnet"] for f in cv["folds"]])
    assert json.loads(out.read_text(encoding="utf-8"))["flip_tta"] == "lr"  # the run's own
    assert kernels.main(["--data", str(labelled), "--run", str(tmp_path / "bench"), "--alterations", "none",
                         "--flip-tta", "all", "--json", str(out)]) == 0  # other mirrors: not the run's scores
    assert json.loads(out.read_text(encoding="utf-8"))["flip_tta"] == "all"
    assert kernels.main(["--data", str(labelled), "--run", str(tmp_path / "nothing")]) == 2
    assert torch.is_grad_enabled()  # the script leaves the caller's autograd as it was

    # the same held-out slices counted by density: every expert pixel of the 6 slices falls in one band
    density = _bench_script(monkeypatch, "semiseg_density")
    out = tmp_path / "density.json"
    assert density.main(["--data", str(labelled), "--run", str(tmp_path / "bench"), "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["n_slices"] == 6 and report["flip_tta"] == "lr" and len(report["bands"]) == 6
    gt_pixels = sum(int((s.mask > 0).sum()) for s in load_folder(labelled))
    assert sum(b["gt_pixels"] for b in report["bands"].values()) == gt_pixels
    assert density.main(["--data", str(labelled), "--run", str(tmp_path / "nothing")]) == 2


def test_density_bands_count_each_pixel_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Levels read back to HU through the expert slices' window; recall and flagged pixels per band."""
    density = _bench_script(monkeypatch, "semiseg_density")
    assert density.band_names() == ["< -700", "-700 to -500", "-500 to -300", "-300 to -100", "-100 to 100", ">= 100"]
    assert density.to_hu(np.array([0.0, 1.0])).tolist() == [-1120.0, 235.0]
    hu = np.array([[-900.0, -600.0, -400.0, 0.0]])  # bands 0, 1, 2, 4
    image = ((hu + 1120.0) / 1355.0).astype(np.float32)
    mask = np.array([[0, 1, 1, 1]], dtype=np.uint8)
    prob = np.array([[0.9, 0.6, 0.1, 0.5]])  # the lung pixel flagged, ground glass half found, consolidation found
    counts = density.count_by_band([prob, prob], [image, image], [mask, mask])
    assert counts["gt"].tolist() == [0, 2, 2, 0, 2, 0] and counts["tp"].tolist() == [0, 2, 0, 0, 2, 0]
    assert counts["other"].tolist() == [2, 0, 0, 0, 0, 0] and counts["flagged"].tolist() == [2, 0, 0, 0, 0, 0]


def test_kernel_alterations_of_8_bit_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = _bench_script(monkeypatch, "semiseg_kernels")
    rng = np.random.default_rng(0)
    image = (np.round(rng.uniform(60, 200, (40, 40))) / 255.0).astype(np.float32)
    assert kernels.alter(image, "none") is image
    sharp = kernels.alter(image, "sharpen:2")
    noisy = kernels.alter(image, "noise:15")
    for out in (sharp, noisy):
        assert out.shape == image.shape and out.min() >= 0.0 and out.max() <= 1.0
        assert np.allclose(out * 255.0, np.round(out * 255.0), atol=1e-4)  # 8-bit levels, as a jpg holds them
    assert float(np.std(sharp - image)) > 0.05 and abs(float(np.mean(noisy - image))) < 0.01
    with pytest.raises(ValueError, match="alteration"):
        kernels.alter(image, "blur:1")


def test_self_training_relabels_the_pseudo_slices_with_the_stages_model(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``relabel`` 1: the labelled stage runs, its model relabels the pseudo slices (thresholded, mirrors averaged
    in), the stage runs again from the same start and seed on those labels; every round resumes from its state,
    and round 0's state is that of a run without self-training."""
    import covidseg.semiseg.train as tr
    from covidseg.errors import ConfigError
    from covidseg.semiseg.data import Slice

    images, masks = resize_stack(load_folder(write_labelled(tmp_path / "l", 4)), (32, 32))
    pseudo = resize_stack(load_pseudo_folder(write_pseudo(tmp_path / "p", {"a": 5})), (32, 32))
    plain = SemisegConfig(variant="unet-2d", flip_tta="all", **TINY)
    cfg = dataclasses.replace(plain, relabel=1)
    init = _weights(build_model(plain))
    state = tmp_path / "fold0.state.pt"
    first = tr.train_soup(images, masks, plain, CPU, progress=False, init=init, seed=3, pseudo=pseudo,
                          state_path=state)  # a run without self-training leaves round 0's state
    expected = tr.relabel_stack(first, pseudo[0], plain, CPU)
    as_slices = [Slice(name=str(i), image=pseudo[0][i, 0].numpy(), mask=pseudo[1][i, 0].numpy(), multiclass=None,
                       image_path=tmp_path, mask_path=tmp_path) for i in range(pseudo[0].shape[0])]
    probs = tr.predict_slices(first, as_slices, (32, 32), CPU, "off", flip_tta="all")
    assert torch.equal(expected, torch.from_numpy(np.stack(probs) >= 0.5).float()[:, None])
    assert set(expected.unique().tolist()) <= {0.0, 1.0} and not torch.equal(expected, pseudo[1])

    calls: list[tuple[int, torch.Tensor, Path | None]] = []
    real_train = tr.train_soup

    def spy(imgs: torch.Tensor, m: torch.Tensor, c: SemisegConfig, *args: object, **kw: Any) -> torch.nn.Module:
        calls.append((c.relabel, kw["pseudo"][1], kw["state_path"]))
        assert kw["init"] is init and kw["seed"] == 3 and kw["pseudo"][0] is pseudo[0]
        return real_train(imgs, m, c, *args, **kw)

    monkeypatch.setattr(tr, "train_soup", spy)
    out = _weights(tr.train_labelled(images, masks, cfg, CPU, progress=False, init=init, seed=3, pseudo=pseudo,
                                     state_path=state))
    assert [c[0] for c in calls] == [0, 1]
    assert calls[0][1] is pseudo[1] and torch.equal(calls[1][1], expected)  # round 1 learns the new labels
    assert calls[1][2] == tr.round_state_path(state, 1) == tmp_path / "fold0.r1.state.pt"
    assert torch.load(calls[1][2], weights_only=False)["config"]["relabel"] == 1
    fresh = _weights(real_train(images, masks, dataclasses.replace(cfg, relabel=1), CPU, progress=False, init=init,
                                seed=3, pseudo=(pseudo[0], expected)))
    assert all(torch.equal(out[k], fresh[k]) for k in out)
    again = _weights(tr.train_labelled(images, masks, cfg, CPU, progress=False, init=init, seed=3, pseudo=pseudo,
                                       state_path=state))
    assert all(torch.equal(again[k], out[k]) for k in out)  # from the finished rounds' states
    with pytest.raises(ConfigError, match="relabel 1: self-training relabels the pseudo-labelled slices"):
        tr.train_labelled(images, masks, cfg, CPU, progress=False)
    with pytest.raises(ConfigError, match="relabel -1"):
        tr.train_labelled(images, masks, dataclasses.replace(cfg, relabel=-1), CPU, progress=False, pseudo=pseudo)
    assert tr.pretrain_config(cfg).relabel == 0  # the pseudo-label stage never relabels
