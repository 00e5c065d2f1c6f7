"""The config layout: what a checkpoint keeps vs runtime settings, the old keys, the presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from covidseg.config import (
    KEPT_SECTIONS,
    LEGACY_KEYS,
    Config,
    RuntimeConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    preset_names,
    upgrade_keys,
)
from covidseg.errors import ConfigError

SHIPPED_2D = Path(__file__).resolve().parents[1] / "src" / "covidseg" / "weights" / "semiseg-2d.pt"

OLD_VALUES = {
    "train.device": "cuda:1", "inference.device": "cuda:1", "train.amp": "bf16", "inference.bf16": "off",
    "inference.threads": 3, "inference.channels_last": False, "inference.batch_windows": 8, "train.num_workers": 0,
    "train.cache_dir": "/tmp/cache", "train.loader_benchmark_batches": 1, "train.deterministic": True,
    "train.sync_batchnorm": False,
}
"""A value other than the default for every old key."""


def _nested(flat: dict[str, object]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for key, value in flat.items():
        section, name = key.split(".")
        out.setdefault(section, {})[name] = value
    return out


def test_every_old_key_lands_at_its_new_home():
    assert set(OLD_VALUES) == set(LEGACY_KEYS)
    config = config_from_dict(_nested(OLD_VALUES))
    for old, new in LEGACY_KEYS.items():
        section, name = new.split(".")
        assert getattr(getattr(config, section), name) == OLD_VALUES[old], old
    # the same through --set items and a YAML file
    items = [f"{k}={v}" for k, v in OLD_VALUES.items()]
    assert load_config(None, items) == config


def test_the_two_old_device_keys():
    """Every old resolved config holds both (train.device=auto, inference.device=cpu): the new default. A value
    other than its old default wins, train.device first; either alone means what it says; a new key wins."""
    assert load_config(None, ["train.device=auto", "inference.device=cpu"]).runtime.device == "auto"
    assert load_config(None, ["train.device=auto", "inference.device=cuda"]).runtime.device == "cuda"
    assert load_config(None, ["train.device=cuda:0", "inference.device=cuda:1"]).runtime.device == "cuda:0"
    assert load_config(None, ["inference.device=cpu"]).runtime.device == "cpu"
    assert load_config(None, ["train.device=cpu", "runtime.device=cuda"]).runtime.device == "cuda"
    assert upgrade_keys({"train": {"epochs": 3, "device": "cpu"}}) == {"train": {"epochs": 3},
                                                                       "runtime": {"device": "cpu"}}


def test_old_keys_keep_strict_checking():
    with pytest.raises(ConfigError, match="'runtime.amp': 'fast' is not one of"):
        load_config(None, ["train.amp=fast"])
    with pytest.raises(ConfigError, match="unknown config key 'runtime.colour'"):
        load_config(None, ["runtime.colour=red"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["inference.threads=many"])


def test_runtime_settings_are_not_model_settings():
    fields = {f.name for f in dataclasses.fields(RuntimeConfig)}
    assert {"device", "amp", "bf16", "threads", "channels_last", "batch_windows", "num_workers", "cache_dir"} <= fields
    for section in KEPT_SECTIONS:
        names = {f.name for f in dataclasses.fields(getattr(Config(), section))}
        assert not names & fields, section
    assert "runtime" not in config_to_dict(Config(), runtime=False)
    assert set(config_to_dict(Config(), runtime=False)) == set(KEPT_SECTIONS)


def test_assigning_an_old_attribute_fails_loudly():
    with pytest.raises(AttributeError):
        Config().inference.bf16 = "off"  # type: ignore[attr-defined]


def test_checkpoints_keep_no_runtime_and_old_checkpoints_load(tmp_path):
    from covidseg.checkpoint import load_checkpoint, save_checkpoint
    from covidseg.models import create_model, variant_config

    config = load_config(None, ["model.base_width=4", "model.depth=2", "runtime.device=cpu",
                                "runtime.batch_windows=8", "runtime.cache_dir=/somewhere"])
    config.model = variant_config("unet", base_width=4, depth=2)
    model = create_model(config.model)
    path = save_checkpoint(tmp_path / "new.pt", model, config, target="infection")
    payload = torch.load(path, weights_only=True)
    assert set(payload["config"]) == set(KEPT_SECTIONS)
    _, loaded, _ = load_checkpoint(path)
    assert loaded.runtime == RuntimeConfig() and loaded.model == config.model
    # a checkpoint of the old layout: runtime keys inside train and inference
    old = dict(payload)
    old["config"] = config_to_dict(config, runtime=False)
    old["config"]["train"].update(device="cuda", amp="fp16", num_workers=7, cache_dir="/old")
    old["config"]["inference"].update(device="cpu", bf16="on", threads=2, channels_last=True, batch_windows=4)
    torch.save(old, tmp_path / "old.pt")
    _, from_old, _ = load_checkpoint(tmp_path / "old.pt")
    assert from_old.runtime == RuntimeConfig()  # dropped: the loading machine decides
    assert config_to_dict(from_old, runtime=False) == config_to_dict(loaded, runtime=False)


@pytest.mark.skipif(not SHIPPED_2D.is_file(), reason="the shipped 2D weights are not in this checkout")
def test_the_shipped_2d_checkpoint_still_loads():
    from covidseg.checkpoint import load_checkpoint

    raw = torch.load(SHIPPED_2D, weights_only=True)  # plain tensors and values: loads with weights_only
    assert "inference" in raw["config"]  # old layouts: test_checkpoints_keep_no_runtime_and_old_checkpoints_load
    model, config, meta = load_checkpoint(SHIPPED_2D)
    assert config.model.name == "unet-fv-paspp-ds-2d" and meta["task"] == "semiseg-infection-2d"
    assert config.runtime == RuntimeConfig()
    from covidseg.models import heads_off

    with heads_off(model) as bare, torch.no_grad():
        assert bare(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_old_run_folder_config_resumes_with_the_same_settings(tmp_path):
    """A config.yaml written by the old layout (every key, runtime ones inside train/inference) reads back to the
    config the new layout writes."""
    config = load_config(None, ["runtime.num_workers=0", "runtime.cache_dir=/c", "runtime.batch_windows=8"])
    old = config_to_dict(config)
    runtime = old.pop("runtime")
    old["train"].update({k: runtime[k] for k in ("num_workers", "cache_dir", "loader_benchmark_batches", "amp",
                                                 "deterministic", "sync_batchnorm")}, device="auto")
    old["inference"].update({k: runtime[k] for k in ("bf16", "threads", "channels_last", "batch_windows")},
                            device="cpu")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False), encoding="utf-8")
    assert load_config(path) == config


def test_presets_by_name_and_by_path(tmp_path):
    assert {"demo", "report", "2d"} <= set(preset_names())
    demo = load_config("demo")
    assert demo.model.base_width == 8 and demo.train.patch_size == (16, 64, 64) and demo.runtime.num_workers == 0
    assert load_config("demo", ["train.epochs=2"]).train.epochs == 2
    # a file of that name wins over the preset
    mine = tmp_path / "demo"
    mine.write_text("train:\n  epochs: 3\n", encoding="utf-8")
    assert load_config(mine).train.epochs == 3 and load_config(mine).model.base_width == 16
    with pytest.raises(ConfigError, match="not a preset.*demo"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_the_report_preset_is_the_defaults():
    """The defaults are the report's Table 1; the report preset pins them."""
    assert load_config("report") == Config()


def test_the_2d_preset_is_the_2d_training_defaults():
    """Until the 2D training reads the config, its defaults and the 2d preset must not drift apart."""
    from covidseg.config import SemisegConfig

    preset, semiseg = load_config("2d"), SemisegConfig()
    assert preset.model.name == semiseg.variant and preset.model.base_width == semiseg.base_width
    assert preset.model.depth == semiseg.depth and preset.train.patch_size[1:] == semiseg.size
    assert (preset.train.batch_size, preset.train.learning_rate, preset.train.epochs) == (
        semiseg.batch_size, semiseg.learning_rate, semiseg.epochs)
    assert preset.inference.window == preset.train.patch_size


def test_cli_config_takes_a_preset_name(tmp_path, capsys):
    """`covidseg train --config 2d` finds the preset and refuses its 2D model up front (exit 2)."""
    from covidseg.cli.main import run

    with pytest.raises(SystemExit) as exc:
        run(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", "2d"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "covidseg semiseg train --variant unet-fv-paspp-ds-2d" in err
