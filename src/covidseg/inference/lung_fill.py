"""Per axial slice, each lung's mask made whole: vessels, nodules and lesions against the pleura put back.

A threshold keeps the aerated lung only: vessels, nodules and any dense lesion (tumour, consolidation) are holes in
it or bites out of it. :func:`fill_lung_slices` fills, per axial slice and per lung, the holes, closes the outline
with a disk, and fills the concavities that open towards the chest wall: of the convex hull, and of the lung of
the slices above and below (a consolidation flattened along a convex chest wall lies partly outside the hull of the
aerated lung its slice keeps). Two structures are holes or bites of the lung too and must stay out: the
diaphragm's dome (the liver or spleen seen through the basal crescent of the lung, first as an island, lower down
as a wide bite) and the heart and mediastinum. What tells a
lesion from the dome is the third dimension: a lesion inside the lung has aerated lung above it *and* below it
(within ``LungConfig.enclosure_mm``), the dome has lung above it only. A lesion larger than that, or one that
meets the dome in its slices, is put back in 3D (:func:`wall_bulges`): a bulge of tissue from the chest wall into
the lung that a large ball cannot enter, where the broad dome and the heart let the ball in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from covidseg.config import LungConfig
from covidseg.inference.lung_grid import SLICE_2D, bbox, convex_hulls, fill_holes_2d, octagon_closing

MIN_COVER = 0.5
"""Share of a hole's or bite's pixels that must have lung above (below) it for it to count as covered."""


def lung_cover(lung: np.ndarray, slices: int, cut: tuple[bool, bool] = (False, False)) -> tuple[np.ndarray, np.ndarray]:
    """Where ``lung`` lies above and below each voxel: ``(above, below)``, ``(D, H, W)`` bool, ``above[z, y, x]``
    when one of the ``slices`` slices above ``z`` holds lung at ``(y, x)`` (``below``: the slices under it).

    ``cut = (low, high)`` says the scan stops inside the lung at its first (last) slice: what lies beyond is not
    known, and a hole or a lesion there gets the benefit of the doubt: the lung is taken to go on as the outline of
    that slice, its holes filled (a consolidation in a base that the scan cuts stays in the lung)."""
    d = lung.shape[0]
    low = np.repeat(fill_holes_2d(lung[:1]), slices, axis=0) if cut[0] else lung[:0]
    high = np.repeat(fill_holes_2d(lung[-1:]), slices, axis=0) if cut[1] else lung[:0]
    stack = np.concatenate([low, lung, high]) if cut[0] or cut[1] else lung
    off = low.shape[0]
    n = stack.shape[0]
    count = np.zeros((n + 1,) + lung.shape[1:], dtype=np.int32)
    np.cumsum(stack, axis=0, dtype=np.int32, out=count[1:])  # count[k] = lung slices among 0..k-1
    z = np.arange(d) + off
    hi, lo = np.minimum(z + 1 + slices, n), np.maximum(z - slices, 0)
    above = (count[hi] - count[z + 1]) > 0
    below = (count[z] - count[lo]) > 0
    return above, below


def fill_lung_slices(lung: np.ndarray, spacing: Sequence[float], cfg: LungConfig, medial_side: int) -> np.ndarray:
    """Per axial slice: fill holes, close with a disk, and fill the concavities that face the chest wall.

    Holes (:func:`fillable_holes`) are filled unless they are the top of the diaphragm's dome; the closing does not
    reach into the holes left open; concavities follow :func:`lateral_concavities`, in each slice's convex hull
    widened by the pixels with lung both above and below them (a sub-pleural consolidation flattened along the
    chest wall is partly outside the hull of the aerated lung around it).

    Args:
        lung: ``(D, H, W)`` mask of one lung.
        spacing: mm.
        cfg: closing radius (mm), hole and concavity limits, ``enclosure_mm``.
        medial_side: +1 when the mediastinum lies at higher column indices than this lung (the right lung),
            -1 otherwise.

    Returns:
        ``(D, H, W)`` bool, the filled lung (a superset of ``lung``).
    """
    box = bbox(lung, margin=(0, 2, 2))
    if box is None:
        return lung
    sub = lung[box]
    reach = max(1, int(round(cfg.enclosure_mm / float(spacing[0]))))
    above, below = lung_cover(sub, reach, (box[0].start == 0, box[0].stop == lung.shape[0]))
    radius = 0.5 * (cfg.closing_radius_mm / spacing[1] + cfg.closing_radius_mm / spacing[2])
    # holes and the closing on the whole stack at once (in-plane structures: the same as slice by slice)
    filled = sub | fillable_holes(sub, above, below, cfg.max_hole_fraction)
    closed = octagon_closing(filled, radius)
    closed = filled | (closed & ~(fill_holes_2d(filled) & ~filled))  # not into the holes left open (the dome)
    closed |= fillable_holes(closed, above, below, cfg.max_hole_fraction)
    if cfg.fill_concavities:
        # the hull of each slice plus where the lung lies both above and below: a lesion flattened along a convex
        # chest wall reaches beyond the hull of the aerated lung it leaves in its slice, but not beyond the lung
        # of the slices around it
        hull = convex_hulls(closed)
        if cfg.concavities_beyond_hull:
            hull |= above & below
        closed |= lateral_concavities(closed, hull, medial_side, cfg, above, below)
    if cfg.wall_closing_mm > 0:
        closed |= wall_bulges(closed, spacing, cfg.wall_closing_mm, cfg.min_wall_opening, medial_side,
                              cfg.max_medial_cosine)
    result = np.zeros_like(lung)
    result[box] = closed
    return result


def ball_closing(mask: np.ndarray, spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """3D closing of ``mask`` by a ball of ``radius_mm`` (anisotropic ``spacing``, mm), by two Euclidean distance
    transforms on a copy padded by the radius (``scipy.ndimage.binary_closing`` with the ball as structure is the
    reference in the tests); the result includes ``mask``."""
    pad = [int(np.ceil(radius_mm / float(s))) + 1 for s in spacing]
    padded = np.pad(mask, [(p, p) for p in pad])
    reach = radius_mm + 1e-6  # the ball: offsets up to the radius, rounding aside
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing) <= reach
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing) > reach
    return closed[tuple(slice(p, p + n) for p, n in zip(pad, mask.shape, strict=True))] | mask


def wall_bulges(lung: np.ndarray, spacing: Sequence[float], radius_mm: float, min_wall_share: float,
                medial_side: int, max_medial_cosine: float) -> np.ndarray:
    """Where a large lesion bulges from the chest wall into the lung: what a 3D closing by a ball of ``radius_mm``
    adds to ``lung`` (:func:`ball_closing`), facing the chest wall.

    The per-slice concavities miss a lesion larger than the lung's slice around it or merged with the diaphragm's
    dome in its slices; in 3D it is a bulge of tissue into the lung that a ball of about its radius cannot enter,
    while the broad dome, a layering effusion and the heart take the ball. The closing also adds the hilum and
    the heart's notch, which face the mediastinum. A region of the addition (3D component) is kept when at least
    ``min_wall_share`` of its face towards the tissue the closing leaves out lies beyond the convex hull of its
    slice of ``lung`` (the chest wall; the mediastinum lies within the hull of the lung wrapped around it), or
    it has no such face (enclosed), and the direction from its floor on the lung to its face is not medial (cosine
    with the medial direction at most ``max_medial_cosine``, as for the per-slice concavities).

    Args:
        lung: ``(D, H, W)`` bool, one lung after the per-slice filling.
        spacing: mm.
        radius_mm: the ball's radius.
        min_wall_share: share of a region's face that must lie beyond the hull.
        medial_side: +1 when the mediastinum lies at higher column indices than this lung, -1 otherwise.
        max_medial_cosine: the most medial direction a region may face.

    Returns:
        ``(D, H, W)`` bool, the voxels to add (none of ``lung``).
    """
    box = bbox(lung, margin=(0, 2, 2))
    out = np.zeros_like(lung)
    if box is None:
        return out
    sub = lung[box]
    closed = ball_closing(sub, spacing, radius_mm)
    added = closed & ~sub
    labels, n = ndimage.label(added)
    if n == 0:
        return out
    coords = np.nonzero(added)
    lab = labels[coords]
    face = (ndimage.binary_dilation(~closed) & added)[coords]  # next to the tissue the closing leaves out
    floor = ndimage.binary_dilation(sub)[coords]  # next to the lung
    beyond = face & ~convex_hulls(sub)[coords]
    scale = np.asarray(spacing, dtype=np.float64)

    n_face, face_at = _label_centres(lab, face, coords, n)
    _, floor_at = _label_centres(lab, floor, coords, n)
    face_at, floor_at = face_at * scale, floor_at * scale
    n_beyond = np.bincount(lab[beyond], minlength=n + 1)[1:]
    share = np.where(n_face > 0, n_beyond / np.maximum(n_face, 1), 1.0)
    direction = face_at - floor_at
    norm = np.linalg.norm(direction, axis=1)
    # an enclosed region (no face) faces nowhere: not medially
    medial = np.where((n_face > 0) & (norm > 0), direction[:, 2] * medial_side / np.maximum(norm, 1e-9), 0.0)
    ok = (share >= min_wall_share) & (medial <= max_medial_cosine)
    out[box] = np.concatenate(([False], ok))[labels]
    return out


def _label_centres(lab: np.ndarray, sel: np.ndarray, coords: Sequence[np.ndarray], n: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per label 1..n of the voxels ``lab`` (their ``coords``, one array per axis), over those where ``sel`` is set:
    how many, and their mean position ``(n, len(coords))`` (0 for a label with none)."""
    count = np.bincount(lab[sel], minlength=n + 1)[1:]
    safe = np.maximum(count, 1)
    return count, np.stack([np.bincount(lab[sel], weights=c[sel], minlength=n + 1)[1:] / safe for c in coords],
                           axis=1)


