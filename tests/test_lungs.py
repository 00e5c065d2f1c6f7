"""Classical lung extraction: sides, the sub-pleural consolidation trap, trachea, phantoms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from covidseg.config import LungConfig
from covidseg.inference.lungs import (
    LEFT,
    RIGHT,
    binary_opening,
    block_mean,
    classical_lungs,
    upsample_labels,
    work_factors,
)

SPACING = (2.5, 1.5, 1.5)
"""Voxel size (mm) of the synthetic chest."""
TISSUE_HU, LUNG_HU, AIR_HU, CONSOLIDATION_HU = 40.0, -850.0, -1000.0, 30.0


LESION_KEPT = 0.9
"""Share of the sub-pleural lesion that must stay in the lung mask."""


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def synthetic_chest(lesion: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A box phantom (48 x 128 x 160): body ellipse, two lung ellipsoids, a trachea, and a dense consolidation
    filling the lateral (pleural) edge of the patient's left lung. Returns ``(hu, lungs, lesion)``."""
    d, h, w = 48, 128, 160
    z, y, x = np.ogrid[:d, :h, :w]
    hu = np.full((d, h, w), AIR_HU, np.float32)
    body = ((y - 64) / 58.0) ** 2 + ((x - 80) / 76.0) ** 2 <= 1.0
    hu[np.broadcast_to(body, hu.shape)] = TISSUE_HU
    lungs = np.zeros((d, h, w), np.uint8)
    for label, cx in ((LEFT, 112), (RIGHT, 48)):  # left lung = higher column index
        ell = ((z - 22) / 20.0) ** 2 + ((y - 62) / 40.0) ** 2 + ((x - cx) / 24.0) ** 2 <= 1.0
        lungs[ell] = label
    hu[lungs > 0] = LUNG_HU
    trachea = ((y - 40) ** 2 + (x - 80) ** 2 <= 36) & (z >= 30)
    hu[np.broadcast_to(trachea, hu.shape)] = AIR_HU
    les = np.zeros_like(lungs, dtype=bool)
    if lesion:  # a 30 mm-wide consolidation against the lateral pleura of the left lung
        les = (lungs == LEFT) & (((z - 22) / 8.0) ** 2 + ((y - 62) / 10.0) ** 2 + ((x - 136) / 12.0) ** 2 <= 1.0)
        hu[les] = CONSOLIDATION_HU
    rng = np.random.default_rng(0)
    hu += rng.normal(0, 15, hu.shape).astype(np.float32)
    return hu, lungs, les


def test_sides_trachea_and_consolidation_kept() -> None:
    hu, truth, lesion = synthetic_chest()
    out = classical_lungs(hu, SPACING, LungConfig())
    assert out.dtype == np.uint8 and out.shape == hu.shape
    for label in (LEFT, RIGHT):
        assert _dice(out == label, truth == label) >= 0.95
    # the trap: the dense sub-pleural lesion stays in the lung. Measured 0.93: the lesion caps the lung's convex
    # outer edge, and the thin rim beyond the hull of the aerated lung is lost (see docs/segment.md)
    assert (out[lesion] == LEFT).mean() >= LESION_KEPT
    trachea = np.zeros_like(lesion)
    trachea[30:, 34:47, 74:87] = True
    assert not (out[trachea & (hu < -500)] > 0).any()


def test_without_concavity_filling_the_lesion_is_cut() -> None:
    """The switch matters: a plain threshold (no concavity filling) loses much of the lesion."""
    hu, _, lesion = synthetic_chest()
    cfg = LungConfig(fill_concavities=False, closing_radius_mm=2.0)
    out = classical_lungs(hu, SPACING, cfg)
    assert (out[lesion] > 0).mean() < 0.9


def test_block_mean_and_upsample() -> None:
    a = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
    m = block_mean(a, (1, 2, 3))
    assert m.shape == (2, 2, 2)
    assert m[0, 0, 0] == pytest.approx(a[0, :2, :3].mean())
    up = upsample_labels((m > 10).astype(np.uint8), (1, 2, 3), (2, 3, 5))
    assert up.shape == (2, 3, 5)


