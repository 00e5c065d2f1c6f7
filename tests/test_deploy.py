"""The inference forms of a network (covidseg.models.deploy, covidseg.models.onednn) against the plain model: the
un-transformed ``UNet`` in float32."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from covidseg.config import RuntimeConfig
from covidseg.inference import sliding_window
from covidseg.models import onednn
from covidseg.models.blocks import ConvBNReLU, FVBlock
from covidseg.models.deploy import BATCH_NORMS, deploy_copy, fold_batch_norm
from covidseg.models.onednn import ConvReLU, GateFoldedFV
from covidseg.models.registry import create_model, variant_config

FOLD_TOLERANCE = 1e-4
"""Largest |logit| difference allowed between a float32 inference form and the plain model (float rounding only;
a batch norm variance 20 % off in one layer moves these logits by about 1e-3)."""
BF16_ERROR_FACTOR = 2.0
"""A bfloat16 form's largest |logit| difference from the plain float32 model may be at most this many times that of
the plain model itself run in bfloat16 (the rounding every bfloat16 form pays; a wrong map is off by far more)."""
MIN_LOGIT_SPREAD = 100 * FOLD_TOLERANCE
"""Standard deviation the test model's logits must have, so that a form giving constant logits cannot pass."""
MODELS = ["unet-fv-paspp-ds", "unet-fv-ce-paspp-ds", "unet-fv-paspp-ds-2d"]


def _model(name: str = MODELS[0], seed: int = 0) -> nn.Module:
    """A small random network whose batch norm statistics are far from the identity (so that a wrong fold shows)
    and whose logits vary from voxel to voxel."""
    torch.manual_seed(seed)
    model = create_model(variant_config(name, base_width=4))
    for module in model.modules():
        if isinstance(module, BATCH_NORMS):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(0.0, 0.5)  # positive: the ReLUs stay alive through the depth
    return model.eval().set_deep_supervision(False)


def _input(name: str, batch: int, small: bool = False) -> torch.Tensor:
    torch.manual_seed(1)
    if name.endswith("-2d"):
        return torch.rand(batch, 1, 32, 32)
    return torch.rand((batch, 1, 4, 16, 16) if small else (batch, 1, 8, 32, 32))


def _feed(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last and x.ndim == 5 else x


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kernels", ["public", "onednn"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_float32_form_is_the_plain_model(name: str, kernels: str, channels_last: bool, batch: int) -> None:
    """Each form and layout, batches of 1 and 3 (the folded gates are made per sample), against the plain model."""
    model = _model(name)
    x = _input(name, batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = deploy_copy(model, torch.float32, channels_last=channels_last, kernels=kernels)  # type: ignore[arg-type]
    with torch.inference_mode():
        ref = model(x)
        out = deployed(_feed(x, torch.float32, channels_last))
    assert ref.std().item() > MIN_LOGIT_SPREAD
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= FOLD_TOLERANCE
    assert not any(isinstance(m, BATCH_NORMS) for m in deployed.modules())
    # the original is untouched
    assert any(isinstance(m, BATCH_NORMS) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name, kernels", [(MODELS[0], "public"), (MODELS[0], "onednn"), (MODELS[2], "public"),
                                           (MODELS[2], "onednn")])
def test_bf16_form_is_as_close_to_the_plain_float32_model_as_bf16_rounding(name: str, kernels: str) -> None:
    """bfloat16 runs on any CPU (emulated without AVX512-BF16, slowly: a small input)."""
    model = _model(name)
    x = _input(name, 2, small=True)
    deployed = deploy_copy(model, torch.bfloat16, channels_last=True, kernels=kernels)  # type: ignore[arg-type]
    conv = next(m for m in deployed.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)) and max(m.kernel_size) == 3)
    assert conv.weight.dtype == torch.bfloat16
    if x.ndim == 5:
        assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        ref = model(x)
        rounding = (copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16)).float() - ref).abs().max().item()
        out = deployed(_feed(x, torch.bfloat16, True))
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert ref.std().item() > MIN_LOGIT_SPREAD
    assert 0 < (out.float() - ref).abs().max().item() <= BF16_ERROR_FACTOR * rounding


def test_fold_refuses_a_training_model() -> None:
    model = _model().train()
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(model)


