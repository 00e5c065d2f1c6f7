"""Inf-Net's "mean Dice" and plain binary metrics of one 2D slice (docs/method.md).

The mean Dice of Inf-Net's evaluation (``EvaluationTool/main.m`` and ``Fmeasure_calu.m`` of
github.com/DengPingFan/Inf-Net; Fan et al., IEEE TMI 39(8), 2020), per image:

1. GT binarised at ``> 128`` (8-bit masks; callers here pass the {0, 1} mask already binarised).
2. A prediction of another size is resized to the GT's size (bilinear; Inf-Net's test script upsamples its
   logits bilinearly to the GT size before saving, MATLAB's ``imresize`` only fires when the sizes still differ).
3. Min-max normalisation to [0, 1] (MATLAB ``mapminmax(x, 0, 1)``); a constant map is left unchanged
   (``mapminmax`` returns ``y = x`` when ``xmax == xmin``), clipped to [0, 1].
4. For each of the 256 thresholds ``Thresholds = 1:-1/255:0`` (1, 254/255, ..., 1/255, 0): ``P = prob >= t``,
   ``Dice = 2 TP / (|GT| + |P|)``, and Dice = 0 when ``TP == 0`` (so an empty GT scores 0 at every threshold).
5. Average over the 256 thresholds; the dataset's "mean Dice" is the average over images.

Inf-Net saved its maps as 8-bit PNGs before step 3; this module works on the float maps (the difference moves a
pixel across at most one of the 256 thresholds). With ``8-bit`` maps as input the result is identical.

The same loop gives Inf-Net's threshold-averaged sensitivity and specificity (``Fmeasure_calu.m`` sets both to 0
when ``TP == 0``), reported as ``mean_sensitivity_infnet`` / ``mean_specificity_infnet``. The plain metrics at a
0.5 threshold on the (unnormalised) probabilities use :func:`covidseg.metrics.binary_metrics` and its empty-mask
convention (both empty: 1; one empty: 0), plus specificity ``TN / (TN + FP)`` (1 when there are no negatives).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from covidseg.metrics import binary_metrics

N_THRESHOLDS = 256
"""Inf-Net evaluates at ``1:-1/255:0``, 256 thresholds."""
THRESHOLDS: np.ndarray = np.arange(N_THRESHOLDS - 1, -1, -1, dtype=np.float64) / (N_THRESHOLDS - 1)
"""The thresholds in Inf-Net's order: 1, 254/255, ..., 1/255, 0."""
BINARY_THRESHOLD = 0.5
"""Probability threshold of the plain metrics (``dice_at_0_5`` ...)."""
METRIC_KEYS = (
    "mean_dice_infnet", "dice_at_0_5", "iou", "sensitivity", "specificity", "precision",
    "mean_sensitivity_infnet", "mean_specificity_infnet",
)
"""Keys of :func:`slice_metrics`, in table order."""


