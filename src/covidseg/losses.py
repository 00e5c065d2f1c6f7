"""The report's loss, ``0.5 * BCE + Dice`` on logits, and the deep-supervision weighting (docs/method.md).

Both terms are computed from the logits in float32, so the loss is stable under bf16/fp16 autocast: BCE uses
``binary_cross_entropy_with_logits`` (log-sum-exp form) and the soft Dice uses ``sigmoid(logits)``.

Soft Dice is *batch-wise* (nnU-Net's ``batch_dice``): intersections and sums run over the batch and all voxels of
each channel, then ``1 - Dice`` is averaged over the channels. Patches without foreground (two thirds of a batch
under the default sampling) then do not each contribute a degenerate Dice of 0 or 1. ``batch_dice=False`` takes
one Dice per sample and channel and averages them (MONAI's ``DiceLoss(batch=False)``), as a per-image metric such
as Inf-Net's mean Dice scores a model. Smoothing
``smooth_nr = smooth_dr = 1e-5`` as MONAI's and nnU-Net's defaults. The single-output loss equals MONAI's
``DiceCELoss(sigmoid=True, batch=True, lambda_dice=1, lambda_ce=0.5)`` for one channel (tests/test_losses.py).

:class:`StructureLoss` is Inf-Net's loss instead (Fan et al., IEEE TMI 2020, after F3Net): per image, a BCE and a
soft IoU whose pixels near the mask's border weigh up to six times more; an option of the 2D slice training
(``SemisegConfig.loss``), not the report's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BCE_WEIGHT = 0.5
"""Weight of the binary cross entropy in the report's loss (report §3.1)."""
DICE_WEIGHT = 1.0
"""Weight of the soft Dice loss (report §3.1)."""
DICE_SMOOTH = 1e-5
"""Numerator and denominator smoothing of the soft Dice (MONAI and nnU-Net default)."""
FINAL_WEIGHT = 0.5
"""Deep supervision: weight of the final output; the rest is shared equally by the other heads (report §3.2)."""
BORDER_WINDOW = 31
"""Side of the box whose mean mask value :func:`border_weights` compares with each pixel (Inf-Net: 31 pixels)."""
BORDER_GAIN = 5.0
"""Extra weight of a pixel whose box is half foreground, half background (Inf-Net: 5)."""
LOSSES = ("bce-dice", "structure")
"""Names of the losses a 2D run can train with (``SemisegConfig.loss``): the report's, Inf-Net's."""


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth_nr: float = DICE_SMOOTH, smooth_dr: float = DICE_SMOOTH,
    batch_dice: bool = True,
) -> torch.Tensor:
    """Soft Dice loss of sigmoid probabilities: batch-wise and averaged over channels, or per sample and channel.

    Args:
        logits: ``(B, K, *S)`` logits.
        target: ``(B, K, *S)`` in {0, 1} (or soft labels in [0, 1]).
        smooth_nr: added to the numerator ``2 * sum(p * g)``.
        smooth_dr: added to the denominator ``sum(p) + sum(g)``.
        batch_dice: sums over the batch too (one Dice per channel); ``False``: one Dice per sample and channel.

    Returns:
        Scalar ``mean_k (1 - (2 I_k + smooth_nr) / (P_k + G_k + smooth_dr))`` in float32 (with ``batch_dice=False``
        the mean runs over samples and channels).
    """
    probs = torch.sigmoid(logits.float())
    target = target.float()
    spatial = list(range(2, logits.ndim))
    axes = [0, *spatial] if batch_dice else spatial  # one Dice per channel, or per sample and channel
    intersection = (probs * target).sum(dim=axes)  # (K,) or (B, K)
    denominator = probs.sum(dim=axes) + target.sum(dim=axes)
    dice = (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)
    return (1.0 - dice).mean()