def _label_means(labels: np.ndarray, n: int, *masks: np.ndarray) -> list[np.ndarray]:
    """Per label 1..n, the share of its voxels where each of ``masks`` is set."""
    count = np.maximum(np.bincount(labels.ravel(), minlength=n + 1)[1:], 1)
    return [np.bincount(labels[m], minlength=n + 1)[1:] / count for m in masks]


def fillable_holes(m: np.ndarray, above: np.ndarray, below: np.ndarray, max_fraction: float) -> np.ndarray:
    """The 2D holes of every slice of ``m`` that are lung (vessels, nodules, enclosed lesions).

    A hole is filled when it has lung both above and below it (:data:`MIN_COVER` of its pixels, ``above`` and
    ``below`` from :func:`lung_cover`: a lesion inside the lung), or when it is small (at most ``max_fraction`` of
    the slice's lung) and has lung below it. A hole with lung above it but none below is the top of the
    diaphragm's dome (the liver or the spleen rising into the lung's base), not lung; so is a large one.

    Args:
        m: ``(D, H, W)`` bool, one lung.
        above, below: ``(D, H, W)`` bool, :func:`lung_cover` of the lung.
        max_fraction: share of the slice's lung area.
    """
    holes = fill_holes_2d(m) & ~m
    labels, n = ndimage.label(holes, structure=SLICE_2D)
    if n == 0:
        return holes
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    objects = ndimage.find_objects(labels)
    z_of = np.array([o[0].start if o is not None else 0 for o in objects])
    slice_area = m.sum(axis=(1, 2))[z_of]
    up, down = _label_means(labels, n, above, below)
    covered_below = down >= MIN_COVER
    keep = (covered_below & (up >= MIN_COVER)) | (covered_below & (areas <= max_fraction * slice_area))
    return np.concatenate(([False], keep))[labels]


