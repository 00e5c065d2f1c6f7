"""The report's loss (0.5 BCE + Dice on logits) against MONAI, and the deep-supervision weighting."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from covidseg.losses import DICE_SMOOTH, DeepSupervisionLoss, SegmentationLoss, soft_dice_loss


def sample(shape, seed=0, p=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 3
    target = (torch.rand(shape, generator=g) < p).float()
    return logits, target


@pytest.mark.parametrize("shape", [(2, 1, 4, 16, 16), (3, 1, 16, 16)])
def test_single_output_equals_monai_dice_ce(shape):
    logits, target = sample(shape)
    reference = DiceCELoss(
        sigmoid=True, batch=True, lambda_dice=1.0, lambda_ce=0.5, smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH
    )
    torch.testing.assert_close(SegmentationLoss()(logits, target), reference(logits, target))


@pytest.mark.parametrize("shape", [(2, 1, 4, 16, 16), (3, 1, 16, 16), (2, 3, 8, 8)])
def test_dice_per_sample_equals_monai_dice_without_batch(shape):
    logits, target = sample(shape, seed=4)
    target[0] = 0  # an empty sample counts as one Dice of its own
    reference = DiceLoss(sigmoid=True, batch=False, smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH)
    torch.testing.assert_close(soft_dice_loss(logits, target, batch_dice=False), reference(logits, target))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(SegmentationLoss(batch_dice=False)(logits, target),
                               reference(logits, target) + 0.5 * bce)


def test_dice_per_sample_weighs_a_small_lesion_as_much_as_a_large_one():
    """Batch Dice barely sees a missed small lesion next to a large one that is found; per-sample Dice counts it
    as half of the batch."""
    target = torch.zeros(2, 1, 16, 16)
    target[0, 0, :12] = 1  # large
    target[1, 0, 0, :2] = 1  # small, missed below
    logits = torch.full_like(target, -50.0)
    logits[0] = (target[0] * 2 - 1) * 50
    assert soft_dice_loss(logits, target) < 0.02
    assert soft_dice_loss(logits, target, batch_dice=False) == pytest.approx(0.5, abs=1e-3)


def test_multichannel_equals_monai_dice_plus_half_bce():
    # MONAI's DiceCELoss switches to softmax cross entropy for K > 1; our channels are independent sigmoids
    logits, target = sample((2, 3, 4, 8, 8), seed=1)
    dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH)(logits, target)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(SegmentationLoss()(logits, target), dice + 0.5 * bce)


def test_weights_select_the_terms():
    logits, target = sample((2, 1, 4, 8, 8), seed=2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(SegmentationLoss(bce_weight=1.0, dice_weight=0.0)(logits, target), bce)
    torch.testing.assert_close(SegmentationLoss(bce_weight=0.0, dice_weight=1.0)(logits, target),
                               soft_dice_loss(logits, target))


def test_dice_is_batch_wise():
    """One Dice over the whole batch: an empty sample next to a perfect one costs (almost) nothing."""
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1
    logits = (target * 2 - 1) * 50  # confident and correct
    assert soft_dice_loss(logits, target) < 1e-6
    assert SegmentationLoss()(logits, target) < 1e-6


def test_stable_under_low_precision_and_extreme_logits():
    logits, target = sample((2, 1, 4, 8, 8), seed=3)
    low = logits.to(torch.bfloat16)
    loss = SegmentationLoss()(low, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, SegmentationLoss()(low.float(), target))
    extreme = torch.where(target > 0, -200.0, 200.0).to(torch.float16)  # confidently wrong
    assert torch.isfinite(SegmentationLoss()(extreme, target))
    logits.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = SegmentationLoss()(logits * 1.0, target)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        SegmentationLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4))


def test_deep_supervision_weighting():
    loss = SegmentationLoss()
    target = sample((2, 1, 4, 8, 8))[1]
    heads = [sample((2, 1, 4, 8, 8), seed=s)[0] for s in (10, 11, 12)]
    values = [loss(h, target) for h in heads]
    ds = DeepSupervisionLoss(loss)
    torch.testing.assert_close(ds(heads, target), 0.5 * values[0] + 0.25 * values[1] + 0.25 * values[2])
    torch.testing.assert_close(ds(heads[:2], target), 0.5 * values[0] + 0.5 * values[1])
    torch.testing.assert_close(ds(heads[0], target), values[0])
    torch.testing.assert_close(ds(heads[:1], target), values[0])
    weighted = DeepSupervisionLoss(loss, final_weight=0.7)(heads, target)
    torch.testing.assert_close(weighted, 0.7 * values[0] + 0.15 * values[1] + 0.15 * values[2])
    with pytest.raises(ValueError, match="final_weight"):
        DeepSupervisionLoss(loss, final_weight=0.0)


def infnet_structure_loss(pred, mask):
    """Inf-Net's ``joint_loss`` (github.com/DengPingFan/Inf-Net, MyTrain_LungInf.py), transcribed as the reference."""
    weit = 1 + 5 * torch.abs(torch.nn.functional.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)
    wbce = torch.nn.functional.binary_cross_entropy_with_logits(pred, mask, reduction="none")
    wbce = (weit * wbce).sum(dim=(2, 3)) / weit.sum(dim=(2, 3))
    pred = torch.sigmoid(pred)
    inter = ((pred * mask) * weit).sum(dim=(2, 3))
    union = ((pred + mask) * weit).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


