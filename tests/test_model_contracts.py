"""The two contracts every caller of a model shares: which sizes fit its poolings, and its deep-supervision switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covidseg.config import ModelConfig
from covidseg.errors import ConfigError, InputError
from covidseg.models import create_model, variant_config
from covidseg.models.heads import heads_off, heads_on, set_heads
from covidseg.models.shapes import check_fits, fit_message, fit_size, pool_factors, size_divisor


def test_divisor_follows_the_poolings_and_matches_the_built_model():
    for cfg in (variant_config("unet", depth=4, slice_poolings=2), variant_config("unet", depth=3, slice_poolings=0),
                variant_config("unet-2d", depth=3)):
        assert size_divisor(cfg) == create_model(dataclass_copy(cfg, base_width=4)).size_divisor
    assert size_divisor(variant_config("unet", depth=4, slice_poolings=2)) == (4, 16, 16)
    assert pool_factors(variant_config("unet", depth=3, slice_poolings=1)) == [(2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert size_divisor(variant_config("unet-2d", depth=3)) == (8, 8)


def dataclass_copy(cfg: ModelConfig, **changes: object) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_message_of_the_style_guide():
    """STYLE.md's example, in this project's axis order (D, H, W): the report's 128x128x8 patch is 8x128x128."""
    message = fit_message("patch", (6, 128, 128), (8, 16, 16))
    assert message == ("patch 6x128x128 (D x H x W) does not fit 3 poolings of the slice axis; use a multiple of 8 "
                       "(e.g. 8x128x128) or fewer poolings")
    assert fit_message("patch", (8, 128, 128), (8, 16, 16)) is None
    two = fit_message("window", (3, 30, 32), (4, 16, 16), use="--set inference.window={fit}", fewer=None)
    assert two == ("window 3x30x32 (D x H x W) does not fit 2 poolings of the slice axis and 4 of the row axis; use "
                   "multiples of 4 and 16 (--set inference.window=4x32x32)")
    assert "1 pooling of the row axis" in fit_message("slice", (3, 4), (2, 2))
    assert fit_message("slice", (3, 4), (2, 2)).startswith("slice 3x4 (H x W) does not fit")


@pytest.mark.parametrize("size, divisor, up, down", [
    ((6, 30, 32), (4, 16, 16), (8, 32, 32), (4, 16, 32)),
    ((2, 8, 8), (4, 16, 16), (4, 16, 16), (4, 16, 16)),  # never below one divisor
    ((8, 128, 128), (4, 16, 16), (8, 128, 128), (8, 128, 128)),
])
def test_rounding_up_and_down(size, divisor, up, down):
    assert fit_size(size, divisor, "up") == up and fit_size(size, divisor, "down") == down
    for fit in (up, down):
        assert fit_message("x", fit, divisor) is None  # the suggestion fits


def test_check_raises_the_callers_error_and_refuses_mismatched_axes():
    with pytest.raises(InputError, match="does not fit"):
        check_fits("input", (8, 30, 32), (4, 4, 4), error=InputError)
    with pytest.raises(ConfigError, match="3 axes but the model pools 2"):
        check_fits("train.patch_size", (8, 128, 128), (16, 16))  # the 3-D patch of a 2-D model
    check_fits("input", (8, 32, 32), (4, 4, 4))


class Wrapper(nn.Module):
    """Stands for DDP / torch.compile: the model inside as ``_orig_mod``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def test_heads_off_block_restores_heads_and_mode_through_wrappers():
    torch.manual_seed(0)
    model = create_model(variant_config("unet-fv-paspp-ds", base_width=4, depth=2))
    model.train()
    x = torch.zeros(1, 1, 8, 16, 16)
    with heads_off(Wrapper(model)) as bare:
        assert bare is model and not model.training and not heads_on(model)
        assert isinstance(bare(x), torch.Tensor)
    assert model.training and heads_on(model) and isinstance(model(x), list)
    with pytest.raises(RuntimeError), heads_off(model):
        raise RuntimeError("a failing prediction")
    assert model.training and heads_on(model)  # restored on errors too


def test_set_heads_on_models_without_heads():
    plain = create_model(variant_config("unet", base_width=4, depth=2))
    assert set_heads(plain, False) is plain and not heads_on(plain)
    with pytest.raises(ConfigError, match="without deep-supervision heads"):
        set_heads(plain, True)
    other = nn.Conv3d(1, 1, 1)  # no switch at all: nothing to switch off, an error to switch on
    assert set_heads(other, False) is other
    with pytest.raises(ConfigError, match="no deep-supervision heads"):
        set_heads(other, True)
    with heads_off(other) as bare:
        assert bare is other and not other.training
