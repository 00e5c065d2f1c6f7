"""Intensity conventions: detection, the one [0, 1] scale, lung-only input, and non-CT volumes refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from covidseg.config import IntensityConfig
from covidseg.errors import ConfigError, InputError
from covidseg.intensity import detect_convention, lung_only, normalize, resolve_convention, to_hu

SHAPE = (4, 16, 16)


def hu_volume(seed: int = 0, air: float = -1024.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.uniform(-900, 300, size=SHAPE).astype(np.float32)
    vol[:, :2] = air  # air / padding outside the body
    return vol


def windowed_from_hu(hu: np.ndarray) -> np.ndarray:
    """What the radiopaedia cases are: [-1250, 250] HU clipped and rescaled to [0, 255]."""
    return ((np.clip(hu, -1250, 250) + 1250) / 1500 * 255).astype(np.float32)


def test_detects_hu_and_windowed():
    hu = hu_volume()
    assert detect_convention(hu) == "hu"
    assert detect_convention(hu_volume(air=-3024.0)) == "hu"
    assert detect_convention(hu.astype(np.int16)) == "hu"
    assert detect_convention(windowed_from_hu(hu)) == "windowed"
    assert detect_convention(np.round(windowed_from_hu(hu)).astype(np.uint8)) == "windowed"


def test_both_conventions_land_on_the_same_scale():
    hu = hu_volume()
    cfg = IntensityConfig()
    np.testing.assert_allclose(normalize(hu, cfg), normalize(windowed_from_hu(hu), cfg), atol=1e-5)


def test_normalize_window_ends_and_clipping():
    cfg = IntensityConfig()
    vol = hu_volume()
    vol[0, 0, :4] = [-1250, 250, -2000, 1000]
    out = normalize(vol, cfg)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[0, 0, :4], [0, 1, 0, 1])
    np.testing.assert_allclose(out[0, 3, 3], (vol[0, 3, 3] + 1250) / 1500, rtol=1e-5)
    win = np.full(SHAPE, 127.5, np.float32)
    win[0, 0, :2] = [0, 255]
    np.testing.assert_allclose(normalize(win, cfg)[0, 0, :3], [0, 1, 0.5], atol=1e-6)


def test_window_is_a_setting():
    cfg = IntensityConfig(window_hu=(-1000.0, 0.0))
    vol = hu_volume()
    vol[0, 0, :3] = [-1000, -500, 0]
    np.testing.assert_allclose(normalize(vol, cfg)[0, 0, :3], [0, 0.5, 1], atol=1e-6)
    # a windowed volume still maps through its own source window ([-1250, 250] HU) first
    win = np.full(SHAPE, 0.0, np.float32)
    win[0, 0, :2] = [42.5, 255]  # -1000 HU and 250 HU
    np.testing.assert_allclose(normalize(win, cfg)[0, 0, :2], [0, 1], atol=1e-5)


def test_to_hu_inverts_windowing_inside_the_window():
    hu = np.clip(hu_volume(), -1250, 250)
    np.testing.assert_allclose(to_hu(windowed_from_hu(hu), "windowed"), hu, atol=0.01)
    np.testing.assert_array_equal(to_hu(hu, "hu"), hu)


def test_override_convention():
    vol = hu_volume()
    assert resolve_convention(vol, IntensityConfig(convention="windowed")) == "windowed"
    assert resolve_convention(vol, IntensityConfig(), convention="windowed") == "windowed"
    win = windowed_from_hu(vol)
    forced = normalize(win, IntensityConfig(convention="hu"))  # 0..255 read as HU: the override is obeyed
    np.testing.assert_allclose(forced, np.minimum((win + 1250) / 1500, 1.0), rtol=1e-6)
    with pytest.raises(ConfigError):
        resolve_convention(vol, IntensityConfig(), convention="mri")


@pytest.mark.parametrize("make, message", [
    (lambda: np.zeros(SHAPE, np.float32), "all zeros"),
    (lambda: np.full(SHAPE, 40.0, np.float32), "constant"),
    (lambda: np.where(np.arange(np.prod(SHAPE)).reshape(SHAPE) == 5, np.nan, hu_volume()), "NaN"),
    (lambda: np.where(np.arange(np.prod(SHAPE)).reshape(SHAPE) == 5, np.inf, hu_volume()), "infinite"),
    (lambda: np.random.default_rng(0).uniform(0, 1800, SHAPE).astype(np.float32), "MR image"),
    (lambda: hu_volume() + 1024, "rescale"),  # CT stored without its intercept (air = 0)
    (lambda: windowed_from_hu(hu_volume()) / 255, "normalised"),
    (lambda: np.random.default_rng(0).uniform(-200, 600, SHAPE).astype(np.float32), "neither"),
])
def test_non_ct_volumes_are_refused(make, message):
    with pytest.raises(InputError, match=message):
        detect_convention(make(), path="scan.nii.gz")


def test_forced_convention_still_refuses_nan_and_empty():
    with pytest.raises(InputError, match="all zeros"):
        normalize(np.zeros(SHAPE), IntensityConfig(convention="hu"))
    bad = hu_volume()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"scan\.nii: .*NaN"):
        normalize(bad, IntensityConfig(convention="hu"), path="scan.nii")


def test_lung_only_sets_outside_value():
    cfg = IntensityConfig(outside_lung_value=0.25)
    norm = normalize(hu_volume(), cfg)
    lungs = np.zeros(SHAPE, np.uint8)
    lungs[:, 4:8, 2:6] = 1
    lungs[:, 4:8, 10:14] = 2
    out = lung_only(norm, lungs, cfg)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[lungs > 0], norm[lungs > 0])
    assert np.all(out[lungs == 0] == 0.25)
    with pytest.raises(ValueError, match="does not match"):
        lung_only(norm, lungs[:, :8], cfg)


@settings(max_examples=40, deadline=None)
@given(lo=st.floats(-3100, -600), hi=st.floats(300, 3000), seed=st.integers(0, 100))
def test_property_any_hu_range_with_air_normalises_into_unit_interval(lo, hi, seed):
    vol = np.random.default_rng(seed).uniform(lo, hi, size=(2, 8, 8)).astype(np.float32)
    vol[0, 0, 0] = lo
    assert detect_convention(vol) == "hu"
    out = normalize(vol)
    assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    # monotone: the order of voxels is kept
    flat_in, flat_out = vol.ravel(), out.ravel()
    order = np.argsort(flat_in, kind="stable")
    assert np.all(np.diff(flat_out[order]) >= 0)