def lateral_concavities(lung: np.ndarray, hull: np.ndarray, medial_side: int, cfg: LungConfig,
                        above: np.ndarray, below: np.ndarray) -> np.ndarray:
    """Concavities (hull minus lung, per axial slice, open to the hull's border) that open towards the chest wall:
    a lesion against the lateral, anterior or posterior pleura, paravertebral.

    A concavity is left out when its centre is in the anterior-medial quadrant of its slice's lung (the heart's
    notch), when it opens towards the mediastinum: its opening (the concavity's pixels on the hull's border) lies
    medially of its floor (its pixels touching the lung), the cosine between that direction and the medial
    direction above ``cfg.max_medial_cosine`` (the descending aorta, the hilum, the oesophagus, which the lung
    wraps around medially), and when it is larger than ``cfg.max_concavity_fraction`` of the lung slice (the
    diaphragm's dome) unless there is lung both above and below it (a lesion bulging into the lung from the chest
    wall). With ``cfg.split_concavities``, the part of a concavity left out that has lung both above and below it
    (its holes filled) is judged again on its own by the same rules: a large lesion against the chest wall can
    reach the hilum's or the heart's concavity in its slice, and the two make one concavity opening medially.

    Args:
        lung: ``(D, H, W)`` one lung.
        hull: ``(D, H, W)`` the convex hull of each of its slices (or a superset: what a concavity may fill).
        medial_side: +1 when the mediastinum lies at higher column indices, -1 otherwise.
        cfg: ``max_concavity_fraction``, ``max_medial_cosine``, ``split_concavities``.
        above, below: ``(D, H, W)`` bool, lung above and below (:func:`lung_cover`).

    Returns:
        ``(D, H, W)`` bool, the concavities to fill.
    """
    defects = hull & ~lung
    labels, n = ndimage.label(defects, structure=SLICE_2D)  # one label per concavity of each slice
    if n == 0:
        return defects
    border = hull & ~ndimage.binary_erosion(hull, structure=SLICE_2D, border_value=0)  # where a concavity opens
    floor = ndimage.binary_dilation(lung, structure=SLICE_2D)  # where it touches the lung
    fill = _accepted(labels, n, lung, border, floor, medial_side, cfg, above, below)[labels]
    if cfg.split_concavities:
        # a large lesion against the chest wall can reach the concavity of the hilum or the heart in its slice and
        # merge with it into one defect that opens medially: its part with lung above and below it is judged alone
        rejected = defects & ~fill
        pieces = fill_holes_2d(rejected & above & below) & rejected
        labels, n = ndimage.label(pieces, structure=SLICE_2D)
        if n:
            fill |= _accepted(labels, n, lung, border, floor, medial_side, cfg, above, below)[labels]
    return fill


