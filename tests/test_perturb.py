"""The perturbations of real CTs that the lung tests use (``covidseg.phantom.perturb``)."""

from __future__ import annotations

import numpy as np
import pytest

from covidseg.phantom import perturb


def _ct() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 10.0, (6, 20, 24)).astype(np.float32)


def test_padding_outside_the_field_of_view() -> None:
    hu = _ct()
    out = perturb.pad_outside_fov(hu, -3024.0)
    assert (out[:, 0, 0] == -3024.0).all() and (out[:, 10, 12] == hu[:, 10, 12]).all()
    assert not np.shares_memory(out, hu) and (hu != -3024.0).all()


def test_thick_slices_are_slab_means() -> None:
    hu = _ct()
    out, spacing = perturb.thick_slices(hu, (1.0, 0.7, 0.7), 3.0)
    assert out.shape == (2, 20, 24) and spacing == (3.0, 0.7, 0.7)
    np.testing.assert_allclose(out[1], hu[3:6].mean(axis=0), rtol=1e-5)


def test_couch_moves_and_mirrors_around_the_body() -> None:
    hu = np.full((2, 20, 10), -1000.0, np.float32)
    hu[:, 2:10] = 40.0  # the body
    hu[:, 15] = 200.0  # a couch below it
    body = hu > -500
    body[:, 15] = False
    moved = perturb.move_couch(hu, body, -3)
    assert (moved[:, 12] == 200.0).all() and (moved[:, 15] == -1000.0).all()
    assert (moved[:, 2:10] == 40.0).all()
    mirrored = perturb.mirror_couch(hu, body)
    assert (mirrored[:, 4] == 40.0).all()  # row 4 (the mirror of row 15) is body: the body stays
    pressed = perturb.move_couch(hu, body, -8)  # onto the body's rows: the body stays
    assert (pressed[:, 7] == 40.0).all()


@pytest.mark.parametrize("side", ["lateral", "posterior"])
def test_pleural_lesion_lies_in_the_lung_against_its_edge(side: str) -> None:
    lung = perturb.ellipsoid((30, 60, 60), (2.0, 1.0, 1.0), (15, 30, 40), (25.0, 20.0, 12.0))
    lesion = perturb.pleural_lesion(lung, (2.0, 1.0, 1.0), 6.0, side)
    assert lesion.any() and not (lesion & ~lung).any()
    # it reaches the lung's edge: a lesion voxel has a non-lung neighbour in-plane
    from scipy import ndimage

    edge = lung & ~ndimage.binary_erosion(lung, structure=np.ones((1, 3, 3), dtype=bool))
    assert (lesion & edge).any()
    with pytest.raises(ValueError, match="side"):
        perturb.pleural_lesion(lung, (2.0, 1.0, 1.0), 6.0, "medial")


@pytest.mark.parametrize("side", ["lateral", "posterior"])
def test_sub_pleural_patch_is_flat_along_the_edge(side: str) -> None:
    """An ellipsoid centred 2 mm inside the edge: what lies in the lung is thinner across the pleura than along it."""
    lung = perturb.ellipsoid((30, 60, 60), (2.0, 1.0, 1.0), (15, 30, 40), (25.0, 20.0, 12.0))
    radii = (10.0, 6.0, 14.0) if side == "posterior" else (10.0, 14.0, 6.0)
    patch = perturb.pleural_lesion(lung, (2.0, 1.0, 1.0), 0.0, side, radii_mm=radii, inset_mm=2.0)
    assert patch.any() and not (patch & ~lung).any()
    _, ys, xs = np.nonzero(patch)
    across, along = (np.ptp(ys), np.ptp(xs)) if side == "posterior" else (np.ptp(xs), np.ptp(ys))
    assert across < 0.6 * along
    with pytest.raises(ValueError, match="side"):
        perturb.subpleural_patch(lung, (2.0, 1.0, 1.0), "medial")
    sphere = perturb.pleural_lesion(lung, (2.0, 1.0, 1.0), 6.0, side)
    assert np.array_equal(sphere, perturb.pleural_lesion(lung, (2.0, 1.0, 1.0), 6.0, side, radii_mm=(6.0,) * 3))


def test_emphysema_darkens_the_lower_aerated_lung_only() -> None:
    lung = perturb.ellipsoid((30, 40, 40), (2.0, 1.0, 1.0), (15, 20, 20), (28.0, 15.0, 15.0))
    hu = np.where(lung, -850.0, 40.0).astype(np.float32)
    out = perturb.emphysema(hu, lung, 0.5, -120.0)
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    cut = int(zs[0] + 0.5 * (zs[-1] - zs[0]))
    assert (out[: cut + 1][lung[: cut + 1]] == -970.0).all()
    assert (out[cut + 1 :][lung[cut + 1 :]] == -850.0).all() and (out[~lung] == 40.0).all()
    assert (hu[lung] == -850.0).all()  # the input is left as it was
    with pytest.raises(ValueError, match="empty"):
        perturb.emphysema(hu, np.zeros_like(lung))