@pytest.mark.parametrize("factors", [(1, 2, 2), (2, 2, 2), (1, 3, 3), (1, 1, 1)])
def test_block_mean_equals_the_reshape_mean(factors: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 2000, size=(7, 33, 31)).astype(np.float32)  # not multiples: edge padding
    pad = [(0, (-n) % f) for n, f in zip(hu.shape, factors, strict=True)]
    v = np.pad(hu, pad, mode="edge")
    d, h, w = (n // f for n, f in zip(v.shape, factors, strict=True))
    ref = v.reshape(d, factors[0], h, factors[1], w, factors[2]).mean(axis=(1, 3, 5), dtype=np.float32)
    out = block_mean(hu, factors)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_slab_opening_equals_the_whole_volume_opening(iterations: int) -> None:
    rng = np.random.default_rng(iterations)
    mask = ndimage.binary_dilation(rng.random((70, 40, 30)) > 0.97, iterations=2)  # blobs, bridges across slabs
    ref = ndimage.binary_opening(mask, structure=ndimage.generate_binary_structure(3, 1), iterations=iterations)
    assert ref.any() and (ref != mask).any()
    for workers in (1, 2, 3, 4):
        np.testing.assert_array_equal(binary_opening(mask, iterations, workers=workers), ref)


@pytest.mark.parametrize("spacing, factors", [
    ((0.8, 0.779, 0.779), (1, 2, 2)),  # the most common in-plane pixel: halved in-plane (a floor kept it full)
    ((1.0, 0.727, 0.727), (1, 2, 2)),
    ((5.0, 0.6, 0.6), (1, 2, 2)),
    ((0.5, 0.5, 0.5), (3, 3, 3)),
    ((2.5, 1.5, 1.5), (1, 1, 1)),
])
def test_work_grid_is_near_the_work_spacing(spacing: tuple[float, float, float],
                                            factors: tuple[int, int, int]) -> None:
    assert work_factors(spacing, LungConfig().work_spacing_mm) == factors


def test_empty_volume_gives_empty_mask() -> None:
    hu = np.full((8, 32, 32), 40.0, np.float32)
    assert not classical_lungs(hu, (2.0, 1.0, 1.0)).any()


PHANTOM_DICE_FLOOR = 0.90
"""Regression floor per lung on scale-0.25 phantoms (the issue's target, 0.95, is the xfail test below)."""


def _phantom_dice(seed: int, scale: float = 0.25) -> tuple[float, float, float]:
    phantom = pytest.importorskip("covidseg.phantom")
    ph = phantom.make_phantom("coronacases", seed, scale=scale)
    out = classical_lungs(ph.ct, ph.spacing)
    inf = ph.infection > 0
    kept = float((out[inf] > 0).mean()) if inf.any() else 1.0
    return _dice(out == LEFT, ph.lungs == LEFT), _dice(out == RIGHT, ph.lungs == RIGHT), kept


def test_phantom_regression_floor() -> None:
    left, right, kept = _phantom_dice(1)
    assert left >= PHANTOM_DICE_FLOOR and right >= PHANTOM_DICE_FLOOR
    assert kept >= 0.85


@pytest.mark.parametrize("seed", [1, 5])
def test_phantom_dice_target(seed: int) -> None:
    """Issue 5's target, 0.95 per lung, on phantoms with sub-pleural lesions (seed 1: 206 mL of infection)."""
    left, right, kept = _phantom_dice(seed)
    assert left >= 0.95 and right >= 0.95
    assert kept >= 0.9


@pytest.mark.slow
def test_full_size_phantom_dice_target() -> None:
    """Issue 5's acceptance at the size it names (512 x 512, about 280 slices, 0.7 x 0.7 x 1 mm), on the seed whose
    scale-0.25 phantom is the worst (seed 2: a 388 mL consolidation filling the left base). Measured: left 0.963,
    right 0.983; all 12 seeds 1-12 at full size: 0.963-0.990 (docs/segment.md)."""
    left, right, kept = _phantom_dice(2, scale=1.0)
    assert left >= 0.95 and right >= 0.95
    assert kept >= 0.85


@pytest.mark.xfail(reason="known limit: a consolidation filling most of the basal slices of the left lung (seed 2, "
                          "386 mL) lies outside the hull of the little aerated lung left there (docs/segment.md)",
                   strict=True)
def test_phantom_dice_massive_basal_consolidation() -> None:
    left, right, _ = _phantom_dice(2)
    assert left >= 0.95 and right >= 0.95


def test_stack_hole_filling_equals_slice_by_slice() -> None:
    """The vectorised hole rule (all slices at once) against the per-slice reference it replaces."""
    from scipy import ndimage

    from covidseg.inference.lungs import _fillable_holes, _fillable_stack

    rng = np.random.default_rng(3)
    m = ndimage.binary_opening(rng.random((6, 40, 40)) < 0.7)
    holes_3d = ndimage.binary_fill_holes(m) & ~m
    stack = _fillable_stack(m, holes_3d, 0.1)
    assert stack.any()
    for z in range(m.shape[0]):
        np.testing.assert_array_equal(stack[z], _fillable_holes(m[z], holes_3d[z], 0.1))