def _accepted(labels: np.ndarray, n: int, lung: np.ndarray, border: np.ndarray, floor: np.ndarray, medial_side: int,
              cfg: LungConfig, above: np.ndarray, below: np.ndarray) -> np.ndarray:
    """``(n + 1,)`` bool: which of the concavities ``labels`` 1..n (2D labels, 0 = none) :func:`lateral_concavities`
    fills (index 0, the background, False). ``border``: the hull's border pixels (a concavity's opening);
    ``floor``: the lung dilated by one pixel in-plane (a concavity's floor on the lung)."""
    zs, ys, xs = np.nonzero(labels)  # statistics over the defects' pixels only
    lab = labels[zs, ys, xs]
    on_border = border[zs, ys, xs]
    on_floor = floor[zs, ys, xs]

    areas, at = _label_centres(lab, np.ones(lab.shape, dtype=bool), (ys, xs), n)
    cy_d, cx_d = at.T
    n_open, at = _label_centres(lab, on_border, (ys, xs), n)
    oy, ox = at.T
    n_floor, at = _label_centres(lab, on_floor, (ys, xs), n)
    fy, fx = at.T
    z_of = np.zeros(n, dtype=np.intp)
    z_of[lab - 1] = zs
    lung_area = lung.sum(axis=(1, 2)).astype(np.float64)
    grid_y, grid_x = np.arange(lung.shape[1], dtype=np.float64), np.arange(lung.shape[2], dtype=np.float64)
    safe_area = np.maximum(lung_area, 1.0)
    cy = (lung.sum(axis=2) @ grid_y / safe_area)[z_of]  # the lung's centre in each concavity's slice
    cx = (lung.sum(axis=1) @ grid_x / safe_area)[z_of]
    dy, dx = oy - fy, ox - fx
    norm = np.hypot(dy, dx)
    medial = np.where((n_floor > 0) & (norm > 0), dx * medial_side / np.maximum(norm, 1e-9), -1.0)
    heart = ((cx_d - cx) * medial_side > 0) & (cy_d < cy)
    up = np.bincount(lab[above[zs, ys, xs]], minlength=n + 1)[1:] / np.maximum(areas, 1)
    down = np.bincount(lab[below[zs, ys, xs]], minlength=n + 1)[1:] / np.maximum(areas, 1)
    small = areas <= cfg.max_concavity_fraction * lung_area[z_of]
    enclosed = (up >= MIN_COVER) & (down >= MIN_COVER)
    ok = (n_open > 0) & (small | enclosed) & ~heart & (medial <= cfg.max_medial_cosine)
    return np.concatenate(([False], ok))