def resize_to(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a ``(h, w)`` map to ``shape`` ``(H, W)`` (``align_corners=False``); float64 out."""
    prob = np.asarray(prob, dtype=np.float64)
    if prob.shape == tuple(shape):
        return prob
    t = torch.from_numpy(np.ascontiguousarray(prob))[None, None]  # (1, 1, h, w)
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()


def minmax_normalize(prob: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1] as MATLAB's ``mapminmax(x, 0, 1)``; a constant map stays as it is (clipped)."""
    prob = np.asarray(prob, dtype=np.float64)
    lo, hi = float(prob.min()), float(prob.max())
    if hi > lo and np.isfinite(lo) and np.isfinite(hi):
        return (prob - lo) / (hi - lo)
    return np.clip(prob, 0.0, 1.0)


def _check(prob: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt_bool = np.asarray(gt) > 0
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim != 2 or gt_bool.ndim != 2:
        raise ValueError(f"expected 2D maps, got prediction {prob.shape} and GT {gt_bool.shape}")
    if not np.all(np.isfinite(prob)):
        raise ValueError("the prediction holds NaN or infinite values")
    return resize_to(prob, gt_bool.shape), gt_bool


def threshold_counts(prob: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``|P_t|`` and ``TP_t`` for the 256 thresholds of :data:`THRESHOLDS` (``P_t = prob >= t``), in one pass.

    Args:
        prob: ``(H, W)`` map in [0, 1] (already normalised and at the GT's size).
        gt: ``(H, W)`` bool.

    Returns:
        Two int64 arrays of length 256 in the order of :data:`THRESHOLDS`.
    """
    ascending = THRESHOLDS[::-1]  # 0, 1/255, ..., 1
    # number of thresholds <= each pixel's value = the thresholds at which the pixel is predicted positive
    n_pos = np.searchsorted(ascending, prob.ravel(), side="right")  # 0..256
    hist_all = np.bincount(n_pos, minlength=N_THRESHOLDS + 1)
    hist_fg = np.bincount(n_pos[gt.ravel()], minlength=N_THRESHOLDS + 1)
    # a pixel with n_pos = m is positive for ascending[0..m-1]: counts for ascending[j] = sum over m > j
    pred_asc = np.cumsum(hist_all[::-1])[::-1][1:]  # (256,) ascending thresholds
    tp_asc = np.cumsum(hist_fg[::-1])[::-1][1:]
    return pred_asc[::-1].astype(np.int64), tp_asc[::-1].astype(np.int64)


def infnet_curves(prob: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
    """Per-threshold Dice, sensitivity and specificity of one image, exactly as ``Fmeasure_calu.m``.

    Args:
        prob: ``(h, w)`` probability (or any score) map; resized to the GT's size when it differs.
        gt: ``(H, W)`` mask; non-zero = infection (pass 8-bit GTs binarised at > 128).

    Returns:
        ``{"dice", "sensitivity", "specificity"}``, each ``(256,)`` in the order of :data:`THRESHOLDS`.
    """
    prob, gt_bool = _check(prob, gt)
    prob = minmax_normalize(prob)
    n_pred, tp = threshold_counts(prob, gt_bool)
    n_gt = int(gt_bool.sum())
    n_all = gt_bool.size
    fp = n_pred - tp
    tn = (n_all - n_pred) - (n_gt - tp)
    has_tp = tp > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(has_tp, 2.0 * tp / (n_gt + n_pred), 0.0)
        sens = np.where(has_tp, tp / max(n_gt, 1), 0.0)
        spec = np.where(has_tp & (tn + fp > 0), tn / np.maximum(tn + fp, 1), 0.0)
    return {"dice": dice, "sensitivity": sens, "specificity": spec}


def mean_dice_infnet(prob: np.ndarray, gt: np.ndarray) -> float:
    """Inf-Net's mean Dice of one image: the Dice averaged over the 256 thresholds (see the module docstring).

    Args:
        prob: ``(h, w)`` predicted probability map (any size; resized to the GT's).
        gt: ``(H, W)`` binary mask (non-zero = infection).

    Returns:
        A float in [0, 1]. Average it over images for the dataset's number.
    """
    return float(infnet_curves(prob, gt)["dice"].mean())


def specificity(pred: np.ndarray, gt: np.ndarray) -> float:
    """``TN / (TN + FP)`` of two boolean masks; 1 when the GT covers the whole image (no negatives)."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    negatives = ~gt
    n_neg = int(negatives.sum())
    return 1.0 if n_neg == 0 else float((negatives & ~pred).sum() / n_neg)


def slice_metrics(prob: np.ndarray, gt: np.ndarray, threshold: float = BINARY_THRESHOLD) -> dict[str, float]:
    """Every metric of one slice: Inf-Net's threshold averages and the plain ones at ``threshold``.

    Args:
        prob: ``(h, w)`` sigmoid probabilities (any size; resized bilinearly to the GT's).
        gt: ``(H, W)`` binary mask.
        threshold: probability threshold of the plain metrics.

    Returns:
        A dict with the keys of :data:`METRIC_KEYS`.
    """
    prob_r, gt_bool = _check(prob, gt)
    curves = infnet_curves(prob_r, gt_bool)
    pred = prob_r >= threshold
    plain = binary_metrics(pred, gt_bool)
    return {
        "mean_dice_infnet": float(curves["dice"].mean()),
        "dice_at_0_5": float(plain["dice"]),
        "iou": float(plain["iou"]),
        "sensitivity": float(plain["sensitivity"]),
        "specificity": specificity(pred, gt_bool),
        "precision": float(plain["precision"]),
        "mean_sensitivity_infnet": float(curves["sensitivity"].mean()),
        "mean_specificity_infnet": float(curves["specificity"].mean()),
    }


def summarize(rows: Sequence[dict[str, Any]], keys: Sequence[str] = METRIC_KEYS) -> dict[str, float]:
    """Mean over images of each metric (Inf-Net averages per image, then over images)."""
    if not rows:
        return {k: float("nan") for k in keys}
    return {k: float(np.mean([float(r[k]) for r in rows])) for k in keys}