class SegmentationLoss(nn.Module):
    """``bce_weight * BCEWithLogits + dice_weight * soft Dice`` on logits (the report's ``0.5 BCE + Dice``).

    Args:
        bce_weight: weight of the mean binary cross entropy.
        dice_weight: weight of the soft Dice loss (:func:`soft_dice_loss`).
        smooth_nr: Dice numerator smoothing.
        smooth_dr: Dice denominator smoothing.
        batch_dice: batch-wise Dice (the default) or one Dice per sample (:func:`soft_dice_loss`).
    """

    def __init__(
        self,
        bce_weight: float = BCE_WEIGHT,
        dice_weight: float = DICE_WEIGHT,
        smooth_nr: float = DICE_SMOOTH,
        smooth_dr: float = DICE_SMOOTH,
        batch_dice: bool = True,
    ) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr
        self.batch_dice = batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B, K, *S)`` logits and ``(B, K, *S)`` targets in {0, 1} -> scalar float32 loss."""
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have one shape")
        logits32 = logits.float()
        target32 = target.float()
        bce = F.binary_cross_entropy_with_logits(logits32, target32)
        dice = soft_dice_loss(logits32, target32, self.smooth_nr, self.smooth_dr, self.batch_dice)
        return self.bce_weight * bce + self.dice_weight * dice


def border_weights(target: torch.Tensor, window: int = BORDER_WINDOW, gain: float = BORDER_GAIN) -> torch.Tensor:
    """Inf-Net's pixel weights ``1 + gain * |mean_box(target) - target|``, ``(B, K, H, W)`` in, same shape out.

    The box mean is a ``window`` x ``window`` average pooling with stride 1 and zero padding counted (PyTorch's
    ``avg_pool2d`` default, as Inf-Net's code calls it): a pixel far from any border weighs 1, one on the border of
    a large region about ``1 + gain / 2``.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd number of pixels, got {window}")
    target = target.float()
    mean = F.avg_pool2d(target, kernel_size=window, stride=1, padding=window // 2)
    return 1.0 + gain * (mean - target).abs()


class StructureLoss(nn.Module):
    """Inf-Net's loss on ``(B, K, H, W)`` logits: border-weighted BCE plus border-weighted soft IoU, per image.

    ``w = border_weights(target)``; per image and channel ``wBCE = sum(w * bce) / sum(w)`` and
    ``wIoU = 1 - (sum(w p g) + 1) / (sum(w (p + g)) - sum(w p g) + 1)`` with ``p = sigmoid(logits)``; the loss
    is the mean of ``wBCE + wIoU``. Computed in float32 from the logits, as :class:`SegmentationLoss`.
    """

    def __init__(self, window: int = BORDER_WINDOW, gain: float = BORDER_GAIN) -> None:
        super().__init__()
        self.window = window
        self.gain = gain

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar float32 loss of ``(B, K, H, W)`` logits against targets of the same shape in {0, 1}."""
        if logits.shape != target.shape or logits.ndim != 4:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must be one "
                             "(B, K, H, W) shape")
        logits32, target32 = logits.float(), target.float()
        weights = border_weights(target32, self.window, self.gain)
        bce = F.binary_cross_entropy_with_logits(logits32, target32, reduction="none")
        wbce = (weights * bce).sum(dim=(2, 3)) / weights.sum(dim=(2, 3))
        probs = torch.sigmoid(logits32)
        inter = (weights * probs * target32).sum(dim=(2, 3))
        union = (weights * (probs + target32)).sum(dim=(2, 3))
        wiou = 1.0 - (inter + 1.0) / (union - inter + 1.0)
        return (wbce + wiou).mean()


def segmentation_loss(name: str, bce_weight: float = BCE_WEIGHT, dice_weight: float = DICE_WEIGHT,
                      batch_dice: bool = True) -> nn.Module:
    """The per-head loss called ``name`` (:data:`LOSSES`): ``bce-dice`` the report's :class:`SegmentationLoss`
    (with these weights), ``structure`` Inf-Net's :class:`StructureLoss` (which has none)."""
    if name == "bce-dice":
        return SegmentationLoss(bce_weight, dice_weight, batch_dice=batch_dice)
    if name == "structure":
        return StructureLoss()
    raise ValueError(f"loss {name!r}: expected one of {', '.join(LOSSES)}")


class DeepSupervisionLoss(nn.Module):
    """Weights a loss over deep-supervision heads: ``final_weight`` on the final output, the rest shared equally.

    ``L = w * loss(final) + (1 - w) * mean_i loss(head_i)`` (report §3.2: w = 0.5). A single tensor (heads off)
    gets ``loss(final)`` alone, as does a list of one.

    Args:
        loss: the per-head loss (e.g. :class:`SegmentationLoss`).
        final_weight: weight ``w`` of the final output, in (0, 1].
    """

    def __init__(self, loss: nn.Module, final_weight: float = FINAL_WEIGHT) -> None:
        super().__init__()
        if not 0.0 < final_weight <= 1.0:
            raise ValueError(f"final_weight must be in (0, 1], got {final_weight}")
        self.loss = loss
        self.final_weight = final_weight

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """``outputs``: ``(B, K, *S)`` or a list ``[final, head_1, ...]`` of such (all at the target's size);
        ``target``: ``(B, K, *S)``. Returns a scalar."""
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        final, *others = outputs
        if not others:
            return self.loss(final, target)
        deep = torch.stack([self.loss(o, target) for o in others]).mean()
        return self.final_weight * self.loss(final, target) + (1.0 - self.final_weight) * deep
