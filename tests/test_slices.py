"""The 2D infection model's slice convention (covidseg.inference.slices): window, orientation, crop, stride."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from covidseg.errors import InputError
from covidseg.inference.slices import (
    WINDOW_HU,
    SliceConvention,
    choose_slices,
    from_model_orientation,
    infection_probabilities,
    predict_slices,
    prepare_slices,
    restore_volume,
    slice_stride,
    to_model_orientation,
    window,
)
from covidseg.io.image import make_ct_image

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MEDSEG = SHARED / "covid-semiseg" / "train" / "Imgs"
LIDC = SHARED / "real-ct" / "lidc-idri-0314" / "ct.nii.gz"
EVERY_SLICE = dict(min_slice_spacing_mm=0.0, margin_fraction=0.0, min_box_fraction=0.0)
"""Settings that process every lung slice in its bare lung box (a round trip maps voxels one to one)."""


class LogitOfInput(torch.nn.Module):
    """A 'model' whose sigmoid output is its input: logit(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(x.clamp(1e-6, 1 - 1e-6))


# ------------------------------------------------------------------------------------------- window


def test_window_is_the_fitted_linear_map_with_clipping_in_8bit_steps() -> None:
    from monai.transforms import ScaleIntensityRange

    hu = np.linspace(-2000, 2000, 4001, dtype=np.float32)
    lo, hi = WINDOW_HU
    ref = np.asarray(ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(hu))
    np.testing.assert_allclose(window(hu, quantize=False), ref, atol=1e-6)
    q = window(hu)
    np.testing.assert_allclose(q * 255, np.round(q * 255), atol=1e-4)  # 8-bit levels, as the jpgs
    assert np.abs(q - ref).max() <= 0.5 / 255 + 1e-6
    assert window(np.array([lo - 1, hi + 1])).tolist() == [0.0, 1.0]
    # the tissue levels the MedSeg slices show (docs/slices.md): air ~19, fat ~193, soft tissue ~216
    levels = window(np.array([-1000.0, -100.0, 40.0])) * 255
    np.testing.assert_allclose(levels, [19, 193, 216], atol=6)


# -------------------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", ["lps", "las"])
def test_orientation_round_trips(orientation: str) -> None:
    a = np.arange(3 * 5 * 7).reshape(3, 5, 7)
    laid = to_model_orientation(a, orientation)  # type: ignore[arg-type]
    assert laid.shape == (3, 7, 5)
    np.testing.assert_array_equal(from_model_orientation(laid, orientation), a)  # type: ignore[arg-type]


@pytest.mark.parametrize(("orientation", "diag"), [("lps", (-1.0, -1.0, 1.0)), ("las", (-1.0, 1.0, 1.0))])
def test_orientation_is_nibabels_array_of_a_nifti_stored_that_way(orientation: str, diag: tuple[float, ...]) -> None:
    """A NIfTI whose voxel axes run L, P, S (MedSeg, radiopaedia) or L, A, S (coronacases; dcm2niix's usual
    output): ``array[:, :, k]`` written as an image is ``to_model_orientation`` of the canonical slice."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    file_array = rng.normal(size=(6, 5, 4)).astype(np.float32)  # (i, j, k) as nibabel reads it
    affine = np.diag([*diag, 1.0])
    assert "".join(nib.aff2axcodes(affine)) == orientation.upper()
    ct = make_ct_image(file_array, affine, Path("x.nii.gz"))  # the project's canonical (D, H, W)
    for k in range(file_array.shape[2]):
        np.testing.assert_array_equal(to_model_orientation(ct.array[k], orientation), file_array[:, :, k])  # type: ignore[arg-type]


def anatomy(shape: tuple[int, int, int] = (6, 96, 128)) -> tuple[np.ndarray, np.ndarray]:
    """A canonical chest-like volume: body, a bigger right lung (low columns), a smaller left lung, the heart
    anterior-left, the spine posterior on the midline. Returns ``(hu, lungs)``."""
    d, h, w = shape
    rr, cc = np.mgrid[0:h, 0:w]
    body = ((rr - h / 2) / (0.48 * h)) ** 2 + ((cc - w / 2) / (0.48 * w)) ** 2 < 1
    right = ((rr - 0.45 * h) / (0.3 * h)) ** 2 + ((cc - 0.28 * w) / (0.17 * w)) ** 2 < 1
    left = ((rr - 0.45 * h) / (0.25 * h)) ** 2 + ((cc - 0.74 * w) / (0.12 * w)) ** 2 < 1
    heart = ((rr - 0.3 * h) / (0.12 * h)) ** 2 + ((cc - 0.56 * w) / (0.08 * w)) ** 2 < 1
    spine = ((rr - 0.66 * h) / (0.07 * h)) ** 2 + ((cc - 0.5 * w) / (0.05 * w)) ** 2 < 1  # between the lungs
    sl = np.full((h, w), -1000.0, np.float32)
    sl[body] = 40.0
    sl[right | left] = -850.0
    sl[heart & ~right & ~left] = 60.0
    sl[spine] = 700.0
    lab = np.zeros((h, w), np.uint8)
    lab[left] = 1
    lab[right] = 2
    return np.repeat(sl[None], d, axis=0), np.repeat(lab[None], d, axis=0)


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


@pytest.mark.parametrize("orientation", ["lps", "las"])
def test_prepared_slice_shows_the_anatomy_as_the_training_slices(orientation: str) -> None:
    """Training slices (lps, MedSeg): lungs top and bottom, the patient's left (heart, smaller lung) at the
    bottom, the spine on the right; coronacases (las): the spine on the left."""
    hu, lungs = anatomy()
    size = 64
    prep = prepare_slices(hu, (2.0, 1.0, 1.0), lungs, SliceConvention(size=size, orientation=orientation))  # type: ignore[arg-type]
    img = prep.images[len(prep) // 2, 0]
    spine = _centroid(img >= 0.99)
    heart = _centroid((img > 0.9) & (img < 0.99))  # soft tissue anterior to the lungs: mostly the heart here
    dark = img < 0.3
    top, bottom = dark[: size // 2].sum(), dark[size // 2:].sum()
    assert bottom < top  # the smaller (left) lung at the bottom
    assert abs(spine[0] - size / 2) < size / 8  # spine on the horizontal midline
    assert (spine[1] > 0.8 * size) if orientation == "lps" else (spine[1] < 0.2 * size)
    assert heart[0] > size / 2  # the heart towards the patient's left = the bottom


# ---------------------------------------------------------------------------------------- round trip


def test_identity_model_gives_back_the_markers_in_place() -> None:
    d, h, w = 9, 60, 80
    kk, rr, cc = np.mgrid[0:d, 0:h, 0:w]
    hu = (-850 + 60 * np.sin(rr / 9.0) * np.cos(cc / 11.0) + 5 * kk).astype(np.float32)  # smooth, slice-dependent
    lungs = np.zeros((d, h, w), np.uint8)
    lungs[:, 10:50, 8:36] = 2
    lungs[:, 12:46, 44:74] = 1
    hu[:, 14:20, 12:18] = 200.0  # marker near the anterior right corner
    hu[4, 38:44, 60:70] = 100.0  # marker posterior-left, in one slice only
    conv = SliceConvention(size=64, **EVERY_SLICE)  # type: ignore[arg-type]
    prep = prepare_slices(hu, (2.5, 0.7, 0.7), lungs, conv)
    assert prep.images.shape == (d, 1, 64, 64) and prep.images.dtype == np.float32
    assert prep.indices == list(range(d))
    back = restore_volume(prep.images, prep)
    expected = window(hu)
    inside = np.zeros_like(lungs, bool)
    inside[:, 10:50, 8:74] = True
    assert np.all(back[~inside] == 0)
    assert np.abs(back - expected)[inside].mean() < 0.02
    for k, (rows, cols) in [(2, (slice(14, 20), slice(12, 18))), (4, (slice(38, 44), slice(60, 70)))]:
        peak = back[k] > 0.5 * float(expected[k][rows, cols].mean())
        np.testing.assert_allclose(_centroid(peak), _centroid(expected[k] > 0.5), atol=1.0)
    assert back[3, 38:44, 60:70].max() < 0.3  # the one-slice marker stays in its slice
    probs = infection_probabilities(LogitOfInput(), hu, (2.5, 0.7, 0.7), lungs, conv, batch_size=4)
    np.testing.assert_allclose(probs, back, atol=1e-4)


def test_flip_tta_of_a_flip_equivariant_model_changes_nothing() -> None:
    x = torch.rand(5, 1, 16, 16)
    plain = predict_slices(LogitOfInput(), x, batch_size=2)
    tta = predict_slices(LogitOfInput(), x, batch_size=3, flip_tta="all")
    np.testing.assert_allclose(plain, x.numpy(), atol=1e-5)
    np.testing.assert_allclose(tta, plain, atol=1e-5)


class NotMirrorSymmetric(torch.nn.Module):
    """Logit = the input plus a ramp along the rows and one along the columns: each mirror changes the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.linspace(-1.0, 1.0, x.shape[-2]).view(-1, 1)
        cols = torch.linspace(-2.0, 2.0, x.shape[-1]).view(1, -1)
        return x + rows + cols


def test_flip_tta_averages_the_mirrored_logits() -> None:
    """``flip_tta="all"`` (the shipped model's) is the sigmoid of the mean of the four mirrorings' logits."""
    from covidseg.config import FLIP_TTA

    x = torch.rand(3, 1, 8, 12)
    model = NotMirrorSymmetric()
    logits = [torch.flip(model(torch.flip(x, d) if d else x), d) if d else model(x) for d in ((), *FLIP_TTA["all"])]
    want = torch.sigmoid(sum(logits) / 4).numpy()
    got = predict_slices(model, x, batch_size=2, flips=FLIP_TTA["all"])
    np.testing.assert_allclose(got, want, atol=1e-6)
    lr = predict_slices(model, x, batch_size=2, flips=FLIP_TTA["lr"])
    np.testing.assert_allclose(lr, torch.sigmoid((logits[0] + logits[1]) / 2).numpy(), atol=1e-6)
    assert np.abs(got - lr).max() > 0.05  # the top-bottom mirror does change this model's answer


def test_flip_tta_settings() -> None:
    from covidseg.config import flip_tta_dims, flip_tta_name
    from covidseg.errors import ConfigError

    assert flip_tta_dims(True) == ((-1,),) and flip_tta_dims(False) == () and flip_tta_dims(None) == ()
    assert flip_tta_dims("all") == ((-1,), (-2,), (-2, -1)) and flip_tta_name(True) == "lr"
    assert flip_tta_name("all") == "all" and flip_tta_name(None) == "off"
    with pytest.raises(ConfigError, match="expected one of off, lr, all"):
        flip_tta_dims("both")


# --------------------------------------------------------------------------------------------- stride


@pytest.mark.parametrize(("spacing", "min_mm", "stride"),
                         [(1.0, 2.5, 3), (0.625, 2.5, 4), (0.8, 2.0, 3), (2.5, 2.5, 1), (5.0, 2.5, 1), (1.0, 0.0, 1)])
def test_slice_stride(spacing: float, min_mm: float, stride: int) -> None:
    assert slice_stride(spacing, min_mm) == stride


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 50), st.integers(0, 400), st.integers(1, 9))
def test_chosen_slices_keep_both_ends_and_are_at_least_a_stride_apart(first: int, span: int, stride: int) -> None:
    ks = choose_slices(first, first + span, stride)
    assert ks[0] == first and ks[-1] == first + span
    gaps = np.diff(ks)
    if span >= stride:
        assert gaps.min() >= stride and gaps.max() < 2 * stride
    else:
        assert len(ks) <= 2


