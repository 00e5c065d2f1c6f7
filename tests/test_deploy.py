"""The inference form of a network (covidseg.models.deploy): folded batch norm, dtype, memory format."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from covidseg.models import deploy
from covidseg.models.blocks import ConvBNReLU, FVBlock
from covidseg.models.deploy import GateFoldedFV, deploy_copy, fold_batch_norm, fold_gates
from covidseg.models.registry import create_model, variant_config

FOLD_TOLERANCE = 1e-4
"""Largest |logit| difference allowed between a folded float32 copy and the original (float rounding only)."""
BF16_LOGIT_TOLERANCE = 0.1
"""Largest |logit| difference allowed between the bfloat16 copy and the float32 original on a small random net."""


def _model(spatial_dims: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    name = "unet-fv-paspp-ds" + ("-2d" if spatial_dims == 2 else "")
    model = create_model(variant_config(name, base_width=4))
    for module in model.modules():  # statistics far from the identity, so that a wrong fold shows
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.3, 3.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return model.eval().set_deep_supervision(False)


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_folded_copy_matches_the_original(spatial_dims: int) -> None:
    model = _model(spatial_dims)
    x = torch.rand((2, 1, 8, 32, 32) if spatial_dims == 3 else (2, 1, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = deploy_copy(model)
    with torch.inference_mode():
        ref, out = model(x), deployed(x)
    assert (ref - out).abs().max().item() < FOLD_TOLERANCE
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    # the original is untouched
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bf16_channels_last_copy_is_close_and_in_its_layout() -> None:
    model = _model()
    x = torch.rand(1, 1, 8, 32, 32)
    deployed = deploy_copy(model, torch.bfloat16, channels_last=True)
    conv = next(m for m in deployed.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3))
    assert conv.weight.dtype == torch.bfloat16
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        ref = model(x)
        out = deployed(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)).float()
    assert (ref - out).abs().max().item() < BF16_LOGIT_TOLERANCE


def test_fold_refuses_a_training_model() -> None:
    model = _model().train()
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(model)


@pytest.mark.parametrize("name", ["unet-fv-paspp-ds", "unet-fv-ce-paspp-ds", "unet-fv-paspp-ds-2d"])
def test_gate_folded_fv_is_the_same_map(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(variant_config(name, base_width=4)).eval().set_deep_supervision(False)
    shape = (2, 1, 32, 32) if name.endswith("-2d") else (2, 1, 8, 32, 32)  # a batch of 2: per-sample weights
    x = torch.rand(shape)
    folded = fold_batch_norm(copy.deepcopy(model))
    gated = fold_gates(copy.deepcopy(folded))
    assert sum(isinstance(m, GateFoldedFV) for m in gated.modules()) == model.config.depth
    assert not any(isinstance(m, FVBlock) for m in gated.modules())
    with torch.inference_mode():
        ref, out = model(x), gated(x)
    assert (ref - out).abs().max().item() < FOLD_TOLERANCE


def test_gates_are_folded_in_bf16_and_in_float32_only_with_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    for dtype in (torch.bfloat16, torch.float32):
        deployed = deploy_copy(model, dtype, channels_last=True)
        assert any(isinstance(m, GateFoldedFV) for m in deployed.modules()) == (dtype == torch.bfloat16
                                                                                or deploy.onednn_fused_ops())
        assert not any(isinstance(m, ConvBNReLU) for m in deployed.modules())
    # a torch without oneDNN's fused operators: float32 keeps the FV blocks (a batch of one would be slow)
    monkeypatch.setattr(deploy, "onednn_fused_ops", lambda: False)
    assert not any(isinstance(m, GateFoldedFV) for m in deploy_copy(model, torch.float32).modules())
    assert any(isinstance(m, GateFoldedFV) for m in deploy_copy(model, torch.bfloat16).modules())


@pytest.mark.skipif(not deploy.onednn_fused_ops(), reason="this torch has no oneDNN fused operators to compare")
@pytest.mark.parametrize("name", ["unet-fv-paspp-ds", "unet-fv-ce-paspp-ds", "unet-fv-paspp-ds-2d"])
@pytest.mark.parametrize("batch", [1, 3])
def test_onednn_fused_operators_equal_plain_convolutions(name: str, batch: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU path (convolution + ReLU in one oneDNN call, the FV fusion summed in place per sample) against the
    same copy run by plain torch convolutions (what a GPU runs), float32 and channels-last as segment feeds it."""
    torch.manual_seed(1)
    model = _model(2 if name.endswith("-2d") else 3)
    if "-ce-" in name:
        model = create_model(variant_config(name, base_width=4)).eval().set_deep_supervision(False)
    shape = (batch, 1, 32, 32) if name.endswith("-2d") else (batch, 1, 8, 32, 32)
    x = torch.rand(shape)
    deployed = deploy_copy(model, torch.float32, channels_last=True)
    if x.ndim == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():  # as predict_volume calls it: the operators are probed here the first time
        deploy.onednn_fused_ops.cache_clear()
        assert deploy._fused(x)
        fused = deployed(x)
        monkeypatch.setattr(deploy, "_fused", lambda t: False)
        plain = deployed(x)
        ref = model(x)
    assert fused.shape == plain.shape == ref.shape
    assert (fused - plain).abs().max().item() < FOLD_TOLERANCE
    assert (fused - ref).abs().max().item() < FOLD_TOLERANCE


def test_a_torch_whose_fused_operators_fail_falls_back_to_plain_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe runs the operators once; where they raise (a build or CPU without them), deploy copies use plain
    convolutions and give the same logits instead of failing in the middle of a CT."""

    def broken(*args: object) -> None:
        raise RuntimeError("no oneDNN here")

    model = _model()
    x = torch.rand(2, 1, 8, 32, 32)
    deploy.onednn_fused_ops.cache_clear()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", broken)
    try:
        assert not deploy.onednn_fused_ops()
        assert not deploy._fused(x)
        with torch.inference_mode():
            out, ref = deploy_copy(model)(x), model(x)
        assert (out - ref).abs().max().item() < FOLD_TOLERANCE
    finally:
        deploy.onednn_fused_ops.cache_clear()
