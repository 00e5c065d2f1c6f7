"""A real CT as the 2D infection model's training slices: window, orientation, crop, slice stride.

The 2D infection model is trained on the 8-bit slices of COVID-SemiSeg (Fan et al., "Inf-Net", IEEE TMI 39(8),
2020): 50 MedSeg slices with expert masks and 1,600 slices of the 20 Zenodo cases (Ma et al., Zenodo 3757476)
with pseudo labels. Its input is such a slice / 255, resized to a square of side ``size``. To run it on a CT in
Hounsfield units, every axial slice goes through the same steps as the training slices did; the conventions
below were measured on the training slices (``benchmarks/semiseg_convention.py``, written down in
``docs/slices.md``):

- **window** (:data:`WINDOW_HU`): HU -> 8-bit is linear with clipping. A least-squares line through the 8-bit
  levels of air (-1000 HU), fat (-100 HU) and muscle / blood (+40 HU) of every slice gives [-1120, 236] HU for
  the 50 MedSeg slices (95 % interval of the ends: [-1146, -1100] and [217, 259]), [-1248, 155] for the
  radiopaedia cases (stored pre-windowed) and [-1047, 1768] for the coronacases (each slice min-max scaled from
  HU, so its top follows the slice's brightest voxel). The MedSeg window is used: it is the window of the
  expert-labelled slices and of their test split, and the radiopaedia slices are close to it.
- **orientation** (:data:`ORIENTATION`): the slices are NIfTI arrays' ``[:, :, k]`` written as images, so their
  rows run along the volume's first voxel axis (patient right -> left: the lungs lie top and bottom) and their
  columns along the second. MedSeg and radiopaedia volumes are stored L, P, S (the spine on the image's right),
  the coronacases L, A, S (spine on the left). On a canonical ``(H, W)`` slice (rows anterior -> posterior,
  columns right -> left) "lps" is the transpose.
- **crop** (:data:`CROP_MARGIN_FRACTION`, :data:`MIN_BOX_FRACTION`): each slice is cut to its own lungs'
  bounding box; on the Zenodo slices the aerated lung ends about 3 % of its extent inside the image edges
  (mean of the four sides; 0 on MedSeg's). No training slice holds a small lung tip: the smallest box of a
  Zenodo case is 0.68-0.88 (right-left) and 0.55-0.74 (anterior-posterior) of its largest, so smaller boxes
  are grown to 0.7 of the volume's largest around their centre (the model sees a lung tip at a scale it was
  trained on).
- **stride** (:data:`MIN_SLICE_SPACING_MM`): thin-slice CTs are processed every ``k``-th slice, so that the
  processed slices are at least that far apart; the probabilities of the slices in between are interpolated
  linearly (:func:`restore_volume`).

:func:`prepare_slices` turns ``(HU volume, spacing, lung labels)`` into the network input and the boxes that map
it back; :func:`predict_slices` runs any 2D torch module on it; :func:`restore_volume` builds the probability
volume on the CT grid; :func:`infection_probabilities` chains the three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from covidseg.config import flip_tta_dims
from covidseg.errors import InputError

Orientation = Literal["lps", "las"]
"""How a canonical slice is laid out as a training image: the voxel order of the NIfTI it was written from."""
ORIENTATIONS: tuple[str, ...] = ("lps", "las")

WINDOW_HU: tuple[float, float] = (-1120.0, 235.0)
"""HU mapped onto 8-bit 0 and 255 (clipped outside): the least-squares fit of the MedSeg slices' air, fat and
soft-tissue levels, [-1120, 236] HU (``docs/results/semiseg_convention.json``, ``sources.medseg.fit``)."""
ORIENTATION: Orientation = "lps"
"""Rows patient right -> left, columns anterior -> posterior (MedSeg and radiopaedia; coronacases are "las")."""
CROP_MARGIN_FRACTION = 0.03
"""Margin added on each side of a slice's lung box, as a fraction of the box's extent along that axis (the
Zenodo slices' gap between the aerated lung and the image edge: 2.7 % coronacases, 3.4 % radiopaedia)."""
MIN_BOX_FRACTION = 0.7
"""A slice's box is grown (about its centre) to at least this fraction of the volume's largest lung box."""
MIN_SLICE_SPACING_MM = 2.5
"""Processed slices are at least this far apart (mm); those in between are interpolated. 1 mm slices -> every
3rd (a third of the model's time); 2-3 mm slices -> every one or every 2nd."""
TRAIN_SIZE = 256
"""Default side (px) of the square network input: the shipped model's (a checkpoint's ``input_size`` wins)."""
INTENSITY_LEVELS = 255.0
"""The training slices are 8-bit: the windowed slice is rounded to 1/255 steps."""


@dataclass(frozen=True)
class SliceConvention:
    """Everything that decides how a CT becomes network input; the defaults are the measured convention.

    Attributes:
        size: side of the square network input (px).
        window_hu: ``(low, high)`` HU mapped onto 0 and 1.
        orientation: "lps" (MedSeg, radiopaedia) or "las" (coronacases).
        margin_fraction: margin added to each side of a lung box, fraction of its extent.
        min_box_fraction: smallest box, as a fraction of the volume's largest lung box, per axis.
        min_slice_spacing_mm: processed slices are at least this far apart (mm); 0 processes every slice.
        quantize: round the windowed slice to 8-bit steps, as the training slices are.
    """

    size: int = TRAIN_SIZE
    window_hu: tuple[float, float] = WINDOW_HU
    orientation: Orientation = ORIENTATION
    margin_fraction: float = CROP_MARGIN_FRACTION
    min_box_fraction: float = MIN_BOX_FRACTION
    min_slice_spacing_mm: float = MIN_SLICE_SPACING_MM
    quantize: bool = True

    def __post_init__(self) -> None:
        lo, hi = self.window_hu
        problems = []
        if self.size < 8:
            problems.append(f"size {self.size} px (use >= 8)")
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            problems.append(f"window_hu {self.window_hu} (need low < high, finite)")
        if self.orientation not in ORIENTATIONS:
            problems.append(f"orientation {self.orientation!r} (use one of {', '.join(ORIENTATIONS)})")
        if not 0.0 <= self.margin_fraction <= 0.5:
            problems.append(f"margin_fraction {self.margin_fraction} (use 0..0.5)")
        if not 0.0 <= self.min_box_fraction <= 1.0:
            problems.append(f"min_box_fraction {self.min_box_fraction} (use 0..1)")
        if not (math.isfinite(self.min_slice_spacing_mm) and self.min_slice_spacing_mm >= 0.0):
            problems.append(f"min_slice_spacing_mm {self.min_slice_spacing_mm} (use >= 0)")
        if problems:
            raise ValueError("SliceConvention: bad " + "; ".join(problems))


@dataclass(frozen=True)
class SliceBox:
    """Where one network input came from.

    Attributes:
        index: the axial slice (index along D of the canonical volume).
        rows: ``(start, stop)`` of the box along H (anterior -> posterior), half-open, in voxels.
        cols: ``(start, stop)`` of the box along W (patient right -> left), half-open, in voxels.
    """

    index: int
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the box in voxels (canonical orientation)."""
        return (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])


@dataclass
class PreparedSlices:
    """Network input for the chosen slices of one CT, and what maps it back.

    Attributes:
        images: ``(N, 1, S, S)`` float32 in [0, 1], ``S = convention.size``.
        boxes: one :class:`SliceBox` per input, in increasing slice order.
        shape: ``(D, H, W)`` of the CT grid.
        convention: the settings used.
    """

    images: np.ndarray
    boxes: tuple[SliceBox, ...]
    shape: tuple[int, int, int]
    convention: SliceConvention = field(default_factory=SliceConvention)

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def indices(self) -> list[int]:
        """The processed slice indices (along D)."""
        return [b.index for b in self.boxes]


# ------------------------------------------------------------------------------------- the conventions


def window(hu: np.ndarray, window_hu: tuple[float, float] = WINDOW_HU, quantize: bool = True) -> np.ndarray:
    """HU -> [0, 1] (float32): linear over ``window_hu``, clipped outside, optionally in 8-bit steps.

    Args:
        hu: any array in Hounsfield units.
        window_hu: ``(low, high)`` HU mapped onto 0 and 1.
        quantize: round to multiples of 1/255 (the training slices are 8-bit).
    """
    lo, hi = window_hu
    unit = np.clip((np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
    if quantize:
        unit = np.round(unit * INTENSITY_LEVELS) / np.float32(INTENSITY_LEVELS)
    return unit.astype(np.float32, copy=False)


def to_model_orientation(image: np.ndarray, orientation: Orientation = ORIENTATION) -> np.ndarray:
    """Canonical ``(..., H, W)`` (rows anterior -> posterior, columns right -> left) -> training layout.

    "lps": rows right -> left, columns anterior -> posterior (a transpose); "las": the same with the columns
    posterior -> anterior. Returns a view.
    """
    out = np.swapaxes(image, -1, -2)  # (..., W, H): rows right -> left, columns anterior -> posterior
    return out[..., ::-1] if orientation == "las" else out


def from_model_orientation(image: np.ndarray, orientation: Orientation = ORIENTATION) -> np.ndarray:
    """Inverse of :func:`to_model_orientation`: training layout ``(..., W, H)`` -> canonical ``(..., H, W)``."""
    if orientation == "las":
        image = image[..., ::-1]
    return np.swapaxes(image, -1, -2)


def slice_stride(spacing_d_mm: float, min_slice_spacing_mm: float = MIN_SLICE_SPACING_MM) -> int:
    """Smallest whole step (slices) whose spacing is at least ``min_slice_spacing_mm``; at least 1."""
    if not (math.isfinite(spacing_d_mm) and spacing_d_mm > 0):
        raise InputError(f"slice spacing {spacing_d_mm} mm: expected a positive number; check the image header")
    return max(1, math.ceil(min_slice_spacing_mm / spacing_d_mm - 1e-6))


def choose_slices(first: int, last: int, stride: int) -> list[int]:
    """Evenly spaced slice indices from ``first`` to ``last`` (both kept), every gap at least ``stride``.

    The gaps are ``floor(g)`` or ``ceil(g)`` with ``g = (last - first) / floor((last - first) / stride) >=
    stride``, so no two processed slices are closer than ``stride`` and none is ``2 * stride`` or more apart.
    A span shorter than one stride keeps both ends (closer than ``stride``: the only exception), so that every
    slice in between can be interpolated.
    """
    if last < first:
        return []
    steps = (last - first) // stride
    if steps == 0:
        return [first] if last == first else [first, last]
    return [first + round(i * (last - first) / steps) for i in range(steps + 1)]


def _grow(start: int, stop: int, length: int, limit: int) -> tuple[int, int]:
    """Widen ``[start, stop)`` to ``length`` about its centre, shifted to stay within ``[0, limit)``."""
    length = min(max(length, stop - start), limit)
    start = (start + stop - length) // 2
    start = min(max(start, 0), limit - length)
    return start, start + length


def lung_boxes(lungs: np.ndarray, indices: Sequence[int], convention: SliceConvention) -> list[SliceBox]:
    """One crop box per slice in ``indices``: its lungs' box plus the margin, grown to the minimum size.

    The margin is ``margin_fraction`` of the lungs' extent on each side (clipped to the image); a box smaller
    than ``min_box_fraction`` of the largest such box (per axis) is widened about its centre to that size.

    Args:
        lungs: ``(D, H, W)`` lung labels (any non-zero voxel is lung).
        indices: slices that hold lung.
        convention: ``margin_fraction`` and ``min_box_fraction``.
    """
    if len(indices) == 0:
        return []
    _, h, w = lungs.shape
    any_rows = np.asarray(lungs.any(axis=2))  # (D, H)
    any_cols = np.asarray(lungs.any(axis=1))  # (D, W)
    margined = []
    for k in indices:
        r = np.flatnonzero(any_rows[k])
        c = np.flatnonzero(any_cols[k])
        if r.size == 0:
            raise ValueError(f"slice {k} holds no lung voxel; give only slices with lung")
        mr = round(convention.margin_fraction * (r[-1] + 1 - r[0]))
        mc = round(convention.margin_fraction * (c[-1] + 1 - c[0]))
        margined.append((int(k), max(int(r[0]) - mr, 0), min(int(r[-1]) + 1 + mr, h),
                         max(int(c[0]) - mc, 0), min(int(c[-1]) + 1 + mc, w)))
    min_rows = math.ceil(convention.min_box_fraction * max(r1 - r0 for _, r0, r1, _, _ in margined))
    min_cols = math.ceil(convention.min_box_fraction * max(c1 - c0 for _, _, _, c0, c1 in margined))
    boxes = [SliceBox(index=k, rows=_grow(r0, r1, min_rows, h), cols=_grow(c0, c1, min_cols, w))
             for k, r0, r1, c0, c1 in margined]
    return boxes


# ---------------------------------------------------------------------------------- volume <-> slices


def _check_volume(hu: np.ndarray, spacing: Sequence[float], lungs: np.ndarray) -> None:
    if hu.ndim != 3 or hu.size == 0:
        raise InputError(f"CT array of shape {hu.shape}: expected a non-empty (D, H, W) volume")
    if lungs.shape != hu.shape:
        raise InputError(f"lung labels of shape {lungs.shape} do not match the CT {hu.shape}; give the lung mask "
                         "of this CT, on its canonical grid")
    if len(spacing) != 3 or not all(math.isfinite(float(s)) and float(s) > 0 for s in spacing):
        raise InputError(f"spacing {tuple(spacing)}: expected three positive numbers (D, H, W) in mm")


def _resize(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear ``(N, C, h, w)`` -> ``(N, C, *size)``, ``align_corners=False`` as the training resize."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False)


def prepare_slices(hu: np.ndarray, spacing: Sequence[float], lungs: np.ndarray,
                   convention: SliceConvention | None = None) -> PreparedSlices:
    """The network input for the lung slices of a CT, as the training slices were made.

    Per chosen slice: window (:func:`window`), crop to the slice's box (:func:`lung_boxes`), lay out as the
    training slices (:func:`to_model_orientation`), resize to ``size x size`` (bilinear, as training).
    Slices are chosen from the first to the last slice with lung, at least ``min_slice_spacing_mm`` apart
    (:func:`slice_stride`, :func:`choose_slices`); a chosen slice without lung is replaced by its nearest
    slice with lung.

    Args:
        hu: ``(D, H, W)`` canonical CT in Hounsfield units.
        spacing: ``(D, H, W)`` voxel size in mm.
        lungs: ``(D, H, W)`` lung labels (1 left, 2 right; any non-zero voxel counts as lung).
        convention: the settings; :class:`SliceConvention` defaults when ``None``.

    Returns:
        :class:`PreparedSlices`; with no lung voxel at all it holds zero slices (``images`` ``(0, 1, S, S)``).

    Raises:
        InputError: a volume that is not 3D, lungs of another shape, a non-positive spacing.
    """
    cfg = convention or SliceConvention()
    hu = np.asarray(hu)
    lungs = np.asarray(lungs)
    _check_volume(hu, spacing, lungs)
    shape = (int(hu.shape[0]), int(hu.shape[1]), int(hu.shape[2]))
    with_lung = np.flatnonzero(lungs.any(axis=(1, 2)))
    if with_lung.size == 0:
        return PreparedSlices(np.zeros((0, 1, cfg.size, cfg.size), np.float32), (), shape, cfg)
    stride = slice_stride(float(spacing[0]), cfg.min_slice_spacing_mm)
    wanted = choose_slices(int(with_lung[0]), int(with_lung[-1]), stride)
    nearest = with_lung[np.abs(with_lung[None, :] - np.asarray(wanted)[:, None]).argmin(axis=1)]
    indices = sorted({int(k) for k in nearest})
    boxes = lung_boxes(lungs, indices, cfg)
    images = np.empty((len(boxes), 1, cfg.size, cfg.size), np.float32)
    for i, b in enumerate(boxes):
        crop = window(hu[b.index, b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]], cfg.window_hu, cfg.quantize)
        laid = np.ascontiguousarray(to_model_orientation(crop, cfg.orientation))  # (W_box, H_box)
        images[i, 0] = _resize(torch.from_numpy(laid)[None, None], (cfg.size, cfg.size))[0, 0].numpy()
    return PreparedSlices(images, tuple(boxes), shape, cfg)


def interpolate_gaps(volume: np.ndarray, boxes: Sequence[SliceBox]) -> None:
    """Fill the slices between consecutive processed ones by linear interpolation, in place.

    Args:
        volume: ``(D, H, W)`` float32 holding the processed slices (zero elsewhere).
        boxes: the processed slices in increasing index order; a slice ``j`` between ``a`` and ``b`` becomes
            ``(1 - t) * volume[a] + t * volume[b]``, ``t = (j - a) / (b - a)``, within the union of their boxes.
    """
    for a, b in zip(boxes[:-1], boxes[1:], strict=True):
        gap = b.index - a.index
        if gap <= 1:
            continue
        rows = slice(min(a.rows[0], b.rows[0]), max(a.rows[1], b.rows[1]))
        cols = slice(min(a.cols[0], b.cols[0]), max(a.cols[1], b.cols[1]))
        lo, hi = volume[a.index, rows, cols], volume[b.index, rows, cols]
        t = (np.arange(1, gap, dtype=np.float32) / np.float32(gap))[:, None, None]  # (gap - 1, 1, 1)
        volume[a.index + 1:b.index, rows, cols] = lo + t * (hi - lo)


def restore_volume(probs: np.ndarray | torch.Tensor, prepared: PreparedSlices) -> np.ndarray:
    """Network output -> float32 probability volume on the CT grid.

    Each ``S x S`` map is laid back into canonical orientation, resized bilinearly to its box and written there;
    the slices between two processed slices get the linear interpolation of the two; everything else is 0.

    Args:
        probs: ``(N, 1, S, S)`` probabilities in [0, 1], one per prepared slice, in the same order.
        prepared: what :func:`prepare_slices` returned for this CT.

    Returns:
        ``(D, H, W)`` float32 in [0, 1].

    Raises:
        ValueError: ``probs`` of another shape than ``prepared.images``.
    """
    p = probs.detach().float().cpu() if isinstance(probs, torch.Tensor) else torch.from_numpy(
        np.ascontiguousarray(probs, dtype=np.float32))
    if tuple(p.shape) != tuple(prepared.images.shape):
        raise ValueError(f"probabilities of shape {tuple(p.shape)} do not match the prepared slices "
                         f"{tuple(prepared.images.shape)} (N, 1, S, S)")
    p = p.clamp(0.0, 1.0)  # bilinear resizes and linear interpolation stay within [0, 1]
    volume = np.zeros(prepared.shape, np.float32)
    orient = prepared.convention.orientation
    for i, b in enumerate(prepared.boxes):
        h, w = b.shape
        laid = _resize(p[i:i + 1], (w, h))[0, 0].numpy()  # (W_box, H_box): the training layout of the box
        volume[b.index, b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = from_model_orientation(laid, orient)
    interpolate_gaps(volume, prepared.boxes)
    return volume


# ----------------------------------------------------------------------------------------------- model


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.shape != (x.shape[0], 1, *x.shape[2:]):
        what = type(out).__name__ if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
        raise ValueError(f"the model returned {what} for input {tuple(x.shape)}; expected one logit tensor "
                         f"(B, 1, H, W): turn deep supervision off (model.set_deep_supervision(False))")
    return out


def predict_slices(model: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 16,
                   flip_tta: str | bool = "off", device: str | torch.device = "cpu",
                   flips: Sequence[tuple[int, ...]] | None = None, channels_last: bool = False) -> np.ndarray:
    """Sigmoid probabilities of a 2D one-channel model over prepared slices, batch by batch.

    Args:
        model: any torch module mapping ``(B, 1, S, S)`` to ``(B, 1, S, S)`` logits; put into ``eval()``.
        images: ``(N, 1, S, S)`` float32 in [0, 1] (:attr:`PreparedSlices.images`).
        batch_size: slices per forward pass.
        flip_tta: average the logits of mirrored copies in (:func:`covidseg.config.flip_tta_dims`: ``lr`` the
            left-right mirror, ``all`` every mirroring of both axes, 4 forward passes; ``True`` = ``lr``).
        device: where the model runs; it is moved there.
        flips: the flipped copies to average with the slice itself, as tensor dims (``((-1,),)``: the mirror
            along the last axis); replaces ``flip_tta`` when given.
        channels_last: feed the batches in ``torch.channels_last`` memory format (for a model whose weights are
            channels-last, :func:`covidseg.models.deploy.deploy_copy`; faster on the CPU).

    Returns:
        ``(N, 1, S, S)`` float32 probabilities.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: use >= 1")
    x_all = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if x_all.ndim != 4 or x_all.shape[1] != 1:
        raise ValueError(f"images of shape {tuple(x_all.shape)}: expected (N, 1, S, S)")
    out = np.zeros(tuple(x_all.shape), np.float32)
    if x_all.shape[0] == 0:
        return out
    dev = torch.device(device)
    model = model.to(dev).eval()
    extra = list(flips) if flips is not None else list(flip_tta_dims(flip_tta))
    passes: list[tuple[int, ...]] = [(), *extra]
    with torch.inference_mode():
        for start in range(0, x_all.shape[0], batch_size):
            x = x_all[start:start + batch_size].to(dev, torch.float32)  # (b, 1, S, S)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            acc = torch.zeros_like(x)
            for dims in passes:  # the mean of the logits, as the cross-validation scored the model
                xi = torch.flip(x, dims) if dims else x
                logit = _logits(model, xi).float()
                acc += torch.flip(logit, dims) if dims else logit
            out[start:start + x.shape[0]] = torch.sigmoid(acc / len(passes)).cpu().numpy()
    return out


def infection_probabilities(model: torch.nn.Module, hu: np.ndarray, spacing: Sequence[float], lungs: np.ndarray,
                            convention: SliceConvention | None = None, batch_size: int = 16,
                            flip_tta: str | bool = "off", device: str | torch.device = "cpu") -> np.ndarray:
    """``(D, H, W)`` float32 infection probabilities of a CT from a 2D slice model (0 outside the lungs' boxes).

    :func:`prepare_slices` -> :func:`predict_slices` -> :func:`restore_volume`; see them for the arguments.
    """
    prepared = prepare_slices(hu, spacing, lungs, convention)
    probs = predict_slices(model, prepared.images, batch_size=batch_size, flip_tta=flip_tta, device=device)
    return restore_volume(probs, prepared)