def test_skipped_slices_are_interpolated_linearly() -> None:
    d, h, w = 13, 20, 24
    hu = np.full((d, h, w), -800.0, np.float32)
    lungs = np.zeros((d, h, w), np.uint8)
    lungs[:, 4:16, 3:21] = 1
    prep = prepare_slices(hu, (1.0, 1.0, 1.0), lungs, SliceConvention(size=16, min_slice_spacing_mm=3.0))
    assert prep.indices == [0, 3, 6, 9, 12]
    probs = np.stack([np.full((1, 16, 16), k / 12.0, np.float32) for k in prep.indices])
    vol = restore_volume(probs, prep)
    box = prep.boxes[0]
    for k in range(d):
        np.testing.assert_allclose(vol[k, box.rows[0]:box.rows[1], box.cols[0]:box.cols[1]], k / 12.0, atol=1e-6)
    assert vol[:, :box.rows[0]].max() == 0 and vol[:, :, box.cols[1]:].max() == 0


def test_small_boxes_grow_to_the_training_scale() -> None:
    hu, lungs = anatomy((5, 96, 128))
    lungs[0] = 0
    lungs[0, 40:44, 30:34] = 2  # a lung tip: 4 x 4 voxels
    prep = prepare_slices(hu, (1.0, 1.0, 1.0), lungs, SliceConvention(size=32, min_slice_spacing_mm=0.0))
    tip, full = prep.boxes[0].shape, max(b.shape for b in prep.boxes[1:])
    assert tip[0] >= 0.7 * full[0] and tip[1] >= 0.7 * full[1]
    assert all(0 <= b.rows[0] < b.rows[1] <= 96 and 0 <= b.cols[0] < b.cols[1] <= 128 for b in prep.boxes)


