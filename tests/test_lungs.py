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
    find_lungs,
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
    scale-0.25 phantom is the worst (seed 2: a 388 mL consolidation filling the left base). Measured: left 0.973,
    right 0.981; all 12 seeds 1-12 at full size: 0.973-0.985 (docs/segment.md)."""
    left, right, kept = _phantom_dice(2, scale=1.0)
    assert left >= 0.95 and right >= 0.95
    assert kept >= 0.85


@pytest.mark.xfail(reason="known limit: a consolidation filling most of the basal slices of the left lung (seed 2, "
                          "386 mL) lies outside the hull of the little aerated lung left there (docs/segment.md)",
                   strict=True)
def test_phantom_dice_massive_basal_consolidation() -> None:
    left, right, _ = _phantom_dice(2)
    assert left >= 0.95 and right >= 0.95


def test_fill_holes_2d_equals_scipy_slice_by_slice() -> None:
    """The one-labelling hole filling against scipy's, slice by slice (its reference)."""
    from covidseg.inference.lung_grid import fill_holes_2d

    rng = np.random.default_rng(3)
    m = ndimage.binary_opening(rng.random((6, 40, 40)) < 0.7)
    out = fill_holes_2d(m)
    assert (out & ~m).any()
    for z in range(m.shape[0]):
        np.testing.assert_array_equal(out[z], ndimage.binary_fill_holes(m[z]))


def test_convex_hull_equals_skimage() -> None:
    """The row-run convex hull against ``skimage.morphology.convex_hull_image`` (its reference)."""
    import warnings

    from skimage.morphology import convex_hull_image

    from covidseg.inference.lung_grid import convex_hull_2d

    rng = np.random.default_rng(0)
    _, truth, _ = synthetic_chest()
    cases = [truth[22] == LEFT, truth[5] == RIGHT]
    cases += [rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random() * 0.3
              for _ in range(200)]
    for m in cases:
        if not m.any():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skimage warns on a single line of pixels
            ref = convex_hull_image(m)
        np.testing.assert_array_equal(convex_hull_2d(m), ref)


def test_octagon_closing_is_close_to_the_disk_closing() -> None:
    from covidseg.inference.lung_grid import octagon_closing

    _, truth, _ = synthetic_chest()
    m = truth == LEFT
    rng = np.random.default_rng(1)
    m &= rng.random(m.shape) > 0.05  # vessels as 1-pixel holes
    m[:, 55:70, 130:137] = False  # a bite out of the lateral edge
    r = 6.4
    y, x = np.ogrid[-7:8, -7:8]
    disk = (y * y + x * x <= r * r)[None]
    ref = ndimage.binary_closing(np.pad(m, ((0, 0), (8, 8), (8, 8))), structure=disk)[:, 8:-8, 8:-8]
    out = octagon_closing(m, r)
    changed = (ref != m).sum()
    assert changed > 0
    assert (out != ref).sum() <= 0.05 * changed