@pytest.mark.parametrize("shape", [(3, 1, 40, 40), (2, 2, 33, 48)])
def test_structure_loss_equals_infnets(shape):
    from covidseg.losses import StructureLoss

    logits, target = sample(shape, seed=5)
    target[:, :, 5:20, 8:30] = 1  # a region with a border as well as scattered pixels
    torch.testing.assert_close(StructureLoss()(logits, target), infnet_structure_loss(logits, target))
    torch.testing.assert_close(StructureLoss()(logits.bfloat16(), target), infnet_structure_loss(logits.bfloat16().float(), target))


def test_border_weights_grow_at_the_border_only():
    from covidseg.losses import border_weights

    target = torch.zeros(1, 1, 96, 96)
    target[..., :, 48:] = 1  # a straight border down the middle
    w = border_weights(target)
    assert w[0, 0, 48, 5].item() == pytest.approx(1.0)  # 31 px box all background
    assert w[0, 0, 48, 80].item() == pytest.approx(1.0)  # all foreground
    assert w[0, 0, 48, 47].item() == pytest.approx(1 + 5 * 15 / 31)  # background pixel beside the border
    assert w[0, 0, 48, 48].item() == pytest.approx(1 + 5 * 15 / 31)
    with pytest.raises(ValueError, match="odd"):
        border_weights(target, window=30)


def test_structure_loss_rewards_the_right_mask_and_rejects_3d():
    from covidseg.losses import StructureLoss

    target = torch.zeros(2, 1, 32, 32)
    target[0, :, 8:24, 8:24] = 1  # slice 1 empty
    right, wrong = (target * 2 - 1) * 20, (1 - 2 * target) * 20
    assert StructureLoss()(right, target) < 1e-3 < 1.0 < StructureLoss()(wrong, target)
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        StructureLoss()(torch.zeros(1, 1, 4, 8, 8), torch.zeros(1, 1, 4, 8, 8))


def test_segmentation_loss_by_name():
    from covidseg.losses import LOSSES, StructureLoss, segmentation_loss

    assert LOSSES == ("bce-dice", "structure")
    report = segmentation_loss("bce-dice", 0.25, 2.0, batch_dice=False)
    assert isinstance(report, SegmentationLoss) and (report.bce_weight, report.dice_weight) == (0.25, 2.0)
    assert report.batch_dice is False
    assert isinstance(segmentation_loss("structure"), StructureLoss)
    with pytest.raises(ValueError, match="expected one of bce-dice, structure"):
        segmentation_loss("focal")