# ----------------------------------------------------------------------------------- degenerate inputs


def test_no_lungs_gives_an_empty_result_and_a_zero_volume() -> None:
    hu = np.zeros((4, 10, 12), np.float32)
    lungs = np.zeros((4, 10, 12), np.uint8)
    prep = prepare_slices(hu, (1.0, 1.0, 1.0), lungs, SliceConvention(size=16))
    assert len(prep) == 0 and prep.images.shape == (0, 1, 16, 16)

    class Boom(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the model must not run on no slices")

    probs = predict_slices(Boom(), prep.images)
    assert probs.shape == (0, 1, 16, 16)
    vol = restore_volume(probs, prep)
    assert vol.shape == (4, 10, 12) and vol.dtype == np.float32 and not vol.any()


def test_single_slice_and_single_voxel_lungs() -> None:
    hu = np.full((1, 8, 9), -900.0, np.float32)
    lungs = np.zeros((1, 8, 9), np.uint8)
    lungs[0, 3, 4] = 1
    prep = prepare_slices(hu, (5.0, 1.0, 1.0), lungs, SliceConvention(size=16))
    assert prep.indices == [0] and prep.boxes[0].shape == (1, 1)
    vol = restore_volume(prep.images, prep)
    assert vol.shape == (1, 8, 9) and np.isfinite(vol).all()
    assert vol[0, 3, 4] == pytest.approx(float(window(np.float32(-900.0))), abs=1e-6) and vol.sum() == vol[0, 3, 4]


def test_bad_inputs_raise_clear_errors() -> None:
    hu = np.zeros((3, 8, 8), np.float32)
    lungs = np.ones((3, 8, 8), np.uint8)
    with pytest.raises(InputError, match="do not match the CT"):
        prepare_slices(hu, (1.0, 1.0, 1.0), lungs[:, :4])
    with pytest.raises(InputError, match="spacing"):
        prepare_slices(hu, (0.0, 1.0, 1.0), lungs)
    with pytest.raises(InputError, match="non-empty"):
        prepare_slices(hu[0], (1.0, 1.0, 1.0), lungs[0])
    with pytest.raises(ValueError, match="orientation"):
        SliceConvention(orientation="ras")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window_hu"):
        SliceConvention(window_hu=(100.0, -100.0))
    prep = prepare_slices(hu, (1.0, 1.0, 1.0), lungs, SliceConvention(size=16))
    with pytest.raises(ValueError, match="do not match the prepared slices"):
        restore_volume(np.zeros((len(prep) + 1, 1, 16, 16), np.float32), prep)

    class TwoHeads(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [x, x]

    with pytest.raises(ValueError, match="deep supervision"):
        predict_slices(TwoHeads(), prep.images)


# ---------------------------------------------------------------------------------------- real data


def _modes(img8: np.ndarray) -> tuple[float, float]:
    """The dark (lung) and bright (soft tissue) histogram modes of an 8-bit slice (7-level smoothing)."""
    h = np.convolve(np.bincount(img8.ravel(), minlength=256), np.ones(7) / 7, "same")
    return float(np.argmax(h[:128])), float(128 + np.argmax(h[128:250]))


def _rough_lungs(hu: np.ndarray) -> np.ndarray:
    """Air below -400 HU not connected to the in-plane border, two largest 3D components (a test mask only)."""
    from scipy import ndimage

    air = hu < -400
    lab, _ = ndimage.label(air)
    border = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(),
                                       lab[:, :, -1].ravel()]))
    air &= ~np.isin(lab, border)
    lab, n = ndimage.label(air)
    sizes = ndimage.sum(air, lab, range(1, n + 1))
    keep = np.argsort(sizes)[::-1][:2] + 1
    return np.isin(lab, keep).astype(np.uint8)


