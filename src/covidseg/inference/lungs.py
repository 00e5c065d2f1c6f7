"""Stage 1 of ``segment``: the lungs, classically (no weights) or with a trained lung model.

The classical extraction (:func:`find_lungs`, :func:`classical_lungs` for the labels alone) follows the usual
threshold pipeline (e.g. Hu, Hoffman & Reinhardt, IEEE TMI 2001; the "lungmask" pre-processing of Hofmanninger et
al., Eur Radiol Exp 2020), made to hold on real scans:

1. work on a grid of about ``cfg.work_spacing_mm`` (block means of the HU volume; values below
   ``cfg.padding_floor_hu``, the padding outside the field of view, count as air);
2. the body (:func:`~covidseg.inference.lung_air.body_mask`): tissue, opened in-plane so that the couch, the
   mattress's cover and blankets come off, its largest 3D component with the thin chest wall the opening erased
   put back, filled per axial slice. Air below
   ``cfg.air_threshold_hu`` inside it, per axial slice, is the candidate air: the couch's air is not inside;
3. the trachea and the main bronchi are removed (small midline air regions followed down from the top slice) and
   so is pure gas (below ``cfg.gas_hu``) pressed against the lung bases (stomach, colon);
4. a 3D opening cuts the partial-volume bridges; the 3D components larger than ``cfg.min_lung_volume_ml`` are
   the candidates, and those whose median is pure air (below ``cfg.gas_median_hu``: bowel or stomach gas, air in
   a couch) are not lung (:mod:`~covidseg.inference.lung_parts`); the one or two lungs are picked among the
   others, split by erosion when they touch; label 1 = patient's LEFT = higher column index of the canonical
   array, 2 = RIGHT;
5. per axial slice and per lung (:mod:`~covidseg.inference.lung_fill`): holes filled (vessels, nodules), a
   closing, and the concavities that open towards the chest wall filled (dense lesions against the pleura, which a
   threshold cuts out), within the slice's convex hull widened by the pixels with lung above and below them;
   then, in 3D, what a closing by a ball of ``cfg.wall_closing_mm`` adds on the chest wall's side (a lesion too
   large for its slices' concavities, or merged in them with the diaphragm's dome);
6. back to the full grid: nearest-neighbour upsampling, the outer border refined by the full-resolution air
   threshold;
7. what was found (:class:`LungResult`): per lung its volume and slices, whether the lungs reach the first or last
   slice (a chest cut at the base or the apex), warnings, and the reason when there is no lung.

With ``--lungs CKPT`` a trained lung model (target ``lung``, 2 sigmoid channels left/right) runs through
:func:`~covidseg.inference.sliding_window.predict_volume` instead (:func:`model_lungs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from covidseg.config import InferenceConfig, LungConfig, RuntimeConfig
from covidseg.inference.lung_air import basal_gas, body_mask, inside_air, remove_airways
from covidseg.inference.lung_fill import fill_lung_slices
from covidseg.inference.lung_grid import (
    SLICE_2D,
    Box,
    available_cores,
    bbox,
    binary_opening,
    block_mean,
    upsample_labels,
    work_factors,
)
from covidseg.inference.lung_parts import (
    LEFT,
    RIGHT,
    AirRegion,
    air_regions,
    extra_parts,
    name_sides,
    pick_lungs,
    regrow,
)

__all__ = [
    "LEFT",
    "RIGHT",
    "LungResult",
    "LungSide",
    "available_cores",
    "binary_opening",
    "block_mean",
    "classical_lungs",
    "find_lungs",
    "model_lungs",
    "upsample_labels",
    "work_factors",
]


@dataclass(frozen=True)
class LungSide:
    """One lung as found.

    Attributes:
        found: whether this lung is in the mask.
        volume_ml: its volume (mL; voxel count times voxel volume).
        slices: first and last canonical slice index holding it (inferior to superior), ``None`` when not found.
    """

    found: bool
    volume_ml: float
    slices: tuple[int, int] | None

    def summary(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"found": self.found, "volume_ml": round(self.volume_ml, 1),
                "slices": list(self.slices) if self.slices else None}


@dataclass(frozen=True)
class LungResult:
    """What the classical lung stage found.

    Attributes:
        labels: ``(D, H, W)`` uint8, 0 background, 1 left lung, 2 right lung.
        left: the left lung.
        right: the right lung.
        cut_at_apex: a lung has at least ``LungConfig.cut_min_area_mm2`` in the most superior slice: the scan
            stops inside the chest, the apices are missing.
        cut_at_base: the same in the most inferior slice: the lung bases are missing.
        reason: why no lung was found (``None`` when one was): one line, without the file's name.
        warnings: what the report should say about the lungs (one line each).
        gas_ml: volumes (mL) of the air regions of a lung's size that were not lung (pure gas: bowel, stomach).
    """

    labels: np.ndarray
    left: LungSide
    right: LungSide
    cut_at_apex: bool = False
    cut_at_base: bool = False
    reason: str | None = None
    warnings: tuple[str, ...] = ()
    gas_ml: tuple[float, ...] = ()

    @property
    def found(self) -> bool:
        """Whether at least one lung was found."""
        return self.left.found or self.right.found

    @property
    def partial(self) -> bool:
        """The lungs are only partly in the field of view (cut at the apex or the base), or only one was found."""
        return self.found and (self.cut_at_apex or self.cut_at_base or not (self.left.found and self.right.found))

    def summary(self) -> dict[str, Any]:
        """JSON-ready form for ``report.json`` (everything but the labels)."""
        return {"found": self.found, "partial": self.partial, "left": self.left.summary(),
                "right": self.right.summary(), "cut_at_apex": self.cut_at_apex, "cut_at_base": self.cut_at_base,
                "reason": self.reason, "warnings": list(self.warnings),
                "gas_regions_ml": [round(v, 1) for v in self.gas_ml]}


# ------------------------------------------------------------------------------------------------ main


def classical_lungs(hu: np.ndarray, spacing: Sequence[float], cfg: LungConfig | None = None) -> np.ndarray:
    """Weight-free lung mask of a CT in HU (the labels of :func:`find_lungs`).

    Args:
        hu: canonical ``(D, H, W)`` CT in Hounsfield units.
        spacing: ``(D, H, W)`` voxel size in mm.
        cfg: thresholds and sizes.

    Returns:
        ``(D, H, W)`` uint8: 0 background, 1 left lung (higher column index), 2 right lung. All zeros when no
        lung is found (:func:`find_lungs` says why).
    """
    return find_lungs(hu, spacing, cfg).labels


def find_lungs(hu: np.ndarray, spacing: Sequence[float], cfg: LungConfig | None = None) -> LungResult:
    """Weight-free lungs of a CT in HU, with what was found (module docstring: the steps).

    Args:
        hu: canonical ``(D, H, W)`` CT in Hounsfield units (not modified).
        spacing: ``(D, H, W)`` voxel size in mm.
        cfg: thresholds and sizes.

    Returns:
        The labels (``(D, H, W)`` uint8: 1 left, 2 right), per lung its volume and slices, whether the chest is cut
        at the apex or the base, and the reason when no lung was found (then the labels are all zeros).
    """
    cfg = cfg or LungConfig()
    if hu.ndim != 3:
        raise ValueError(f"find_lungs: expected a (D, H, W) volume, got shape {hu.shape}")
    work = _work_grid(hu, spacing, cfg)
    if work is None:
        return _no_lungs(hu.shape, f"no body in the image (no tissue denser than {cfg.body_threshold_hu:g} HU)")
    small, body, work_spacing = work.small, work.body, work.spacing
    voxel_ml = float(np.prod(work_spacing)) / 1000.0
    air = inside_air(small, body, cfg.air_threshold_hu)
    air &= ~remove_airways(air, small, work_spacing, cfg)
    if cfg.remove_basal_gas:
        air &= ~basal_gas(small, air, voxel_ml, cfg)
    body_cols = np.flatnonzero(body.any(axis=(0, 1)))
    midline = 0.5 * (body_cols[0] + body_cols[-1])
    # an opening breaks the thin bridges partial volume makes through the diaphragm (stomach gas) and the
    # bronchial walls; the bridges' voxels go back to the lung they touch afterwards
    opened = binary_opening(air, iterations=cfg.opening_voxels) if cfg.opening_voxels > 0 else air
    regions = air_regions(opened, small, voxel_ml, cfg)
    large = [r for r in regions if r.volume_ml >= cfg.min_lung_volume_ml]
    gas = tuple(r.volume_ml for r in large if not r.lung_like)
    lung_like = [r.mask for r in large if r.lung_like]
    if not lung_like:
        return _no_lungs(hu.shape, _no_lung_reason(large, cfg), gas)
    parts = pick_lungs(lung_like, max(int(cfg.min_lung_volume_ml / voxel_ml), 1), midline, cfg)
    named = _with_parts(name_sides(parts, midline), extra_parts(regions, parts, work_spacing, cfg), midline)
    if cfg.opening_voxels > 0:
        grown = regrow([m for m, _ in named], air, cfg.opening_voxels)
        named = [(g, label) for g, (_, label) in zip(grown, named, strict=True)]
    labels = _fill_lungs(named, small.shape, work_spacing, cfg)
    out = np.zeros(hu.shape, dtype=np.uint8)
    out[work.box] = _refine_border(labels, air, hu[work.box], work.factors, cfg)
    return describe_lungs(out, spacing, cfg, gas, work.box)


@dataclass(frozen=True)
class _WorkGrid:
    """The body's box on the work grid: ``small`` (HU block means), ``body`` (bool), ``spacing`` (mm),
    ``factors`` (block sizes) and ``box`` (the box on the full grid, its start a multiple of the factors)."""

    small: np.ndarray
    body: np.ndarray
    spacing: tuple[float, float, float]
    factors: tuple[int, int, int]
    box: Box


def _work_grid(hu: np.ndarray, spacing: Sequence[float], cfg: LungConfig) -> _WorkGrid | None:
    """The body (:func:`~covidseg.inference.lung_air.body_mask`), then the work grid of its box only: the air
    around the patient, the couch and the padding never reach the later steps. ``None`` without a body."""
    coarse, step = body_mask(hu, spacing, cfg)
    coarse_box = bbox(coarse, (0, 2, 2))
    if coarse_box is None:
        return None
    factors = work_factors(spacing, cfg.work_spacing_mm)
    box = [slice(0, hu.shape[0])]
    for axis in (1, 2):
        f, cb = factors[axis], coarse_box[axis]
        start = (cb.start * step) // f * f
        box.append(slice(start, min(cb.stop * step, hu.shape[axis])))
    crop = hu[box[0], box[1], box[2]]
    floor = cfg.padding_floor_hu if float(crop.min()) < cfg.padding_floor_hu else None
    small = block_mean(crop, factors, floor=floor)
    # the body at each work voxel's centre (nearest coarse pixel)
    idx = [np.minimum((b.start + np.arange(n) * f + f // 2) // step, c - 1)
           for b, n, f, c in zip(box[1:], small.shape[1:], factors[1:], coarse.shape[1:], strict=True)]
    z = np.minimum(np.arange(small.shape[0]) * factors[0] + factors[0] // 2, hu.shape[0] - 1)
    body = coarse[z[:, None, None], idx[0][None, :, None], idx[1][None, None, :]]
    work_spacing = (float(spacing[0]) * factors[0], float(spacing[1]) * factors[1], float(spacing[2]) * factors[2])
    return _WorkGrid(small, body, work_spacing, factors, (box[0], box[1], box[2]))


def _with_parts(named: list[tuple[np.ndarray, int]], parts: list[AirRegion], midline: float
                    ) -> list[tuple[np.ndarray, int]]:
    """Each piece of lung (:func:`~covidseg.inference.lung_parts.extra_parts`) joined to the lung on its side of the
    body's midline, or that side's lung when none was found there (a crop through the apex of a lung smaller than
    ``min_lung_volume_ml``)."""
    out = {label: mask.copy() for mask, label in named}
    for part in parts:
        mask = part.mask
        side = LEFT if float(np.flatnonzero(mask.any(axis=(0, 1))).mean()) > midline else RIGHT
        if side in out:
            out[side] |= mask
        else:
            out[side] = mask
    return [(mask, label) for label, mask in out.items()]


def _fill_lungs(named: list[tuple[np.ndarray, int]], shape: tuple[int, ...], spacing: Sequence[float],
                cfg: LungConfig) -> np.ndarray:
    """Labels of the filled lungs (:func:`~covidseg.inference.lung_fill.fill_lung_slices`) on the work grid.

    The two lungs are filled side by side: scipy.ndimage releases the GIL, so two cores do it in about half the
    time; where the filled lungs overlap, the first keeps the voxel."""
    def fill(item: tuple[np.ndarray, int]) -> np.ndarray:
        part, label = item
        return fill_lung_slices(part, spacing, cfg, -1 if label == LEFT else 1)

    with ThreadPoolExecutor(max_workers=min(len(named), available_cores())) as pool:
        filled_parts = list(pool.map(fill, named))
    labels = np.zeros(shape, dtype=np.uint8)
    for filled, (_, label) in zip(filled_parts, named, strict=True):
        labels[filled & (labels == 0)] = label
    return labels


def _no_lung_reason(regions: list[AirRegion], cfg: LungConfig) -> str:
    if not regions:
        return (f"no lung in the field of view: no air region of at least {cfg.min_lung_volume_ml:g} mL inside the "
                "body (a scan of another body region, or only a sliver of lung)")
    sizes = ", ".join(f"{r.volume_ml:.0f} mL at {r.median_hu:.0f} HU" for r in regions[:3])
    return (f"no lung in the field of view: the air regions of a lung's size inside the body ({sizes}) are pure gas "
            f"(median below {cfg.gas_median_hu:g} HU; lung is about -850 HU): bowel or stomach gas, not lung")


def _no_lungs(shape: tuple[int, ...], reason: str, gas: tuple[float, ...] = ()) -> LungResult:
    none = LungSide(False, 0.0, None)
    return LungResult(np.zeros(shape, dtype=np.uint8), none, none, reason=reason, gas_ml=gas)


def describe_lungs(labels: np.ndarray, spacing: Sequence[float], cfg: LungConfig, gas: tuple[float, ...] = (),
                   box: Box | None = None) -> LungResult:
    """:class:`LungResult` of a lung label volume: volumes, slices, whether the chest is cut, warnings.

    Args:
        labels: ``(D, H, W)`` uint8, 1 left, 2 right.
        spacing: ``(D, H, W)`` mm.
        cfg: ``cut_min_area_mm2`` and ``min_full_lungs_ml``.
        gas: volumes (mL) of the air regions of a lung's size found to be gas.
        box: a box spanning all slices outside which ``labels`` is 0 (counts only there: faster).
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pixel_mm2 = float(spacing[1]) * float(spacing[2])
    inside = labels if box is None else labels[:, box[1], box[2]]
    counts = np.stack([np.zeros(labels.shape[0], dtype=np.int64)]
                      + [np.count_nonzero(inside == k, axis=(1, 2)) for k in (LEFT, RIGHT)], axis=1)  # (D, 3)
    sides = {}
    for label in (LEFT, RIGHT):
        z = np.flatnonzero(counts[:, label])
        sides[label] = LungSide(bool(z.size), float(counts[:, label].sum()) * voxel_ml,
                                (int(z[0]), int(z[-1])) if z.size else None)
    if not (sides[LEFT].found or sides[RIGHT].found):
        return _no_lungs(labels.shape, "no lung found", gas)
    lung_area = (counts[:, LEFT] + counts[:, RIGHT]) * pixel_mm2
    apex, base = bool(lung_area[-1] >= cfg.cut_min_area_mm2), bool(lung_area[0] >= cfg.cut_min_area_mm2)
    warnings = []
    if apex or base:
        where = "at the apex and the base" if apex and base else "at the apex" if apex else "at the base"
        warnings.append(f"the lungs reach the edge of the scan: the chest is cut {where}; the lung volumes are those "
                        "of the part in the field of view")
    total = sides[LEFT].volume_ml + sides[RIGHT].volume_ml
    if total < cfg.min_full_lungs_ml:
        warnings.append(f"only {total:.0f} mL of lung found (both lungs of an adult hold several litres): a part of "
                        "the chest or a sliver of lung, not a chest CT's lungs")
    for label, name in ((LEFT, "left"), (RIGHT, "right")):
        if not sides[label].found:
            warnings.append(f"no {name} lung found")
    return LungResult(labels, sides[LEFT], sides[RIGHT], apex, base, None, tuple(warnings), gas)


