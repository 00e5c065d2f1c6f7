"""The network family: shapes, gradients, determinism, pinned sizes, blocks, registry, FLOP counting, CLI."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covidseg.config import ModelConfig
from covidseg.errors import ConfigError, InputError
from covidseg.models import MODELS, UNet, create_model, variant_config
from covidseg.models.blocks import (
    PASPP,
    PASPP_DILATIONS,
    CEChannelAttention,
    ConvBNReLU,
    FVBlock,
    SEChannelAttention,
    SpatialAttention,
    UpsampleHead,
)
from covidseg.models.flops import count_flops, count_parameters, measure

TINY = {"base_width": 4, "depth": 2, "slice_poolings": 2}
SHAPE_3D = (2, 1, 8, 32, 32)
SHAPE_2D = (2, 1, 32, 32)
COMBOS = list(itertools.product((3, 2), ("none", "se", "ce"), (False, True), (False, True)))


def tiny(dims: int = 3, fv: str = "se", paspp: bool = True, ds: bool = True, **kw) -> ModelConfig:
    fields = {**TINY, **kw}
    return ModelConfig(name="custom", spatial_dims=dims, fv=fv, paspp=paspp, deep_supervision=ds, **fields)


def build(cfg: ModelConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return create_model(cfg)


@pytest.mark.parametrize(("dims", "fv", "paspp", "ds"), COMBOS)
def test_output_shapes_every_switch_combination(dims, fv, paspp, ds):
    model = build(tiny(dims, fv, paspp, ds, out_channels=3))
    shape = SHAPE_3D if dims == 3 else SHAPE_2D
    out = model(torch.randn(shape))
    expected = (shape[0], 3, *shape[2:])
    if ds:
        assert isinstance(out, list) and len(out) == TINY["depth"] == model.num_heads
        assert all(o.shape == expected for o in out)
    else:
        assert isinstance(out, torch.Tensor) and out.shape == expected
    assert (len(model.fv) == TINY["depth"]) and all(isinstance(b, FVBlock) == (fv != "none") for b in model.fv)
    assert isinstance(model.paspp, PASPP) == paspp


@pytest.mark.parametrize(("dims", "fv"), [(3, "se"), (3, "ce"), (2, "se"), (2, "ce")])
def test_gradients_reach_every_parameter(dims, fv):
    model = build(tiny(dims, fv, True, True))
    x = torch.randn(SHAPE_3D if dims == 3 else SHAPE_2D)
    outputs = model(x)
    sum(o.square().mean() for o in outputs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing


def test_same_seed_same_output_and_other_seed_differs():
    x = torch.randn(SHAPE_3D)
    a, b, c = (build(tiny(), seed).eval() for seed in (0, 0, 1))
    with torch.no_grad():
        ya, yb, yc = a(x), b(x), c(x)
    assert all(torch.equal(p, q) for p, q in zip(ya, yb, strict=True))
    assert not torch.allclose(ya[0], yc[0])


def test_deep_supervision_off_returns_one_tensor_equal_to_the_final_head():
    model = build(tiny()).eval()
    x = torch.randn(SHAPE_3D)
    with torch.no_grad():
        heads = model(x)
        assert isinstance(heads, list)
        model.set_deep_supervision(False)
        single = model(x)
    assert isinstance(single, torch.Tensor) and torch.equal(single, heads[0])
    # the train/eval mode never changes the return type
    model.train()
    assert isinstance(model(x), torch.Tensor)
    model.set_deep_supervision(True)
    model.eval()
    assert isinstance(model(x), list)


def test_enabling_heads_on_a_model_without_them_is_an_error():
    with pytest.raises(ConfigError, match="without deep-supervision heads"):
        build(tiny(ds=False)).set_deep_supervision(True)


# Pinned at the default width (base_width 16, depth 4, slice_poolings 2, 1 input and 1 output channel).
PINNED_PARAMS = {
    "unet": 5_482_545,
    "unet-fv-se": 7_587_069,
    "unet-fv-ce": 7_576_073,
    "unet-fv-paspp": 8_195_325,
    "unet-fv-paspp-ds": 8_195_552,
    "unet-2d": 1_942_289,
    "unet-fv-se-2d": 2_673_773,
    "unet-fv-ce-2d": 2_662_777,
    "unet-fv-paspp-2d": 2_987_117,
    "unet-fv-paspp-ds-2d": 2_987_344,
}


@pytest.mark.parametrize("name", sorted(PINNED_PARAMS))
def test_parameter_counts_pinned(name):
    with torch.device("meta"):
        model = create_model(variant_config(name))
    assert count_parameters(model) == PINNED_PARAMS[name]


def test_size_divisor_and_anisotropic_pooling():
    model = build(variant_config("unet", depth=4, slice_poolings=2, base_width=2))
    assert model.size_divisor == (4, 16, 16)
    assert model.pool_factors == [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert build(variant_config("unet-2d", depth=3, base_width=2)).size_divisor == (8, 8)
    # the report's 128x128x8 patch fits the default depth
    build(variant_config("unet", base_width=2)).check_input_shape((1, 1, 8, 128, 128))


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 1, 8, 30, 32), r"input size 8x30x32 \(D x H x W\) does not fit 2 poolings of the row axis; use a "
                            r"multiple of 4 \(8x32x32: pad or crop\)"),
        ((1, 1, 6, 32, 32), "8x32x32: pad or crop"),
        ((1, 1, 2, 32, 32), "4x32x32: pad or crop"),
        ((1, 2, 8, 32, 32), "expected 1 channel"),
        ((1, 1, 32, 32), r"expected \(B, C, D, H, W\)"),
    ],
)
def test_bad_input_shape_names_a_valid_size(shape, match):
    with pytest.raises(InputError, match=match):
        build(tiny())(torch.zeros(shape))


def test_se_gives_one_weight_per_channel_and_ce_one_per_sample():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 2, 4, 4)
    se, ce = SEChannelAttention(3, 8, reduction=2), CEChannelAttention(3, 8, reduction=2)
    w_se, w_ce = se.weights(x), ce.weights(x)
    assert w_se.shape == (3, 8, 1, 1, 1)
    assert w_ce.shape == (3, 1, 1, 1, 1)
    assert torch.all((w_se > 0) & (w_se < 1)) and torch.all((w_ce > 0) & (w_ce < 1))
    assert len(torch.unique(w_se[0])) == 8  # per channel
    assert len(torch.unique(w_ce.flatten())) == 3  # per sample
    torch.testing.assert_close(ce(x), x * w_ce.expand(-1, 8, -1, -1, -1))
    torch.testing.assert_close(se(x), x * w_se)
    assert ce.fc2.out_channels == 1 and se.fc2.out_channels == 8 and se.fc1.out_channels == 4


def test_ce_has_no_nonlinearity_between_its_fully_connected_layers():
    """docs/method.md: the CE weight is sigmoid of an affine map of the pooled features."""
    torch.manual_seed(0)
    ce = CEChannelAttention(2, 8)
    x = torch.randn(2, 8, 4, 4)
    w1, b1 = ce.fc1.weight.flatten(1), ce.fc1.bias
    w2, b2 = ce.fc2.weight.flatten(1), ce.fc2.bias
    pooled = x.mean(dim=(2, 3))
    expected = torch.sigmoid((pooled @ w1.T + b1) @ w2.T + b2)
    torch.testing.assert_close(ce.weights(x).flatten(1), expected)


def test_spatial_branch_gives_one_map_per_voxel():
    sp = SpatialAttention(3, 8)
    x = torch.randn(2, 8, 4, 6, 6)
    w = sp.weights(x)
    assert w.shape == (2, 1, 4, 6, 6)
    torch.testing.assert_close(sp(x), x * w)


@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("dilation", PASPP_DILATIONS)
def test_paspp_preserves_spatial_size_for_every_dilation(dims, dilation):
    # bottleneck-like sizes smaller than the dilation (2 slices, 4x4 in-plane)
    spatial = (2, 4, 4) if dims == 3 else (4, 4)
    x = torch.randn(2, 16, *spatial)
    conv = ConvBNReLU(dims, 4, 4, kernel_size=3, dilation=dilation)
    assert conv(torch.randn(2, 4, *spatial)).shape[2:] == spatial
    block = PASPP(dims, 16, dilations=(dilation,) * 4)
    assert block(x).shape == x.shape
    assert PASPP(dims, 16)(x).shape == x.shape


def test_paspp_progressive_fusion_wiring():
    """With the atrous branches zeroed, o_i = b_1 + b_2 (resp. b_3 + b_4) as docs/method.md describes."""
    torch.manual_seed(0)
    block = PASPP(3, 8).eval()
    x = torch.randn(1, 8, 2, 4, 4)
    for atrous in block.atrous:
        nn.init.zeros_(atrous[0].weight)
        atrous[1].bias.data.zero_()  # BN(0) = bias = 0, ReLU(0) = 0
    with torch.no_grad():
        b = [r(x) for r in block.reduce]
        p12 = block.fuse_pairs[0](torch.cat([b[0] + b[1], b[0] + b[1]], 1))
        p34 = block.fuse_pairs[1](torch.cat([b[2] + b[3], b[2] + b[3]], 1))
        torch.testing.assert_close(block(x), x + block.fuse(torch.cat([p12, p34], 1)))
    assert [a[0].dilation for a in block.atrous] == [(1, d, d) for d in PASPP_DILATIONS]


def test_fv_block_is_residual():
    torch.manual_seed(0)
    fv = FVBlock(3, 8, "se").eval()
    nn.init.zeros_(fv.fuse[0].weight)
    fv.fuse[1].bias.data.zero_()
    x = torch.randn(1, 8, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(fv(x), x)


def test_head_1x1_then_upsample_equals_upsample_then_1x1():
    """The report upsamples and then applies the 1x1x1 conv; the two orders are the same linear map."""
    torch.manual_seed(0)
    head = UpsampleHead(3, 8, 2)
    x = torch.randn(1, 8, 2, 4, 4)
    size = (8, 16, 16)
    report_order = head.conv(F.interpolate(x, size=size, mode="trilinear", align_corners=False))
    torch.testing.assert_close(head(x, size), report_order, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_and_channels_last_on_cpu():
    model = build(tiny()).eval()
    model.set_deep_supervision(False)
    x = torch.randn(SHAPE_3D)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        model = model.to(memory_format=torch.channels_last_3d)
        cl = model(x.to(memory_format=torch.channels_last_3d))
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(cl, ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- registry


def test_every_variant_has_a_2d_twin_and_the_required_names_exist():
    for name in ("unet", "unet-fv-se", "unet-fv-ce", "unet-fv-paspp", "unet-fv-paspp-ds"):
        assert MODELS[name]["spatial_dims"] == 3
        twin = MODELS[f"{name}-2d"]
        assert twin == {**MODELS[name], "spatial_dims": 2}
    assert MODELS["unet-fv-paspp-ds"] == {"spatial_dims": 3, "fv": "se", "paspp": True, "deep_supervision": True}


def test_name_decides_the_switches():
    model = create_model(ModelConfig(name="unet", **TINY))  # other switch fields at their defaults
    assert model.config.fv == "none" and not model.config.paspp and not model.deep_supervision
    assert isinstance(model.paspp, nn.Identity) and not len(model.ds_heads)
    ce = create_model(variant_config("unet-fv-ce", **TINY))
    assert isinstance(ce.fv[0].channel, CEChannelAttention)
    custom = create_model(tiny(2, "ce", False, True))
    assert custom.spatial_dims == 2 and custom.deep_supervision and isinstance(custom.paspp, nn.Identity)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unet-fv-paspp-ds-2d"):
        create_model(ModelConfig(name="unet++"))
    with pytest.raises(ConfigError, match="not a known variant"):
        variant_config("resnet")


def test_switch_contradicting_the_name_is_an_error():
    with pytest.raises(ConfigError, match="model.fv='ce' contradicts model.name='unet'"):
        create_model(ModelConfig(name="unet", fv="ce", **TINY))
    with pytest.raises(ConfigError, match="spatial_dims=2"):
        create_model(ModelConfig(name="unet-fv-paspp-ds", spatial_dims=2, **TINY))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"slice_poolings": 5}, "slice_poolings"),
        ({"base_width": 0}, "base_width"),
        ({"base_width": 1, "depth": 1, "slice_poolings": 1}, "divisible by 4"),
        ({"depth": 1, "slice_poolings": 1, "base_width": 4}, "deep_supervision needs depth >= 2"),
    ],
)
def test_invalid_model_settings(fields, match):
    with pytest.raises(ConfigError, match=match):
        create_model(variant_config("unet-fv-paspp-ds", **fields))


# ------------------------------------------------------------------------------------------------- FLOPs


def test_flop_counter_counts_two_flops_per_multiply_add():
    conv = nn.Conv3d(4, 8, 3, padding=1, bias=False)
    assert count_flops(conv, (1, 4, 2, 4, 4)) == 2 * 4 * 8 * 27 * (2 * 4 * 4)


def test_flops_of_the_final_model_pinned_and_ordered():
    final = measure(variant_config("unet-fv-paspp-ds"))
    assert final.input_shape == (1, 1, 8, 128, 128)
    assert round(final.flops_per_voxel) == 225_189
    plain = measure(variant_config("unet"))
    assert plain.flops < measure(variant_config("unet-fv-se")).flops < final.flops
    # heads are off for the count: DS does not change the cost
    assert measure(variant_config("unet-fv-paspp")).flops == final.flops


def test_cli_model_info_lists_every_variant(capsys):
    from covidseg.cli.main import run

    with pytest.raises(SystemExit) as exit_info:
        run(["model", "info", "--base-width", "4", "--depth", "3"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in MODELS:
        assert f"\n{name} " in out
    assert "kFLOP/voxel" in out


def test_cli_model_info_bad_patch_is_a_one_line_error(capsys):
    from covidseg.cli.main import run

    with pytest.raises(SystemExit) as exit_info:
        run(["model", "info", "--patch", "8", "100", "128"])
    assert exit_info.value.code == 2
    assert "8x112x128: pad or crop" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_keeps_dynamic_spatial_sizes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = build(tiny(ds=True)).eval()
    model.set_deep_supervision(False)
    path = tmp_path / "model.onnx"
    axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    # the TorchScript exporter takes 3 s here; the torch.export one (dynamo=True, Dim.AUTO) also works but takes 13 s
    torch.onnx.export(model, (torch.randn(1, 1, 8, 32, 32),), str(path), input_names=["ct"], output_names=["logits"],
                      dynamic_axes={"ct": axes, "logits": axes}, dynamo=False)
    x = torch.randn(2, 1, 12, 48, 16)  # another size, still a multiple of size_divisor (4, 4, 4)
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort.InferenceSession(str(path)).run(None, {"ct": x.numpy()})[0]
    assert got.shape == expected.shape
    assert abs(got - expected).max() < 1e-4