@pytest.mark.skipif(not (LIDC.is_file() and MEDSEG.is_dir()), reason=f"real data not present under {SHARED}")
def test_real_ct_slices_have_the_training_slices_intensities() -> None:
    """LIDC-IDRI-0314 prepared with the default convention vs the 50 MedSeg slices: the median over slices of
    the lung-parenchyma mode and of the soft-tissue mode each within 15 levels (of 255) of the training
    slices' median, and the spine on the right of >= 80 % of the slices (as in the training slices)."""
    from PIL import Image

    from covidseg.io.image import read_image

    ct = read_image(LIDC)
    hu = ct.array[:, ::2, ::2]  # half the in-plane grid keeps the test fast; levels do not depend on it
    spacing = (ct.spacing[0], ct.spacing[1] * 2, ct.spacing[2] * 2)
    prep = prepare_slices(hu, spacing, _rough_lungs(hu))
    assert len(prep) > 40
    real = np.asarray([_modes(np.round(im[0] * 255).astype(np.uint8)) for im in prep.images])
    train = np.asarray([_modes(np.asarray(Image.open(p).convert("L"))) for p in sorted(MEDSEG.glob("*.jpg"))])
    diff = np.median(real, axis=0) - np.median(train, axis=0)
    assert np.all(np.abs(diff) <= 15), f"lung / soft-tissue modes differ by {diff} levels"
    size = prep.convention.size
    middle = prep.images[len(prep) // 4: 3 * len(prep) // 4, 0]
    spine_right = [_centroid(im[size // 3: 2 * size // 3] >= 0.99)[1] > size / 2 for im in middle]
    assert np.mean(spine_right) >= 0.8


def test_channels_last_inference_form_gives_the_plain_models_probabilities() -> None:
    """The shipped model in its inference form (batch norm folded, channels-last weights and slices) against the
    plain training module, with the mirror TTA: the same probabilities up to float rounding."""
    from covidseg.checkpoint import default_checkpoint
    from covidseg.inference.backends import load_model
    from covidseg.models.deploy import deploy_copy

    loaded = load_model(default_checkpoint(), "torch", device="cpu")
    images = np.random.default_rng(3).uniform(0, 1, (3, 1, 192, 192)).astype(np.float32)
    plain = predict_slices(loaded.module, images, batch_size=2, flips=((-1,),))
    fast = predict_slices(deploy_copy(loaded.module, channels_last=True), images, batch_size=2, flips=((-1,),),
                          channels_last=True)
    assert plain.std() > 1e-3  # a non-trivial answer
    np.testing.assert_allclose(fast, plain, atol=1e-4)