def _refine_border(small_labels: np.ndarray, small_air: np.ndarray, hu: np.ndarray, factors: Sequence[int],
                   cfg: LungConfig) -> np.ndarray:
    """Full-resolution labels: each lung's coarse interior as it is; within one work voxel of its border, the
    full-resolution air voxels plus the coarse voxels that were filled (dense lesions or vessels, not air).
    Works inside the lungs' box only."""
    out = np.zeros(hu.shape, dtype=np.uint8)
    if all(f == 1 for f in factors):
        return small_labels
    box = bbox(small_labels > 0, margin=(1, 1, 1))
    if box is None:
        return out
    labels, air = small_labels[box], small_air[box]
    keep = np.zeros_like(labels)
    ring_labels = np.zeros_like(labels)
    for label in (LEFT, RIGHT):
        m = labels == label
        if not m.any():
            continue
        inner = ndimage.binary_erosion(m, structure=SLICE_2D)
        ring = ndimage.binary_dilation(m, structure=SLICE_2D) & ~inner
        dense = m & ~air & ring  # filled on the coarse grid: keep whole
        keep[(inner | dense) & (keep == 0)] = label
        ring_labels[ring & ~dense & (ring_labels == 0)] = label
    fine_box = tuple(slice(b.start * f, min(b.stop * f, n)) for b, f, n in zip(box, factors, hu.shape, strict=True))
    fine_shape = tuple(s.stop - s.start for s in fine_box)
    fine = upsample_labels(keep, factors, fine_shape)
    border = upsample_labels(ring_labels, factors, fine_shape)
    border[hu[fine_box] >= cfg.border_threshold_hu] = 0
    out[fine_box] = np.where(fine > 0, fine, border)
    return out


