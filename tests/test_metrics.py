"""covidseg.metrics: closed forms, MONAI as the reference for NSD and HD95, properties, empty-mask convention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from covidseg.metrics import NSD_TOLERANCE_MM, binary_metrics, mean_sd


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def test_overlap_closed_form():
    gt = _box((4, 10, 10), (0, 0, 0), (4, 10, 5))  # 200 voxels
    pred = _box((4, 10, 10), (0, 0, 0), (4, 10, 4))  # 160 voxels, all inside gt
    m = binary_metrics(pred, gt)
    assert set(m) == {"dice", "iou", "sensitivity", "precision"}
    assert m["dice"] == pytest.approx(2 * 160 / 360)
    assert m["iou"] == pytest.approx(160 / 200)
    assert m["sensitivity"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(1.0)


def test_hd95_of_shifted_slab_is_the_shift_in_mm():
    gt = _box((6, 20, 20), (0, 5, 5), (6, 15, 15))
    pred = np.roll(gt, 2, axis=2)  # 2 columns at 0.7 mm
    m = binary_metrics(pred, gt, spacing=(5.0, 0.7, 0.7), tolerance_mm=3.0)
    assert m["hd95"] == pytest.approx(1.4)
    assert m["nsd"] == pytest.approx(1.0)  # every border within 1.4 mm < 3 mm
    tight = binary_metrics(pred, gt, spacing=(5.0, 0.7, 0.7), tolerance_mm=1.0)
    assert tight["nsd"] < 1.0


def _monai_reference(pred, gt, spacing, tol):
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    g = torch.from_numpy(gt[None, None].astype(np.float32))
    nsd = compute_surface_dice(p, g, class_thresholds=[tol], include_background=True, spacing=list(spacing))
    hd = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=list(spacing))
    return float(nsd.item()), float(hd.item())


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nsd_and_hd95_match_monai(seed):
    rng = np.random.default_rng(seed)
    shape = (8, 24, 24)
    from scipy import ndimage

    gt = ndimage.binary_dilation(rng.random(shape) > 0.985, iterations=2)
    pred = ndimage.binary_dilation(rng.random(shape) > 0.985, iterations=2) | (gt & (rng.random(shape) > 0.3))
    spacing = (float(rng.uniform(1, 5)), float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.5, 1.0)))
    ours = binary_metrics(pred, gt, spacing=spacing, tolerance_mm=NSD_TOLERANCE_MM["infection"])
    nsd, hd = _monai_reference(pred, gt, spacing, NSD_TOLERANCE_MM["infection"])
    assert ours["nsd"] == pytest.approx(nsd, abs=1e-6)
    assert ours["hd95"] == pytest.approx(hd, rel=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_mask_touching_the_border_matches_monai():
    gt = _box((5, 12, 12), (0, 0, 0), (5, 6, 12))
    pred = _box((5, 12, 12), (0, 0, 0), (5, 8, 10))
    ours = binary_metrics(pred, gt, spacing=(2.0, 1.0, 1.0), tolerance_mm=1.0)
    nsd, hd = _monai_reference(pred, gt, (2.0, 1.0, 1.0), 1.0)
    assert ours["nsd"] == pytest.approx(nsd, abs=1e-6)
    assert ours["hd95"] == pytest.approx(hd, rel=1e-5)


def test_empty_mask_convention():
    shape = (3, 4, 5)
    empty = np.zeros(shape, bool)
    full = _box(shape, (1, 1, 1), (2, 3, 4))
    both = binary_metrics(empty, empty, spacing=(1, 1, 1))
    assert both == {"dice": 1.0, "iou": 1.0, "sensitivity": 1.0, "precision": 1.0, "nsd": 1.0, "hd95": 0.0}
    diag = math.sqrt(3**2 + (4 * 2) ** 2 + 5**2)
    for pred, gt in ((empty, full), (full, empty)):
        m = binary_metrics(pred, gt, spacing=(1, 2, 1))
        assert m["dice"] == m["iou"] == m["nsd"] == 0.0
        assert m["sensitivity"] == 0.0 and m["precision"] == 0.0
        assert m["hd95"] == pytest.approx(diag)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        binary_metrics(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(np.ones((2, 2, 2)), np.ones((2, 2, 2)), spacing=(1, 1))


def test_mean_sd():
    assert mean_sd([1.0, 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))
    assert mean_sd([0.5]) == (0.5, 0.0)


masks = arrays(np.bool_, (3, 6, 6))
spacings = st.tuples(*[st.floats(0.3, 5.0)] * 3)


@settings(max_examples=40, deadline=None)
@given(masks, masks, spacings)
def test_properties(a, b, spacing):
    ab = binary_metrics(a, b, spacing=spacing, tolerance_mm=1.0)
    ba = binary_metrics(b, a, spacing=spacing, tolerance_mm=1.0)
    for key in ("dice", "iou", "sensitivity", "precision", "nsd"):
        assert 0.0 <= ab[key] <= 1.0
    assert ab["hd95"] >= 0.0 and math.isfinite(ab["hd95"])
    for key in ("dice", "iou", "nsd", "hd95"):
        assert ab[key] == pytest.approx(ba[key])
    assert ab["sensitivity"] == pytest.approx(ba["precision"])
    assert ab["iou"] == pytest.approx(ab["dice"] / (2.0 - ab["dice"]))
    self_m = binary_metrics(a, a, spacing=spacing)
    assert self_m["dice"] == 1.0 and self_m["nsd"] == 1.0 and self_m["hd95"] == 0.0
