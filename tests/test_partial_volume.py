"""The partial-volume band above the diaphragm (``covidseg.inference.partial_volume``)."""

from __future__ import annotations

import numpy as np
import pytest

from covidseg.inference.partial_volume import band_slices, diaphragm_band

LUNG_HU, TISSUE_HU = -850.0, 40.0


def _column_volume(hu_column: list[float], lung_column: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """A (D, 3, 3) volume whose every column is ``hu_column`` (index 0 the most inferior slice)."""
    hu = np.broadcast_to(np.asarray(hu_column, np.float32)[:, None, None], (len(hu_column), 3, 3)).copy()
    lungs = np.broadcast_to(np.asarray(lung_column)[:, None, None], hu.shape).astype(np.uint8)
    return hu, lungs


def test_band_slices_follow_the_slice_spacing() -> None:
    assert [band_slices(s) for s in (1.0, 2.0, 3.0, 5.0, 10.0)] == [4, 2, 1, 1, 1]
    assert band_slices(2.0, 0.0) == 0


def test_the_ramp_above_the_dome_is_marked() -> None:
    # tissue, tissue, ramp (-500), ramp (-650), lung, lung ... at 2 mm: the two ramp voxels are the band
    hu, lungs = _column_volume([TISSUE_HU, TISSUE_HU, -500, -650, LUNG_HU, LUNG_HU, LUNG_HU],
                               [False, False, True, True, True, True, True])
    mask = hu > -700
    band = diaphragm_band(mask & (lungs > 0), lungs, hu, 2.0)
    assert band[:, 1, 1].tolist() == [False, False, True, True, False, False, False]


def test_a_lesion_on_the_diaphragm_is_kept() -> None:
    # 10 mm of consolidation-like lesion (-300 HU) resting on the diaphragm: only lesion lies above its lowest
    # voxels, so nothing is lighter above them within 4 mm; its top is far from the tissue below
    column = [TISSUE_HU, TISSUE_HU] + [-300.0] * 5 + [LUNG_HU] * 4
    hu, lungs = _column_volume(column, [False, False] + [True] * 9)
    mask = (hu > -700) & (lungs > 0)
    assert not diaphragm_band(mask, lungs, hu, 2.0).any()


def test_a_lesion_thinner_than_the_band_is_taken_for_it() -> None:
    # the documented limit: 2 mm of opacity on the diaphragm with aerated lung above looks like the ramp
    hu, lungs = _column_volume([TISSUE_HU, -400, LUNG_HU, LUNG_HU], [False, True, True, True])
    mask = (hu > -700) & (lungs > 0)
    assert diaphragm_band(mask, lungs, hu, 2.0)[1].all()


def test_lung_below_means_no_band_and_zero_turns_it_off() -> None:
    # an opacity in the middle of the lung (lung below and above) is never the band
    hu, lungs = _column_volume([LUNG_HU, LUNG_HU, LUNG_HU, -500, LUNG_HU, LUNG_HU], [True] * 6)
    mask = hu > -700
    assert not diaphragm_band(mask, lungs, hu, 1.0).any()
    hu, lungs = _column_volume([TISSUE_HU, -500, LUNG_HU], [False, True, True])
    mask = (hu > -700) & (lungs > 0)
    assert diaphragm_band(mask, lungs, hu, 2.0).any()
    assert not diaphragm_band(mask, lungs, hu, 2.0, band_mm=0.0).any()


def test_the_lung_above_must_be_clearly_lighter() -> None:
    # tissue below, but the lung above is only 50 HU lighter (a dense region, not a ramp into aerated lung)
    hu, lungs = _column_volume([TISSUE_HU, -500, -550, -560], [False, True, True, True])
    mask = (hu > -700) & (lungs > 0)
    assert not diaphragm_band(mask, lungs, hu, 2.0).any()
    assert diaphragm_band(mask, lungs, hu, 2.0, lighter_by_hu=40.0)[1].all()


def test_bad_spacing_is_refused() -> None:
    hu, lungs = _column_volume([TISSUE_HU, -500], [False, True])
    with pytest.raises(ValueError, match="spacing"):
        diaphragm_band(hu > -700, lungs, hu, 0.0)


@pytest.mark.parametrize(("style", "seed"), [("coronacases", 0), ("coronacases", 2), ("radiopaedia", 1),
                                             ("radiopaedia", 3)])
def test_few_voxels_of_the_phantoms_true_lesions_are_taken(style: str, seed: int) -> None:
    # the rule applied to the phantoms' own lesion masks: what it would take from lesions a model found perfectly
    # (measured 0.45-2.9 % with 1.7-8.8 mm slices; most of it at the edges of lesions on the diaphragm)
    from covidseg.phantom import make_phantom

    ph = make_phantom(style, seed, scale=0.5)
    lesions = ph.infection > 0
    assert lesions.sum() > 1000
    taken = diaphragm_band(lesions, ph.lungs, ph.ct, ph.spacing[0])
    assert taken.sum() / lesions.sum() <= 0.04
