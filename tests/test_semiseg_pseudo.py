"""Pseudo-labelled slices: their loader, pretraining -> fine-tuning, resumable training, and their place in CV."""

from __future__ import annotations

from pathlib import Path

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


class _Killed(Exception):
    """Stands for the process being killed."""


def test_resume_continues_to_the_uninterrupted_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pseudo = resize_stack(load_pseudo_folder(write_pseudo(tmp_path / "p", {"a": 5})), (32, 32))
    images, masks = resize_stack(load_folder(write_labelled(tmp_path / "l", 6)), (32, 32))
    cfg = SemisegConfig(variant="unet-fv-paspp-ds-2d", **{**TINY, "epochs": 3})  # 3 steps an epoch, 9 in all
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
        train_model(images, masks, SemisegConfig(variant="unet-fv-paspp-ds-2d", **{**TINY, "epochs": 4}), CPU,
                    progress=False, pseudo=pseudo, state_path=state)


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
    real_train = tr.train_model

    def spy_train(images: torch.Tensor, *args: object, **kw: object) -> torch.nn.Module:
        assert kw["pseudo"] is pseudo  # every fold trains with the pseudo slices
        trained_on.append(int(images.shape[0]))
        return real_train(images, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tr, "predict_slices", spy)
    monkeypatch.setattr(tr, "train_model", spy_train)
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
    assert 0.0 < meta["threshold"] < 1.0 and isinstance(meta["flip_tta"], bool)
    assert "/ 255" in meta["input"] and "COVID-SemiSeg" in meta["input"]
    assert meta["n_pseudo"] == 1600 and cfg["pretrain_epochs"] > 0 and cfg["pseudo_per_batch"] > 0
