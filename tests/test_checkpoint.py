"""Checkpoints: round trip, atomic write, and every bad file gets a one-line InputError."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from covidseg.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, save_checkpoint
from covidseg.config import Config
from covidseg.errors import InputError
from covidseg.models import create_model, variant_config

TINY = {"base_width": 4, "depth": 2}


def make(name: str = "unet-fv-paspp-ds", seed: int = 0):
    torch.manual_seed(seed)
    config = Config()
    config.model = variant_config(name, **TINY)
    config.train.epochs = 7
    return create_model(config.model), config


def test_round_trip_restores_weights_config_and_meta(tmp_path):
    model, config = make()
    path = save_checkpoint(tmp_path / "run" / "best.pt", model, config, epoch=3,
                           best_dice=np.float32(0.75), target="infection", source=Path("/data/x"), history=[1, 2])
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temporary left behind
    loaded, loaded_config, meta = load_checkpoint(path)
    assert loaded_config == config
    assert meta == {"epoch": 3, "best_dice": 0.75, "target": "infection", "source": "/data/x", "history": [1, 2]}
    assert not loaded.training
    model.eval()
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x), strict=True):
            assert torch.equal(a, b)


def test_stored_model_section_is_the_models_own(tmp_path):
    model, config = make("unet-fv-ce")
    other = dataclasses.replace(config, model=variant_config("unet"))  # the caller's config says something else
    _, loaded_config, _ = load_checkpoint(save_checkpoint(tmp_path / "a.pt", model, other))
    assert loaded_config.model == model.config


def test_overwrites_atomically_and_unwraps_wrappers(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")
    model, config = make("unet")
    save_checkpoint(path, nn.DataParallel(model), config)
    loaded, _, _ = load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("cut", [0.5, 0.05])
def test_truncated_file(tmp_path, cut):
    model, config = make("unet")
    path = save_checkpoint(tmp_path / "a.pt", model, config)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "a.pt"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(InputError, match=r"a\.pt: not a readable covidseg checkpoint"):
        load_checkpoint(path)


def test_foreign_torch_file(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(InputError, match=f"expected format tag '{FORMAT}'"):
        load_checkpoint(path)


def _tamper(path: Path, **changes) -> None:
    payload = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if key == "model":
            payload["config"]["model"].update(value)
        else:
            payload[key] = value
    torch.save(payload, path)


def test_other_format_version(tmp_path):
    model, config = make("unet")
    path = save_checkpoint(tmp_path / "a.pt", model, config)
    _tamper(path, format_version=FORMAT_VERSION + 1, covidseg_version="9.9.9")
    with pytest.raises(InputError, match=rf"format version {FORMAT_VERSION + 1} \(written by covidseg 9\.9\.9\), "
                                         rf"expected {FORMAT_VERSION}"):
        load_checkpoint(path)


def test_weights_of_another_variant_name_both(tmp_path):
    model, config = make("unet-fv-ce-paspp-ds")
    path = save_checkpoint(tmp_path / "a.pt", model, config)
    _tamper(path, model={"name": "unet", "fv": "none", "paspp": False, "deep_supervision": False})
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "expected unet: 3D, fv=none, paspp=false, deep_supervision=false" in message
    assert "look like 3D, fv=ce, paspp=true, deep_supervision=true" in message
    assert "\n" not in message


def test_unreadable_stored_config(tmp_path):
    model, config = make("unet")
    path = save_checkpoint(tmp_path / "a.pt", model, config)
    _tamper(path, model={"colour": "blue"})
    with pytest.raises(InputError, match="unknown config key 'model.colour'"):
        load_checkpoint(path)


def test_unstorable_meta_is_refused_before_writing(tmp_path):
    model, config = make("unet")
    with pytest.raises(TypeError, match="cannot be stored"):
        save_checkpoint(tmp_path / "a.pt", model, config, optimizer=object())
    assert not list(tmp_path.iterdir())


def test_str_subclasses_in_meta_are_stored_as_plain_str(tmp_path):
    model, config = make()
    assert type(torch.__version__) is not str  # torch.torch_version.TorchVersion
    path = save_checkpoint(tmp_path / "a.pt", model, config, code={"torch": torch.__version__})
    _, _, meta = load_checkpoint(path)  # weights_only loading refuses TorchVersion objects
    assert meta == {"code": {"torch": str(torch.__version__)}} and type(meta["code"]["torch"]) is str