def _dome_and_nodule() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A lung block (30 slices) with the diaphragm's dome rising into it from below (a half ellipsoid) and a
    nodule in its middle. Returns ``(lung, dome, nodule)``."""
    d, h, w = 34, 60, 60
    z, y, x = np.ogrid[:d, :h, :w]
    lung = ((y - 30) ** 2 + (x - 30) ** 2 <= 27 ** 2) & (z >= 2) & (z < d - 2)  # not cut by the volume's ends
    dome = (z / 14.0) ** 2 + ((y - 30) / 14.0) ** 2 + ((x - 30) / 14.0) ** 2 <= 1.0
    nodule = ((z - 20) / 3.0) ** 2 + ((y - 30) / 4.0) ** 2 + ((x - 40) / 4.0) ** 2 <= 1.0
    return lung & ~dome & ~nodule, dome & lung, nodule


def test_dome_stays_out_and_a_nodule_is_filled() -> None:
    """A hole with lung above and below is a lesion (filled); one with lung above only is the top of the dome."""
    from covidseg.inference.lung_fill import fill_lung_slices

    lung, dome, nodule = _dome_and_nodule()
    filled = fill_lung_slices(lung, (2.5, 1.5, 1.5), LungConfig(), medial_side=-1)
    assert filled[nodule].all()
    assert not filled[dome].any()


def test_a_lesion_at_a_cut_base_stays_in_the_lung() -> None:
    """Where the scan cuts the lung's base, a hole in the lowest slices gets the benefit of the doubt: beyond the
    field of view the lung goes on (here a consolidation in the cut base of the lung block)."""
    from covidseg.inference.lung_fill import fill_lung_slices

    lung, _, _ = _dome_and_nodule()
    lung = lung | np.roll(lung, -2, axis=0)  # the block down to slice 0: cut at the base
    z, y, x = np.ogrid[: lung.shape[0], :60, :60]
    lesion = (z <= 4) & ((y - 30) ** 2 + (x - 25) ** 2 <= 36)
    filled = fill_lung_slices(lung & ~lesion, (2.5, 1.5, 1.5), LungConfig(), medial_side=-1)
    assert filled[lesion].all()


def test_lung_cover_looks_the_given_slices_up_and_down() -> None:
    from covidseg.inference.lung_fill import lung_cover

    lung = np.zeros((10, 1, 1), dtype=bool)
    lung[6] = True
    above, below = lung_cover(lung, 2)
    assert above[:, 0, 0].tolist() == [False] * 4 + [True, True] + [False] * 4
    assert below[:, 0, 0].tolist() == [False] * 7 + [True, True] + [False]
    lung[9] = True  # cut at the top: beyond it the lung goes on
    above, _ = lung_cover(lung, 2, cut=(False, True))
    assert above[:, 0, 0].tolist() == [False] * 4 + [True, True, False, True, True, True]


def _on_a_curved_couch(hu: np.ndarray, gap_rows: int = 1) -> np.ndarray:
    """``hu`` with 40 rows added below it and a curved couch there: a flat plate under the body and a U-shaped
    shell below it, both 3 mm thick, enclosing air in every slice (a real couch's carbon-fibre shell)."""
    d, h, w = hu.shape
    out = np.full((d, h + 40, w), -1000.0, np.float32)
    out[:, :h] = hu
    y, x = np.ogrid[: h + 40, :w]
    top = h - 6 + gap_rows  # the body's lowest row is about h - 6
    plate = (y >= top) & (y < top + 2) & (x >= 6) & (x < w - 6)
    bowl = (np.abs(((y - top) / 34.0) ** 2 + ((x - w / 2) / (w / 2 - 6)) ** 2 - 1.0) < 0.06) & (y >= top)
    out[:, plate | bowl] = 200.0
    return out


def test_air_in_a_curved_couch_is_not_lung() -> None:
    """The air a curved couch encloses in every axial slice is neither a lung nor joined to one."""
    hu, truth, _ = synthetic_chest(lesion=False)
    couch_hu = _on_a_curved_couch(hu)
    result = find_lungs(couch_hu, SPACING)
    for label in (LEFT, RIGHT):
        assert _dice(result.labels[:, : hu.shape[1]] == label, truth == label) >= 0.95
    assert not result.labels[:, hu.shape[1] - 4 :].any()


@pytest.mark.parametrize("value", [-3024.0, -2048.0, -1024.0])
def test_padding_outside_the_field_of_view(value: float) -> None:
    from covidseg.phantom.perturb import pad_outside_fov

    hu, truth, _ = synthetic_chest(lesion=False)
    out = classical_lungs(pad_outside_fov(hu, value, radius_fraction=0.49), SPACING)
    for label in (LEFT, RIGHT):
        assert _dice(out == label, truth == label) >= 0.95


def test_gas_of_a_lungs_size_is_not_lung() -> None:
    """An abdomen (no lungs) with 400 mL of gas: no lung, and the reason says why."""
    hu, _, _ = synthetic_chest(lesion=False)
    body = np.broadcast_to(_ellipse(128, 160, (64, 80), (58, 76)), hu.shape)
    hu = np.where(body & (hu < -500), np.float32(TISSUE_HU), hu)  # the lungs and trachea become tissue: an abdomen
    gas = (np.ogrid[:48, :1, :1][0] >= 0) & _ellipse(128, 160, (64, 80), (20, 40))
    gas[:4] = gas[-4:] = False
    hu[gas] = AIR_HU
    result = find_lungs(hu, SPACING)
    assert not result.found and not result.labels.any()
    assert result.reason is not None and "pure gas" in result.reason
    assert result.gas_ml and result.gas_ml[0] > 300


def _ellipse(h: int, w: int, centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    y, x = np.ogrid[:h, :w]
    return ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2 <= 1.0


def test_no_body_and_no_air_give_reasons() -> None:
    air_only = np.full((8, 32, 32), -1000.0, np.float32)
    assert "no body" in str(find_lungs(air_only, (2.0, 1.0, 1.0)).reason)
    tissue = np.full((8, 32, 32), 40.0, np.float32)
    result = find_lungs(tissue, (2.0, 1.0, 1.0))
    assert not result.found and "no air region" in str(result.reason)


@pytest.mark.parametrize("part", ["top", "bottom"])
def test_a_crop_through_the_lungs_is_flagged(part: str) -> None:
    hu, truth, _ = synthetic_chest(lesion=False)
    crop = slice(22, 48) if part == "top" else slice(0, 22)  # the lungs span slices 2-42
    result = find_lungs(hu[crop], SPACING)
    assert result.found and result.partial
    assert result.cut_at_base == (part == "top") and result.cut_at_apex == (part == "bottom")
    whole = find_lungs(hu, SPACING)
    assert not whole.partial and not whole.cut_at_apex and not whole.cut_at_base
    summary = result.summary()
    assert summary["partial"] and summary["left"]["found"] and summary["reason"] is None


def test_a_thin_chest_wall_keeps_the_lung_in_the_body() -> None:
    """A lateral chest wall thinner than the body's opening (about 10 mm over a stretch of 18 mm, as between a slim
    patient's ribs) is put back: the left lung stays inside the filled body in those slices."""
    hu, truth, _ = synthetic_chest(lesion=False)
    hu[14:31, 56:68, 143:] = AIR_HU  # the wall lateral of the left lung's widest part cut to 7 pixels (10.5 mm)
    out = classical_lungs(hu, SPACING, LungConfig())
    for label in (LEFT, RIGHT):
        assert _dice(out == label, truth == label) >= 0.95
    assert (out[14:31] == LEFT).sum() >= 0.9 * (truth[14:31] == LEFT).sum()


def test_ball_closing_equals_scipy_with_the_ball() -> None:
    """The distance-transform closing is ``scipy.ndimage.binary_closing`` by the ball of the same radius (in mm, on
    an anisotropic grid), on a volume padded so that scipy's border does not matter."""
    from covidseg.inference.lung_fill import ball_closing

    rng = np.random.default_rng(0)
    spacing, radius = (2.0, 1.0, 1.5), 4.0
    mask = ndimage.binary_dilation(rng.random((14, 30, 24)) > 0.97, iterations=2)
    mask[:, 10:14, :] = False  # a slot narrower than the ball
    half = [int(np.ceil(radius / s)) for s in spacing]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    ball = sum((g * s) ** 2 for g, s in zip(grids, spacing, strict=True)) <= radius ** 2
    pad = [(2 * h + 2, 2 * h + 2) for h in half]
    want = ndimage.binary_closing(np.pad(mask, pad), structure=ball)
    want = want[tuple(slice(p, p + n) for (p, _), n in zip(pad, mask.shape, strict=True))]
    got = ball_closing(mask, spacing, radius)
    assert got.sum() > mask.sum()  # it closes something
    assert np.array_equal(got, want)


def test_the_3d_closing_adds_nothing_to_a_convex_lung_and_keeps_the_dome_out() -> None:
    """A convex lung has nothing for the ball to close; over a broad dome (the liver rising into the lung's base,
    wider than the ball) the closing adds nothing either, so the dome stays out of the lung."""
    from covidseg.inference.lung_fill import wall_bulges

    spacing = (2.0, 2.0, 2.0)
    z, y, x = np.ogrid[:60, :80, :70]
    lung = (((z - 30) / 27.0) ** 2 + ((y - 40) / 36.0) ** 2 + ((x - 35) / 30.0) ** 2) <= 1.0
    assert not wall_bulges(lung, spacing, 40.0, 0.3, -1, 0.7).any()
    dome = ((z + 60) ** 2 + (y - 40) ** 2 + (x - 35) ** 2) <= 75 ** 2  # a sphere of 150 mm radius from below
    assert not wall_bulges(lung & ~dome, spacing, 40.0, 0.3, -1, 0.7)[dome].any()
    assert not wall_bulges(np.zeros((4, 5, 6), dtype=bool), spacing, 40.0, 0.3, -1, 0.7).any()
