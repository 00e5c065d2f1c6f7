"""Sliding-window inference: agreement with MONAI, identity, box/mask restriction, bf16, TTA, state restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from covidseg.config import InferenceConfig, ModelConfig, RuntimeConfig
from covidseg.errors import ConfigError, UserError
from covidseg.inference.sliding_window import (
    gaussian_importance,
    mask_box,
    predict_volume,
    scan_starts,
)
from covidseg.models import create_model
from covidseg.runtime import resolve_device

MONAI_TOLERANCE = 1e-5
"""Largest difference of probabilities allowed against MONAI in float32 (same windows, weights and order)."""
BF16_TOLERANCE = 0.02
"""Largest difference of probabilities allowed between bfloat16 autocast and float32 on a tiny random net."""
F32 = RuntimeConfig(bf16="off")
"""Exact float32 windows (the comparisons with MONAI and with the input are exact only there)."""


def _tiny_model(seed: int = 0, out_channels: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(ModelConfig(base_width=4, out_channels=out_channels))
    return model.eval()


class Logit(nn.Module):
    """An identity-like model: the logit of its input, so the sigmoid of its output gives the input back."""

    spatial_dims = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` in (0, 1) -> ``(B, 1, D, H, W)`` logits."""
        return torch.logit(x.clamp(1e-6, 1 - 1e-6))


def test_gaussian_matches_monai() -> None:
    from monai.data.utils import compute_importance_map

    for window in [(8, 32, 32), (5, 17, 9)]:
        ref = compute_importance_map(window, mode="gaussian", sigma_scale=0.125).numpy()
        np.testing.assert_allclose(gaussian_importance(window, 0.125), ref, rtol=1e-6, atol=1e-7)


def test_scan_starts_cover_and_end_at_border() -> None:
    assert scan_starts(128, 128, 0.25) == [0]
    starts = scan_starts(300, 128, 0.25)
    assert starts[0] == 0 and starts[-1] == 300 - 128
    assert all(b - a <= 96 for a, b in zip(starts, starts[1:], strict=False))


def test_matches_monai_sliding_window_inference() -> None:
    from monai.inferers import sliding_window_inference

    model = _tiny_model()
    model.set_deep_supervision(False)
    vol = np.random.default_rng(0).random((20, 40, 56), dtype=np.float32)
    cfg = InferenceConfig(window=(8, 32, 32), overlap=0.25)
    ours = predict_volume(model, vol, cfg, runtime=RuntimeConfig(bf16="off", batch_windows=3))
    with torch.no_grad():
        ref = sliding_window_inference(torch.from_numpy(vol)[None, None], (8, 32, 32), 3, model, overlap=0.25,
                                       mode="gaussian", sigma_scale=0.125)
    ref_prob = torch.sigmoid(ref)[0].numpy()
    assert ours.shape == (1, 20, 40, 56) and ours.dtype == np.float32
    assert np.abs(ours - ref_prob).max() < MONAI_TOLERANCE


def test_identity_model_gives_input_back() -> None:
    vol = np.random.default_rng(1).uniform(0.05, 0.95, (12, 40, 50)).astype(np.float32)
    out = predict_volume(Logit(), vol, InferenceConfig(window=(8, 32, 32), overlap=0.5), runtime=F32)
    np.testing.assert_allclose(out[0], vol, atol=1e-5)
    # a volume smaller than the window is padded and cropped back
    small = vol[:4, :20, :20]
    out = predict_volume(Logit(), small, InferenceConfig(window=(8, 32, 32)), runtime=F32)
    np.testing.assert_allclose(out[0], small, atol=1e-5)


def test_box_and_mask_restrict_and_stay_exact_inside() -> None:
    vol = np.random.default_rng(2).uniform(0.05, 0.95, (16, 64, 64)).astype(np.float32)
    mask = np.zeros(vol.shape, dtype=bool)
    mask[4:10, 10:30, 12:28] = True
    box = mask_box(mask, (1, 2, 2))
    assert box == (slice(3, 11), slice(8, 32), slice(10, 30))
    cfg = InferenceConfig(window=(8, 32, 32))
    out = predict_volume(Logit(), vol, cfg, box=box, mask=mask, runtime=F32)
    np.testing.assert_allclose(out[0][mask], vol[mask], atol=1e-5)
    outside = np.ones(vol.shape, dtype=bool)
    outside[box] = False
    assert not out[0][outside].any()
    # the real model: mask-skipped windows change nothing on the mask
    model = _tiny_model(3)
    full = predict_volume(model, vol, InferenceConfig(window=(8, 32, 32)), runtime=F32)
    restricted = predict_volume(model, vol, InferenceConfig(window=(8, 32, 32)), box=box, mask=mask, runtime=F32)
    np.testing.assert_allclose(restricted[0][mask], full[0][mask], atol=1e-6)  # same windows: same answer


def test_voxels_under_skipped_windows_are_zero_and_the_rest_exact() -> None:
    """Two lungs far apart: the windows between them hold no mask voxel and are skipped, so the region between gets
    no prediction (0), while every mask voxel keeps the whole-volume answer."""
    vol = np.random.default_rng(7).uniform(0.05, 0.95, (16, 40, 160)).astype(np.float32)
    mask = np.zeros(vol.shape, dtype=bool)
    mask[4:12, 8:30, 4:20] = True
    mask[4:12, 8:30, 140:156] = True
    model = _tiny_model(8)
    cfg = InferenceConfig(window=(8, 32, 32))
    full = predict_volume(model, vol, cfg, runtime=F32)
    out = predict_volume(model, vol, cfg, box=mask_box(mask), mask=mask, runtime=F32)
    np.testing.assert_allclose(out[0][mask], full[0][mask], atol=1e-6)
    assert not out[0][:, :, 60:100].any()  # under skipped windows only
    assert (out[0][mask] > 0).all()


def test_bf16_close_to_float32_and_tta_symmetric() -> None:
    model = _tiny_model(4)
    vol = np.random.default_rng(4).random((8, 32, 48), dtype=np.float32)
    f32 = predict_volume(model, vol, InferenceConfig(window=(8, 32, 32)), runtime=F32)
    bf16 = predict_volume(model, vol, InferenceConfig(window=(8, 32, 32)), runtime=RuntimeConfig(bf16="on"))
    assert np.abs(f32 - bf16).max() < BF16_TOLERANCE
    # TTA over W flips: a W-mirrored volume gives the W-mirrored prediction
    cfg = InferenceConfig(window=(8, 32, 48), tta=True, tta_axes=(2,))
    a = predict_volume(model, vol, cfg, runtime=F32)
    b = predict_volume(model, vol[:, :, ::-1].copy(), cfg, runtime=F32)
    np.testing.assert_allclose(a, b[:, :, :, ::-1], atol=1e-5)


def test_state_restored_and_errors() -> None:
    torch.manual_seed(0)
    model = create_model(ModelConfig(base_width=4, name="unet-fv-paspp-ds"))
    model.train()
    predict_volume(model, np.zeros((8, 32, 32), np.float32), InferenceConfig(window=(8, 32, 32)), runtime=F32)
    assert model.training and model.deep_supervision
    with pytest.raises(ConfigError, match="inference.window"):
        predict_volume(model, np.zeros((8, 32, 32), np.float32), InferenceConfig(window=(6, 32, 32)), runtime=F32)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device"):
            resolve_device("cuda")
