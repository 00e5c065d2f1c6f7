"""Inf-Net's mean Dice (docs/method.md) against small hand-computed cases and a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from covidseg.semiseg.metric import (
    THRESHOLDS,
    infnet_curves,
    mean_dice_infnet,
    minmax_normalize,
    resize_to,
    slice_metrics,
    specificity,
    summarize,
    threshold_counts,
)

GT_2X2 = np.array([[1, 1], [0, 0]], dtype=np.uint8)
PRED_2X2 = np.array([[1.0, 0.5], [0.5, 0.0]])
# thresholds k/255 with k >= 128 (t > 0.5): P = {1.0}, Dice 2/3 (128 thresholds)
# k = 1..127 (0 < t <= 0.498): P = the three non-zero pixels, TP 2, Dice 4/5 (127 thresholds)
# k = 0: everything, Dice 4/6 (1 threshold)
EXPECTED_2X2 = (128 * 2 / 3 + 127 * 0.8 + 1 * 2 / 3) / 256


def brute_force_mean_dice(prob: np.ndarray, gt: np.ndarray) -> float:
    """Literal transcription of EvaluationTool/main.m + Fmeasure_calu.m (loop over thresholds)."""
    prob = minmax_normalize(prob)
    gt = gt > 0
    dices = []
    for k in range(255, -1, -1):
        t = k / 255
        p = prob >= t
        tp = np.count_nonzero(p & gt)
        dices.append(0.0 if tp == 0 else 2 * tp / (gt.sum() + p.sum()))
    return float(np.mean(dices))


def test_thresholds_are_infnets_list() -> None:
    assert THRESHOLDS.shape == (256,)
    assert THRESHOLDS[0] == 1.0 and THRESHOLDS[-1] == 0.0
    assert THRESHOLDS[1] == pytest.approx(254 / 255) and THRESHOLDS[-2] == pytest.approx(1 / 255)
    assert np.allclose(np.diff(THRESHOLDS), -1 / 255)


def test_hand_computed_case() -> None:
    assert mean_dice_infnet(PRED_2X2, GT_2X2) == pytest.approx(EXPECTED_2X2, abs=1e-12)
    curve = infnet_curves(PRED_2X2, GT_2X2)["dice"]
    assert curve[0] == pytest.approx(2 / 3)  # t = 1
    assert curve[127] == pytest.approx(2 / 3)  # t = 128/255 > 0.5
    assert curve[128] == pytest.approx(0.8)  # t = 127/255 < 0.5
    assert curve[-1] == pytest.approx(2 / 3)  # t = 0: every pixel


def test_threshold_is_inclusive() -> None:
    # a pixel exactly at t counts (prob >= t): 0.5 after normalisation is never a threshold, 0.6 = 153/255 is
    gt = np.array([[1, 0, 0]])
    prob = np.array([[153 / 255, 1.0, 0.0]])
    counts_pred, counts_tp = threshold_counts(prob, gt > 0)
    k = 255 - 153  # index of t = 153/255
    assert counts_tp[k] == 1 and counts_tp[k - 1] == 0
    assert counts_pred[k] == 2


def test_minmax_normalisation_makes_scale_and_offset_irrelevant() -> None:
    assert mean_dice_infnet(PRED_2X2 * 0.2 + 0.3, GT_2X2) == pytest.approx(EXPECTED_2X2)
    # unnormalised [0.6, 0.4] would be positive only for t <= 0.6; normalised it is [1, 0]
    gt = np.array([[1, 0]])
    assert mean_dice_infnet(np.array([[0.6, 0.4]]), gt) == pytest.approx((255 * 1.0 + 1 * 2 / 3) / 256)
    assert np.allclose(minmax_normalize(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])


def test_constant_map_is_left_unchanged() -> None:
    # MATLAB's mapminmax returns y = x for a constant row: a map of 0.3 is positive for t <= 0.3 (k <= 76)
    gt = np.array([[1, 0, 0, 0]])
    dice_all = 2 * 1 / (1 + 4)
    assert mean_dice_infnet(np.full((1, 4), 0.3), gt) == pytest.approx(77 * dice_all / 256)
    assert mean_dice_infnet(np.zeros((1, 4)), gt) == pytest.approx(dice_all / 256)  # only t = 0
    assert mean_dice_infnet(np.ones((1, 4)), gt) == pytest.approx(dice_all)  # every threshold
    assert np.array_equal(minmax_normalize(np.full((2, 2), 0.7)), np.full((2, 2), 0.7))


def test_empty_masks() -> None:
    empty = np.zeros((3, 3), dtype=np.uint8)
    prob = np.linspace(0, 1, 9).reshape(3, 3)
    # Inf-Net: TP = 0 at every threshold -> 0, whatever is predicted
    assert mean_dice_infnet(prob, empty) == 0.0
    assert mean_dice_infnet(np.zeros((3, 3)), empty) == 0.0
    curves = infnet_curves(prob, empty)
    assert not curves["sensitivity"].any() and not curves["specificity"].any()  # Fmeasure_calu: 0 when TP = 0
    # plain metrics follow covidseg.metrics: both empty at 0.5 -> 1
    m = slice_metrics(np.full((3, 3), 0.1), empty)
    assert m["dice_at_0_5"] == 1.0 and m["iou"] == 1.0 and m["specificity"] == 1.0
    # a prediction with no positive at 0.5 on a non-empty GT
    gt = np.eye(3, dtype=np.uint8)
    m = slice_metrics(np.full((3, 3), 0.1), gt)
    assert m["dice_at_0_5"] == 0.0 and m["sensitivity"] == 0.0 and m["specificity"] == 1.0


def test_resizing_to_gt_size() -> None:
    gt = np.zeros((4, 4), dtype=np.uint8)
    gt[:2, :2] = 1
    small = np.array([[0.9, 0.2, 0.1, 0.0], [0.8, 0.7, 0.2, 0.1], [0.1, 0.3, 0.0, 0.0], [0.0, 0.1, 0.2, 0.0]])
    # 2x2 blocks: bilinear down-sampling by exactly 2 (align_corners=False) averages each block -> the 4x4 map
    big = np.kron(small, np.ones((2, 2)))
    assert np.allclose(resize_to(big, (4, 4)), small)
    assert mean_dice_infnet(big, gt) == pytest.approx(mean_dice_infnet(small, gt))
    # up-sampling: a 2x2 map onto a 4x4 GT; the edge pixels copy the corners (align_corners=False)
    up = resize_to(np.array([[1.0, 0.0], [0.0, 0.0]]), (4, 4))
    assert up.shape == (4, 4) and up[0, 0] == 1.0 and up[0, 1] == 0.75 and up[3, 3] == 0.0
    assert mean_dice_infnet(np.array([[1.0, 0.0], [0.0, 0.0]]), gt) == pytest.approx(
        brute_force_mean_dice(up, gt))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_counts_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    prob = rng.random((17, 23)) ** 3
    prob[0, :5] = [0.0, 1.0, 0.5, 128 / 255, 127 / 255]  # values on and around thresholds
    gt = rng.random((17, 23)) > 0.7
    assert mean_dice_infnet(prob, gt) == pytest.approx(brute_force_mean_dice(prob, gt), abs=1e-12)
    # quantised 8-bit maps, as Inf-Net's PNGs: every value sits on a threshold
    q = np.round(rng.random((9, 9)) * 255) / 255
    q[0, 0], q[0, 1] = 0.0, 1.0
    g = rng.random((9, 9)) > 0.5
    assert mean_dice_infnet(q, g) == pytest.approx(brute_force_mean_dice(q, g), abs=1e-12)


def test_plain_metrics_hand_case() -> None:
    m = slice_metrics(PRED_2X2, GT_2X2)
    # at >= 0.5: P = {(0,0), (0,1), (1,0)}; TP 2, FP 1, FN 0, TN 1
    assert m["dice_at_0_5"] == pytest.approx(0.8)
    assert m["iou"] == pytest.approx(2 / 3)
    assert m["sensitivity"] == 1.0 and m["precision"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(0.5)
    assert specificity(np.ones((2, 2), bool), np.ones((2, 2), bool)) == 1.0


def test_bad_inputs_and_summary() -> None:
    with pytest.raises(ValueError, match="2D"):
        mean_dice_infnet(np.zeros((2, 2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        mean_dice_infnet(np.array([[np.nan, 0.0]]), np.array([[1, 0]]))
    rows = [{"mean_dice_infnet": 0.2, "dice_at_0_5": 1.0}, {"mean_dice_infnet": 0.4, "dice_at_0_5": 0.0}]
    out = summarize(rows, keys=("mean_dice_infnet", "dice_at_0_5"))
    assert out == {"mean_dice_infnet": pytest.approx(0.3), "dice_at_0_5": pytest.approx(0.5)}