def model_lungs(model: object, normalized: np.ndarray, cfg: InferenceConfig, device: str | None = None,
                runtime: RuntimeConfig | None = None) -> np.ndarray:
    """Lung labels from a trained lung model (target ``lung``: sigmoid channels left, right).

    Args:
        model: a covidseg model with 2 output channels.
        normalized: ``(D, H, W)`` CT normalised to [0, 1] (the model's training input, not "lung only").
        cfg: sliding-window settings; ``cfg.threshold`` decides each channel.
        device: overrides ``runtime.device``.
        runtime: device, bfloat16, threads (default :class:`~covidseg.config.RuntimeConfig`).

    Returns:
        ``(D, H, W)`` uint8: 1 left, 2 right; a voxel above threshold in both gets the more probable side.
    """
    from covidseg.errors import InputError
    from covidseg.inference.sliding_window import predict_volume

    k = int(getattr(getattr(model, "config", None), "out_channels", 0))
    if k != 2:
        raise InputError(
            f"--lungs: the checkpoint's model has {k} output channel(s); a lung model (trained with "
            "--set train.target=lung) has 2 (left, right); give such a checkpoint or use --lungs classic"
        )
    prob = predict_volume(model, normalized, cfg, device=device, runtime=runtime)  # type: ignore[arg-type]
    out = np.zeros(normalized.shape, dtype=np.uint8)
    above = prob >= cfg.threshold
    out[above[0] & (~above[1] | (prob[0] >= prob[1]))] = LEFT
    out[above[1] & (~above[0] | (prob[1] > prob[0]))] = RIGHT
    return out
