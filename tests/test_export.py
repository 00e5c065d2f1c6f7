"""Export (ONNX, TorchScript) of every variant, the metadata, the ONNX Runtime backend and its parity with torch."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from scipy.ndimage import gaussian_filter

from covidseg.checkpoint import save_checkpoint
from covidseg.config import Config, InferenceConfig, RuntimeConfig, config_to_dict
from covidseg.errors import ConfigError, InputError, OutputExistsError
from covidseg.exchange import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME
from covidseg.export import export_model
from covidseg.inference.backends import LoadedModel, OnnxRuntimeModel, load_model, read_export_info
from covidseg.models import MODELS, create_model, variant_config

TINY = {"base_width": 4, "depth": 2}
WINDOW_3D = (4, 16, 16)
WINDOW_2D = (16, 16)
TARGET_OUT = {"infection": 1, "lung": 2, "joint": 3}

# parity of the two backends through predict_volume (float32, no bfloat16), measured on this test's model/volume
PARITY_MAX_PROB_DIFF = 1e-5
PARITY_MIN_DICE = 0.999


def make_checkpoint(path, variant: str, target: str = "infection", seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(variant_config(variant, out_channels=TARGET_OUT[target], **TINY))
    # non-trivial BatchNorm statistics, so that a wrongly folded BatchNorm would show
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm3d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    config = Config()
    config.train.target = target
    return save_checkpoint(path, model, config, target=target, epoch=3, best_dice=0.5)


@pytest.fixture(scope="module")
def joint_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "joint.pt", "unet-fv-paspp-ds", "joint")


@pytest.mark.parametrize("variant", list(MODELS))
def test_every_variant_exports_to_onnx_with_dynamic_sizes(tmp_path, variant):
    ckpt = make_checkpoint(tmp_path / "m.pt", variant)
    window = WINDOW_2D if variant.endswith("-2d") else WINDOW_3D
    report = export_model(ckpt, "onnx", tmp_path / "m.onnx", window=window)
    assert report.opset == ONNX_OPSET and report.path.is_file()
    assert report.max_abs_diff < 1e-4
    assert report.checked_shapes[1][0] == 2 and report.checked_shapes[1][2:] != report.checked_shapes[0][2:]
    proto = onnx.load(str(report.path))
    assert proto.opset_import[0].version == ONNX_OPSET
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and all(dims[2:]), f"spatial axes must be dynamic, got {dims}"
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]


@pytest.mark.parametrize("variant", ["unet", "unet-fv-ce-paspp-ds", "unet-fv-paspp-ds-2d"])
def test_torchscript_export_runs_at_other_sizes(tmp_path, variant):
    ckpt = make_checkpoint(tmp_path / "m.pt", variant)
    window = WINDOW_2D if variant.endswith("-2d") else WINDOW_3D
    report = export_model(ckpt, "torchscript", tmp_path / "m.ts", window=window)
    assert report.opset is None and report.max_abs_diff < 1e-5
    loaded = load_model(report.path, "torch")
    model, config, meta = loaded.module, loaded.config, loaded.meta
    reference = load_model(ckpt, "torch").module
    spatial = (8, 24, 32) if len(window) == 3 else (24, 32)
    x = torch.rand(3, 1, *spatial)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    assert config.model.name == variant and meta["target"] == "infection"
    assert loaded.source == report.path and loaded.backend == "torch" and loaded.channels == ("infection",)


def test_metadata_lets_segment_run_without_the_checkpoint(tmp_path, joint_ckpt):
    out = export_model(joint_ckpt, "onnx", tmp_path / "joint.onnx", window=(8, 32, 32)).path
    info = read_export_info(out)
    ref = load_model(joint_ckpt, "torch")
    reference, ref_config = ref.module, ref.config
    assert info.variant == "unet-fv-paspp-ds" and info.target == "joint"
    assert info.channels == ("left lung", "right lung", "infection")
    assert info.out_channels == 3 and info.in_channels == 1 and info.spatial_dims == 3
    assert info.size_divisor == tuple(reference.size_divisor) == (4, 4, 4)
    assert info.window == (8, 32, 32)
    assert info.version and info.meta["best_dice"] == 0.5
    assert config_to_dict(info.config) == config_to_dict(ref_config)
    loaded = load_model(out, "onnxruntime", threads=1)
    model, config, meta = loaded.module, loaded.config, loaded.meta
    assert isinstance(model, OnnxRuntimeModel) and model.size_divisor == (4, 4, 4)
    assert meta["target"] == "joint" and config.model.out_channels == 3
    assert loaded.target == "joint" and loaded.channels == info.channels and loaded.backend == "onnxruntime"
    # the module face predict_volume relies on
    assert model.eval() is model and model.to("cpu") is model and model.set_deep_supervision(False) is model
    assert model.spatial_dims == 3 and not model.deep_supervision and list(model.parameters()) == []
    with pytest.raises(ConfigError, match="deep-supervision"):
        model.set_deep_supervision(True)


def test_onnxruntime_and_torch_backends_agree_through_predict_volume(tmp_path, joint_ckpt):
    """The parity numbers of docs/interop.md: same checkpoint, same volume, the two backends."""
    from covidseg.inference.sliding_window import predict_volume

    onnx_path = export_model(joint_ckpt, "onnx", tmp_path / "joint.onnx", window=(8, 32, 32)).path
    rng = np.random.default_rng(0)
    volume = gaussian_filter(rng.random((16, 64, 64)), 2.0).astype(np.float32)
    volume = (volume - volume.min()) / (volume.max() - volume.min())
    cfg = InferenceConfig(window=(8, 32, 32), overlap=0.25)
    f32 = RuntimeConfig(batch_windows=2, bf16="off")
    torch_model = load_model(joint_ckpt, "torch").module
    ort_model = load_model(onnx_path, "onnxruntime", threads=1).module
    p_torch = predict_volume(torch_model, volume, cfg, runtime=f32)
    p_ort = predict_volume(ort_model, volume, cfg, runtime=f32)
    assert p_torch.shape == p_ort.shape == (3, 16, 64, 64)
    max_diff = float(np.abs(p_torch - p_ort).max())
    a, b = p_torch >= cfg.threshold, p_ort >= cfg.threshold
    assert a.any() and (~a).any(), "the test model must give a non-trivial mask"
    dice = 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    print(f"torch vs onnxruntime: max |probability difference| {max_diff:.2e}, mask Dice {dice:.6f}")
    assert max_diff <= PARITY_MAX_PROB_DIFF
    assert dice >= PARITY_MIN_DICE


def test_checkpoint_runs_on_onnxruntime_through_an_in_memory_export(joint_ckpt):
    loaded = load_model(joint_ckpt, "onnxruntime", threads=1)
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.module, OnnxRuntimeModel)
    reference = load_model(joint_ckpt, "torch").module
    x = torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), reference(x), atol=1e-4)
    assert loaded.meta["target"] == "joint" and loaded.config.model.name == "unet-fv-paspp-ds"
    assert loaded.source == joint_ckpt and "exported in memory" in loaded.module.name


def test_onnx_input_checks_name_a_valid_size(tmp_path, joint_ckpt):
    model = load_model(export_model(joint_ckpt, "onnx", tmp_path / "m.onnx", window=(8, 32, 32)).path,
                       "onnxruntime").module
    with pytest.raises(InputError, match=r"multiple of 4x4x4\); use 8x32x36"):
        model(torch.rand(1, 1, 8, 32, 34))
    with pytest.raises(InputError, match="expected"):
        model(torch.rand(1, 2, 8, 32, 32))


def test_export_refuses_bad_requests(tmp_path, joint_ckpt):
    out = tmp_path / "m.onnx"
    with pytest.raises(ConfigError, match="use --window 8 32 32"):
        export_model(joint_ckpt, "onnx", out, window=(6, 30, 32))
    with pytest.raises(ConfigError, match="needs 3 sizes"):
        export_model(joint_ckpt, "onnx", out, window=(32, 32))
    with pytest.raises(ConfigError, match="onnx, torchscript"):
        export_model(joint_ckpt, "tflite", out)
    with pytest.raises(InputError, match="inputs are never overwritten"):
        export_model(joint_ckpt, "onnx", joint_ckpt, force=True)
    with pytest.raises(InputError, match="not found"):
        export_model(tmp_path / "missing.pt", "onnx", out)
    assert not out.exists()
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="--force"):
        export_model(joint_ckpt, "onnx", out, window=(8, 32, 32))
    assert out.read_bytes() == b"old"
    export_model(joint_ckpt, "onnx", out, window=(8, 32, 32), force=True)
    assert read_export_info(out).target == "joint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "no temporary file left behind"


def test_load_model_refuses_foreign_and_mismatched_files(tmp_path, joint_ckpt):
    onnx_path = export_model(joint_ckpt, "onnx", tmp_path / "m.onnx", window=(8, 32, 32)).path
    with pytest.raises(InputError, match="--backend onnxruntime"):
        load_model(onnx_path, "torch")
    with pytest.raises(ConfigError, match="torch, onnxruntime"):
        load_model(onnx_path, "tensorrt")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a readable ONNX model"):
        load_model(garbage, "onnxruntime")
    # a valid ONNX graph that covidseg did not write
    node = helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME])
    graph = helper.make_graph([node], "foreign", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, None)])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)]), str(foreign))
    with pytest.raises(InputError, match="no covidseg metadata"):
        load_model(foreign, "onnxruntime")
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "none.onnx", "onnxruntime")


def test_cli_export_writes_and_reports(tmp_path, joint_ckpt, capsys):
    from covidseg.cli.main import run

    out = tmp_path / "cli.onnx"
    with pytest.raises(SystemExit) as exit_info:
        run(["export", str(joint_ckpt), "--format", "onnx", "-o", str(out), "--window", "8", "32", "32"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "max |logit difference|" in text and "target joint" in text
    with pytest.raises(SystemExit) as exit_info:
        run(["export", str(joint_ckpt), "--format", "onnx", "-o", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err


def test_export_uses_the_checkpoint_window_by_default(tmp_path):
    torch.manual_seed(0)
    model = create_model(variant_config("unet", **TINY))
    config = dataclasses.replace(Config(), inference=InferenceConfig(window=(4, 24, 20)))
    ckpt = save_checkpoint(tmp_path / "m.pt", model, config, target="infection")
    report = export_model(ckpt, "onnx", tmp_path / "m.onnx")
    assert report.window == (4, 24, 20) and read_export_info(report.path).window == (4, 24, 20)