def test_pleural_effusion_is_posterior_and_deepest_at_the_base() -> None:
    lung = perturb.ellipsoid((40, 60, 60), (2.0, 1.0, 1.0), (20, 30, 30), (38.0, 25.0, 20.0))
    fluid = perturb.pleural_effusion(lung, (2.0, 1.0, 1.0), depth_mm=10.0, height_fraction=0.5)
    assert fluid.any() and not (fluid & ~lung).any()
    zs = np.flatnonzero(fluid.any(axis=(1, 2)))
    lung_zs = np.flatnonzero(lung.any(axis=(1, 2)))
    assert zs.max() <= lung_zs[0] + 0.5 * (lung_zs[-1] - lung_zs[0])
    share = [fluid[z].sum() / lung[z].sum() for z in zs]
    assert share[0] > share[len(share) // 2] > share[-1]  # the lung's share that is fluid grows downwards
    _, ys, _ = np.nonzero(fluid)
    assert ys.mean() > 30  # behind the lung's centre (higher row = posterior)
    with pytest.raises(ValueError, match="empty"):
        perturb.pleural_effusion(np.zeros_like(lung), (2.0, 1.0, 1.0))


def test_height_slice_and_bulla() -> None:
    lung = perturb.ellipsoid((40, 60, 60), (2.0, 1.0, 1.0), (20, 30, 30), (38.0, 25.0, 20.0))
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    assert perturb.height_slice(lung, 0.0) == zs[0] and perturb.height_slice(lung, 1.0) == zs[-1]
    central = perturb.bulla(lung, (2.0, 1.0, 1.0), "central", radius_mm=6.0)
    assert central.any() and not (central & ~lung).any()
    _, ys, xs = np.nonzero(central)
    assert abs(ys.mean() - 30) <= 1 and abs(xs.mean() - 30) <= 1  # around the slice's centre
    assert np.array_equal(perturb.bulla(lung, (2.0, 1.0, 1.0), "posterior", radius_mm=6.0),
                          perturb.pleural_lesion(lung, (2.0, 1.0, 1.0), 6.0, "posterior"))
    with pytest.raises(ValueError, match="empty"):
        perturb.height_slice(np.zeros_like(lung), 0.5)


def test_noise_has_the_asked_spread_and_spares_the_padding() -> None:
    hu = np.full((4, 64, 64), 40.0, dtype=np.float32)
    hu[:, :, :8] = -3024.0
    out = perturb.add_noise(hu, 50.0)
    assert out.dtype == np.float32 and hu[0, 0, 20] == 40.0  # a copy
    assert np.all(out[:, :, :8] == -3024.0)
    body = out[:, :, 8:] - 40.0
    assert abs(float(body.std()) - 50.0) < 2.0 and abs(float(body.mean())) < 2.0


def test_sharpen_boosts_noise_and_edges_and_spares_the_padding() -> None:
    hu = perturb.add_noise(np.full((3, 96, 96), 40.0, dtype=np.float32), 20.0)
    hu[:, 40:, :] = -850.0  # lung below an edge at row 40
    hu[:, :, :6] = -3024.0
    out = perturb.sharpen(hu, 3.0)
    assert hu[0, 10, 20] != out[0, 10, 20] and np.all(out[:, :, :6] == -3024.0)
    tissue = (slice(None), slice(10, 30), slice(20, 90))
    assert float(out[tissue].std()) > 2.0 * float(hu[tissue].std())
    assert abs(float(out[tissue].mean()) - float(hu[tissue].mean())) < 3.0  # the mean stays
    assert float(out[:, 38, 20:90].mean()) > 100.0 and float(out[:, 41, 20:90].mean()) < -950.0  # overshoot
    assert np.array_equal(perturb.sharpen(hu, 0.0), hu)
    with pytest.raises(ValueError, match="sigma_px"):
        perturb.sharpen(hu, 1.0, sigma_px=0.0)


def test_soft_tissue_noise_is_the_spread_in_tissue() -> None:
    hu = np.full((3, 80, 80), -1000.0, dtype=np.float32)
    hu[:, 10:70, 10:70] = 40.0
    assert perturb.soft_tissue_noise_hu(hu) < 1.0
    assert abs(perturb.soft_tissue_noise_hu(perturb.add_noise(hu, 30.0)) - 30.0) < 3.0
    assert np.isnan(perturb.soft_tissue_noise_hu(np.full((2, 20, 20), -1000.0)))
