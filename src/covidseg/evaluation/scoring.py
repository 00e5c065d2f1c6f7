"""Scoring a prediction against a reference, label by label, with :func:`covidseg.metrics.binary_metrics`.

Per label: Dice, IoU, sensitivity, precision, NSD at a tolerance in mm, HD95 in mm, and the volumes (mL) and
voxel counts of both masks. NSD tolerances default to the COVID-19-CT-Seg benchmark's
(:data:`covidseg.metrics.NSD_TOLERANCE_MM`: 1 mm for lungs, 3 mm for the infection), so that scores compare with
its published tables; ``tolerance_mm`` sets one tolerance for every label. Empty masks follow the convention of
:mod:`covidseg.metrics` (both empty: Dice 1, HD95 0 mm; one empty: Dice 0, HD95 = the grid's diagonal).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covidseg import __version__
from covidseg.errors import ConfigError, InputError
from covidseg.evaluation.geometry import Grid, grid_of
from covidseg.evaluation.labels import (
    INFECTION,
    LABELS,
    LEFT_LUNG,
    LUNGS,
    RIGHT_LUNG,
    Assignment,
    assign_labels,
)
from covidseg.evaluation.structures import evaluation_grid, read_structures
from covidseg.io.atomic import atomic_write_text
from covidseg.io.image import CTImage
from covidseg.metrics import NSD_TOLERANCE_MM, binary_metrics


@dataclass
class LabelScore:
    """Agreement of one label (all values fractions in [0, 1] unless a unit is named).

    Attributes:
        label: one of :data:`~covidseg.evaluation.labels.LABELS`.
        dice, iou, sensitivity, precision: overlap of prediction and reference.
        nsd: normalised surface Dice at ``tolerance_mm``.
        hd95_mm: symmetric 95th-percentile Hausdorff distance (mm).
        tolerance_mm: the NSD tolerance used (mm).
        pred_ml, ref_ml: volumes (mL).
        pred_voxels, ref_voxels: voxel counts.
        pred_structures, ref_structures: the structures each side's mask is the union of.
        pred_ml_beyond_ref_slices: the prediction's volume (mL) on axial slices beyond the first and last that
            the reference contours (a reference drawn on part of the scan; counted also when not scored).
        ref_slices: ``[first, last]`` axial slice (canonical index) the reference contours, ``None`` when empty.
        within_ref_slices: whether only those slices were scored (``reference_slices`` and a reference that is
            not empty).
    """

    label: str
    dice: float
    iou: float
    sensitivity: float
    precision: float
    nsd: float
    hd95_mm: float
    tolerance_mm: float
    pred_ml: float
    ref_ml: float
    pred_voxels: int
    ref_voxels: int
    pred_structures: list[str] = field(default_factory=list)
    ref_structures: list[str] = field(default_factory=list)
    pred_ml_beyond_ref_slices: float = 0.0
    ref_slices: list[int] | None = None
    within_ref_slices: bool = False


def reference_slab(ref: np.ndarray) -> tuple[int, int] | None:
    """First and last axial slice (axis 0 of a canonical ``(D, H, W)`` mask) holding any of ``ref``; ``None`` if
    it is empty."""
    zs = np.flatnonzero(np.asarray(ref).reshape(ref.shape[0], -1).any(axis=1))
    return (int(zs[0]), int(zs[-1])) if zs.size else None


def default_tolerance_mm(label: str) -> float:
    """NSD tolerance of the COVID-19-CT-Seg benchmark for ``label`` (mm): 3 for infection, 1 for the lungs."""
    return NSD_TOLERANCE_MM["infection" if label == INFECTION else "lung"]


def score_label(label: str, pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float],
                tolerance_mm: float | None = None, reference_slices: bool = False) -> LabelScore:
    """Score one label's canonical ``(D, H, W)`` masks at ``spacing`` (mm along D, H, W).

    With ``reference_slices`` only the axial slices from the first to the last that the reference contours are
    scored (the prediction beyond them is left out; a reference drawn on part of the scan, an RTSTRUCT that
    stops a slice short of the scan's edge); an empty reference is scored as it is."""
    tol = default_tolerance_mm(label) if tolerance_mm is None else float(tolerance_mm)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pred = np.asarray(pred, dtype=bool)
    slab = reference_slab(ref)
    inside = np.zeros(pred.shape[0], dtype=bool)
    if slab is not None:
        inside[slab[0] : slab[1] + 1] = True
    beyond = int(np.count_nonzero(pred[~inside]))
    if reference_slices and beyond and slab is not None:  # an empty reference spans no slice: nothing to keep to
        pred = pred & inside[:, None, None]
    m = binary_metrics(pred, ref, spacing=spacing, tolerance_mm=tol)
    n_p, n_r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    return LabelScore(label=label, dice=m["dice"], iou=m["iou"], sensitivity=m["sensitivity"],
                      precision=m["precision"], nsd=m["nsd"], hd95_mm=m["hd95"], tolerance_mm=tol,
                      pred_ml=n_p * voxel_ml, ref_ml=n_r * voxel_ml, pred_voxels=n_p, ref_voxels=n_r,
                      pred_ml_beyond_ref_slices=beyond * voxel_ml,
                      ref_slices=list(slab) if slab is not None else None,
                      within_ref_slices=reference_slices and slab is not None)


def with_lungs(masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``masks`` plus ``lungs`` = left | right when it has both lungs and no ``lungs`` of its own."""
    out = dict(masks)
    if LUNGS not in out and LEFT_LUNG in out and RIGHT_LUNG in out:
        out[LUNGS] = np.asarray(out[LEFT_LUNG], bool) | np.asarray(out[RIGHT_LUNG], bool)
    return out


def score(pred: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], spacing: tuple[float, float, float],
          tolerance_mm: float | None = None, reference_slices: bool = False) -> dict[str, LabelScore]:
    """Score every label the reference has and the prediction has too.

    Args:
        pred: label -> canonical ``(D, H, W)`` mask (e.g. ``{"left_lung": lungs == 1, "right_lung": lungs == 2}``).
        ref: label -> mask of the same shape (e.g. from :func:`read_reference`).
        spacing: voxel size in mm along ``(D, H, W)``.
        tolerance_mm: NSD tolerance for every label; ``None``: :func:`default_tolerance_mm` per label.
        reference_slices: score each label only on the axial slices its reference spans (:func:`score_label`).

    Returns:
        label -> :class:`LabelScore`, in the order of :data:`~covidseg.evaluation.labels.LABELS`; a reference
        ``lungs`` is scored against the prediction's two lungs together when it has no ``lungs`` of its own.
    """
    pred = with_lungs(pred)
    return {label: score_label(label, np.asarray(pred[label]), np.asarray(ref[label]), spacing, tolerance_mm,
                               reference_slices)
            for label in LABELS if label in ref and label in pred}


def _union(grid: Grid, assignment: Assignment, label: str) -> np.ndarray:
    mask = np.zeros(grid.shape, dtype=bool)
    for structure in assignment.labels[label]:
        mask |= structure.load()
    return mask


def read_reference(path: str | Path, like: CTImage, mapping: Mapping[str, str] | None = None) \
        -> dict[str, np.ndarray]:
    """Read a reference (NIfTI, covidseg folder, DICOM-SEG, RTSTRUCT) as label masks on ``like``'s grid.

    Args:
        path: the reference file or folder.
        like: the CT (from :func:`covidseg.io.image.read_image`) whose canonical grid the masks are put on; for a
            DICOM series, a SEG or RTSTRUCT that references another series is refused.
        mapping: structure name (case-folded) -> label, as :func:`~covidseg.evaluation.labels.parse_map` gives.

    Returns:
        label -> canonical ``(D, H, W)`` boolean mask, for every label some structure maps onto.

    Raises:
        InputError: unreadable file, another series or grid, or no structure mapped onto a label.
    """
    grid = grid_of(like)
    _fmt, structures = read_structures(path, grid)
    assignment = assign_labels(structures, mapping, path)
    if not assignment.labels:
        _no_match(Path(path), assignment, "--map")
    return {label: _union(grid, assignment, label) for label in LABELS if label in assignment.labels}


def _no_match(path: Path, assignment: Assignment, option: str) -> None:
    names = ", ".join(s.name for s in assignment.unmapped) or "none"
    raise InputError(f"{path}: no structure maps onto a covidseg label (structures: {names}); name the ones to "
                     f"score with {option} NAME=LABEL (labels: {', '.join(LABELS)})")


@dataclass
class Evaluation:
    """Result of :func:`evaluate`: per-label scores and what each side held."""

    prediction: str
    reference: str
    formats: dict[str, str]
    grid: dict[str, Any]
    scores: dict[str, LabelScore]
    mapping: dict[str, dict[str, list[str]]]
    unmapped: dict[str, list[str]]
    not_in_prediction: list[str]
    not_in_reference: list[str]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (``scores`` keyed by label)."""
        out = asdict(self)
        out["covidseg_version"] = __version__
        return out


def _side(path: str | Path, grid: Grid, overrides: Mapping[str, str] | None, option: str) \
        -> tuple[str, Assignment]:
    fmt, structures = read_structures(path, grid)
    return fmt, assign_labels(structures, overrides, path, option)


def _described(assignment: Assignment) -> dict[str, list[str]]:
    return {label: [f"{s.origin} ({assignment.how[s.origin]})" for s in items]
            for label, items in assignment.labels.items()}


def evaluate(pred: str | Path, ref: str | Path, ct: str | Path | None = None,
             ref_map: Mapping[str, str] | None = None, pred_map: Mapping[str, str] | None = None,
             tolerance_mm: float | None = None, reference_slices: bool = False) -> Evaluation:
    """Score a prediction against a reference on one voxel grid (what ``covidseg evaluate`` runs).

    Args:
        pred: prediction: a covidseg output folder, a NIfTI label map, or a DICOM-SEG / RTSTRUCT.
        ref: reference, in any of the same formats.
        ct: the CT series (DICOM folder or NIfTI) both were drawn on; needed when neither side is a NIfTI.
        ref_map, pred_map: structure name -> label overrides for each side (:func:`~covidseg.evaluation.labels.
            parse_map`).
        tolerance_mm: NSD tolerance for every label; ``None``: the benchmark's per label (mm).
        reference_slices: score each label only on the axial slices its reference spans.

    Raises:
        InputError: a bad input (see :func:`~covidseg.evaluation.structures.read_structures`), or no label that
            both sides have.
        ConfigError: a non-positive tolerance.
    """
    if tolerance_mm is not None and not (float(tolerance_mm) > 0):
        raise ConfigError(f"--tolerance-mm {tolerance_mm}: the NSD tolerance must be a positive distance in mm, "
                          f"e.g. 2")
    grid = evaluation_grid(pred, ref, ct)
    pred_fmt, pred_side = _side(pred, grid, pred_map, "--pred-map")
    ref_fmt, ref_side = _side(ref, grid, ref_map, "--map")
    if not ref_side.labels:
        _no_match(Path(ref), ref_side, "--map")
    if not pred_side.labels:
        _no_match(Path(pred), pred_side, "--pred-map")
    pred_labels = set(pred_side.labels) | ({LUNGS} if {LEFT_LUNG, RIGHT_LUNG} <= set(pred_side.labels) else set())
    common = [label for label in LABELS if label in ref_side.labels and label in pred_labels]
    if not common:
        raise InputError(f"{ref}: its labels ({', '.join(ref_side.labels)}) are none of the prediction's "
                         f"({', '.join(sorted(pred_side.labels))}, {pred}); map the structures with --map NAME=LABEL "
                         f"or --pred-map NAME=LABEL")
    needed = set(common) | ({LEFT_LUNG, RIGHT_LUNG} if LUNGS in common and LUNGS not in pred_side.labels else set())
    pred_masks = {label: _union(grid, pred_side, label) for label in pred_side.labels if label in needed}
    ref_masks = {label: _union(grid, ref_side, label) for label in common}
    scores = score(pred_masks, ref_masks, grid.spacing, tolerance_mm, reference_slices)
    for label, item in scores.items():
        item.ref_structures = [s.name for s in ref_side.labels[label]]
        item.pred_structures = [s.name for s in pred_side.labels.get(label, [])] or \
            [s.name for s in pred_side.labels[LEFT_LUNG] + pred_side.labels[RIGHT_LUNG]]
    return Evaluation(
        prediction=str(pred), reference=str(ref), formats={"prediction": pred_fmt, "reference": ref_fmt},
        grid=grid.as_dict(), scores=scores,
        mapping={"prediction": _described(pred_side), "reference": _described(ref_side)},
        unmapped={"prediction": [s.origin for s in pred_side.unmapped],
                  "reference": [s.origin for s in ref_side.unmapped]},
        not_in_prediction=[label for label in ref_side.labels if label not in pred_labels],
        not_in_reference=[label for label in pred_side.labels if label not in ref_side.labels],
    )


TABLE_COLUMNS = ("label", "Dice", "NSD", "tol mm", "HD95 mm", "pred mL", "ref mL", "pred vox", "ref vox",
                 "reference structures")


def format_table(result: Evaluation) -> str:
    """The per-label table printed by ``covidseg evaluate``, followed by what was not scored."""
    rows = [list(TABLE_COLUMNS)]
    for s in result.scores.values():
        rows.append([s.label, f"{s.dice:.4f}", f"{s.nsd:.4f}", f"{s.tolerance_mm:g}", f"{s.hd95_mm:.2f}",
                     f"{s.pred_ml:.1f}", f"{s.ref_ml:.1f}", str(s.pred_voxels), str(s.ref_voxels),
                     ", ".join(s.ref_structures)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i in (0, len(widths) - 1) else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"grid: {' x '.join(map(str, result.grid['shape_dhw']))} voxels (D x H x W) of "
             f"{' x '.join(f'{v:.3g}' for v in result.grid['spacing_mm_dhw'])} mm, from {result.grid['source']}"]
    for side in ("reference", "prediction"):
        if result.unmapped[side]:
            option = "--map" if side == "reference" else "--pred-map"
            notes.append(f"{side} structures not scored (no label; map one with {option} NAME=LABEL): "
                         f"{', '.join(result.unmapped[side])}")
    in_plane = min(result.grid["spacing_mm_dhw"][1:])
    tight = sorted({s.tolerance_mm for s in result.scores.values() if s.tolerance_mm < in_plane})
    if tight:
        notes.append(f"NSD tolerance {', '.join(f'{t:g}' for t in tight)} mm is below the in-plane voxel size "
                     f"({in_plane:.3g} mm): a border one voxel off already counts as a miss; --tolerance-mm "
                     f"{2 * in_plane:.2g} scores at the voxel scale")
    for s in result.scores.values():
        if s.pred_ml_beyond_ref_slices > 0 and s.ref_slices is not None:
            first, last = s.ref_slices
            how = ("left out (--reference-slices)" if s.within_ref_slices else
                   "scored; --reference-slices scores only the slices the reference contours")
            notes.append(f"{s.label}: {s.pred_ml_beyond_ref_slices:.1f} mL of the prediction lie on axial slices "
                         f"the reference does not reach (it spans slices {first}-{last} of "
                         f"{result.grid['shape_dhw'][0]}): {how}")
    if result.not_in_prediction:
        notes.append(f"reference labels the prediction lacks (not scored): {', '.join(result.not_in_prediction)}")
    if result.not_in_reference:
        notes.append(f"prediction labels without a reference (not scored): {', '.join(result.not_in_reference)}")
    return "\n".join(lines + [""] + notes) + "\n"


def write_json(result: Evaluation, path: str | Path, inputs: tuple[str | Path | None, ...] = ()) -> Path:
    """Write ``result`` as JSON (atomically); refuses to overwrite one of ``inputs``."""
    path = Path(path)
    for item in inputs:
        if item is not None and Path(item).exists() and path.exists() and path.resolve() == Path(item).resolve():
            raise InputError(f"{path}: refusing to overwrite an input with the JSON; choose another --json file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give --json a file name such as evaluation.json")
    atomic_write_text(path, json.dumps(result.as_dict(), indent=2) + "\n")
    return path