def test_public_form_holds_only_torch_modules() -> None:
    deployed = deploy_copy(_model(), torch.float32, channels_last=True)
    assert not any(isinstance(m, (GateFoldedFV, ConvReLU)) for m in deployed.modules())
    assert sum(isinstance(m, FVBlock) for m in deployed.modules()) > 0
    assert all(isinstance(m[1], nn.Identity) for m in deployed.modules() if isinstance(m, ConvBNReLU))
    with pytest.raises(ValueError, match="kernels"):
        deploy_copy(_model(), kernels="mkl")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", MODELS)
def test_gate_folded_fv_is_the_same_map_and_keeps_its_weights_in_the_state_dict(name: str) -> None:
    model = _model(name)
    x = _input(name, 2)  # a batch of 2: per-sample weights
    gated = onednn.onednn_form(fold_batch_norm(copy.deepcopy(model)), torch.bfloat16)  # gates folded in any case
    assert sum(isinstance(m, GateFoldedFV) for m in gated.modules()) == model.config.depth
    assert not any(isinstance(m, FVBlock) for m in gated.modules())
    assert any(key.endswith(".w1") for key in gated.state_dict())
    with torch.inference_mode():
        ref, out = model(x), gated(x)
    assert (ref - out).abs().max().item() <= FOLD_TOLERANCE


def test_onednn_form_folds_gates_in_float32_only_with_the_fused_operators(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    with_ops = deploy_copy(model, torch.float32, kernels="onednn")
    assert any(isinstance(m, GateFoldedFV) for m in with_ops.modules()) == onednn.onednn_fused_ops()
    # a torch without oneDNN's fused operators: float32 keeps the FV blocks (a batch of one would be slow)
    monkeypatch.setattr(onednn, "onednn_fused_ops", lambda: False)
    assert not any(isinstance(m, GateFoldedFV) for m in deploy_copy(model, torch.float32, kernels="onednn").modules())
    assert any(isinstance(m, GateFoldedFV) for m in deploy_copy(model, torch.bfloat16, kernels="onednn").modules())


@pytest.mark.skipif(not onednn.onednn_fused_ops(), reason="this torch has no oneDNN fused operators to compare")
@pytest.mark.parametrize("name", MODELS)
def test_onednn_fused_operators_equal_plain_convolutions(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused CPU path against the same copy run by plain torch convolutions, float32 and channels-last."""
    model = _model(name)
    x = _feed(_input(name, 3), torch.float32, True)
    deployed = deploy_copy(model, torch.float32, channels_last=True, kernels="onednn")
    with torch.inference_mode():  # as predict_volume calls it: the operators are probed here the first time
        onednn.onednn_fused_ops.cache_clear()
        assert onednn._fused(x)
        fused = deployed(x)
        monkeypatch.setattr(onednn, "_fused", lambda t: False)
        plain = deployed(x)
    assert (fused - plain).abs().max().item() <= FOLD_TOLERANCE


def test_a_torch_whose_fused_operators_fail_falls_back_to_plain_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe runs the operators once; where they raise (a build or CPU without them), the onednn form uses plain
    convolutions and gives the same logits instead of failing in the middle of a CT."""

    def broken(*args: object) -> None:
        raise RuntimeError("no oneDNN here")

    model = _model()
    x = _input(MODELS[0], 2)
    onednn.onednn_fused_ops.cache_clear()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", broken)
    try:
        assert not onednn.onednn_fused_ops()
        assert not onednn._fused(x)
        with torch.inference_mode():
            out, ref = deploy_copy(model, kernels="onednn")(x), model(x)
        assert (out - ref).abs().max().item() <= FOLD_TOLERANCE
    finally:
        onednn.onednn_fused_ops.cache_clear()


@pytest.mark.parametrize("device, kernels, expected", [("cpu", "public", "public"), ("cpu", "onednn", "onednn"),
                                                       ("cuda", "onednn", "public")])
def test_inference_form_chosen_by_the_cpu_option_and_the_device(device: str, kernels: str, expected: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``runtime.cpu_kernels`` picks the CPU form; a GPU always gets the public one."""
    seen: list[str] = []
    real = sliding_window.deploy_copy

    def spy(model: nn.Module, dtype: torch.dtype, channels_last: bool, kernels: str) -> nn.Module:
        seen.append(kernels)
        return real(model, dtype, channels_last, "public")

    monkeypatch.setattr(sliding_window, "deploy_copy", spy)
    cfg = RuntimeConfig(cpu_kernels=kernels)  # type: ignore[arg-type]
    sliding_window.inference_form(_model(), cfg, torch.device(device), torch.float32, torch.channels_last_3d)
    assert seen == [expected]
