"""Oblique tubes of the chest: ribs, main bronchi, central pulmonary vessels, and the branching trees in the lungs.

A tube is ``(p0, p1, r0, r1)``: end points in mm as ``(z, y, x)`` and the radii at each end. The branching trees
are grown by recursive bisection of points sampled inside the lung (each branch runs from its parent's end to the
centroid of its share of the lung, then the share is split in two across its longest spread); radii shrink by
Murray's law for a symmetric bifurcation (``2^(-1/3)`` ~ 0.79 per generation). This fills the lung the way a real
tree does, with large vessels at the hilum and fine ones towards the periphery, in a few hundred tubes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from covidseg.phantom.anatomy import Anatomy

MURRAY_RATIO = 2.0 ** (-1.0 / 3.0)
"""Radius ratio child/parent at a symmetric bifurcation (Murray's law)."""
RIBS_PER_SIDE = 12
RIB_RADIUS_MM = 4.6
RIB_SEGMENTS = 22


@dataclass(frozen=True)
class Tube:
    """A tapered tube from ``p0`` to ``p1`` (mm, ``(z, y, x)``) with radii ``r0 -> r1`` (mm)."""

    p0: np.ndarray
    p1: np.ndarray
    r0: float
    r1: float
    generation: int = 0


def _p(z: float, y: float, x: float) -> np.ndarray:
    return np.array([z, y, x], dtype=np.float64)


def rib_tubes(an: Anatomy) -> list[tuple[Tube, bool]]:
    """The 12 pairs of ribs as chains of short tubes, each flagged ``True`` where it is costal cartilage.

    A rib leaves the spine at its vertebra, follows the chest wall just outside the thoracic cavity and descends
    anteriorly (by about two vertebral heights); ribs 1-7 reach the sternum through cartilage, 8-10 end in
    cartilage further out, 11-12 float.
    """
    tubes: list[tuple[Tube, bool]] = []
    for k in range(RIBS_PER_SIDE):
        z_post = an.z_apex - 6.0 - k * an.vert_h * 0.98
        drop = an.vert_h * (3.0 + 0.1 * k)
        end = 0.9 * math.pi if k < 7 else (0.72 * math.pi if k < 10 else 0.45 * math.pi)
        cartilage_from = 0.76 * math.pi if k < 7 else 0.62 * math.pi
        phis = np.linspace(0.1 * math.pi, end, RIB_SEGMENTS + 1)
        for side in (-1.0, 1.0):
            pts = []
            for phi in phis:
                z = z_post - drop * (phi / math.pi) ** 1.3
                cy, ca, cb = an.cavity(z)
                ca, cb = max(ca, 25.0), max(cb, 25.0)
                off = RIB_RADIUS_MM + 1.5
                pts.append(_p(z, cy + (cb + off) * math.cos(phi), an.x_mid + side * (ca + off) * math.sin(phi)))
            for i in range(RIB_SEGMENTS):
                cart = bool(phis[i] >= cartilage_from and k < 10)
                tubes.append((Tube(pts[i], pts[i + 1], RIB_RADIUS_MM, RIB_RADIUS_MM), cart))
    return tubes


@dataclass(frozen=True)
class Hilum:
    """Where the central airways and vessels meet each lung (mm, ``(z, y, x)``)."""

    carina: np.ndarray
    bronchus_end: dict[int, np.ndarray]
    artery_root: dict[int, np.ndarray]
    vein_root: dict[int, np.ndarray]
    pa_trunk: np.ndarray
    left_atrium: np.ndarray


def hilum(an: Anatomy) -> Hilum:
    """Positions of the carina, the main bronchi's ends and the roots of the trees; side 1 = left, 2 = right."""
    w = an.strip_half_width(an.z_carina)
    ty = an.trachea_y
    zc = an.z_carina
    carina = _p(zc, ty, an.x_mid)
    cy, _, _ = an.cavity(zc)
    # everything central stays inside the mediastinum; the trees start at its edge (the hila)
    b_end = {2: _p(zc - 22.0, ty + 6.0, an.x_mid - w - 6.0), 1: _p(zc - 36.0, ty + 10.0, an.x_mid + w + 8.0)}
    a_root = {2: _p(zc - 16.0, ty - 8.0, an.x_mid - w - 4.0), 1: _p(zc - 10.0, ty - 2.0, an.x_mid + w + 5.0)}
    v_root = {2: _p(zc - 56.0, cy + 2.0, an.x_mid - w - 3.0), 1: _p(zc - 60.0, cy + 4.0, an.x_mid + w + 4.0)}
    asc_x, asc_y = an.asc_xy
    heart_top = an.heart_z1 - 0.15 * (an.heart_z1 - an.heart_z0)
    trunk = _p(heart_top, asc_y - 2.0, asc_x + an.asc_r + 10.0)
    hx, hy = an.heart_xy
    atrium = _p(0.5 * (an.heart_z0 + an.heart_z1) + 10.0, hy + 0.6 * an.heart_b, an.x_mid + 5.0)
    return Hilum(carina, b_end, a_root, v_root, trunk, atrium)


def central_tubes(an: Anatomy, h: Hilum) -> tuple[list[Tube], list[Tube]]:
    """``(bronchi, vessels)``: the two main bronchi and the central pulmonary arteries and veins."""
    bronchi = [Tube(h.carina, h.bronchus_end[2], 0.82 * an.trachea_r, 0.72 * an.trachea_r),
               Tube(h.carina, h.bronchus_end[1], 0.74 * an.trachea_r, 0.66 * an.trachea_r)]
    vessels = [Tube(h.pa_trunk, h.artery_root[2], 10.0, 8.0), Tube(h.pa_trunk, h.artery_root[1], 10.0, 8.0),
               Tube(h.left_atrium, h.vein_root[2], 8.0, 7.0), Tube(h.left_atrium, h.vein_root[1], 8.0, 7.0)]
    return bronchi, vessels


def _grow(rng: np.random.Generator, start: np.ndarray, pts: np.ndarray, r: float, gen: int, max_gen: int,
          jitter: float, out: list[Tube]) -> None:
    centroid = pts.mean(axis=0)
    r_end = r * 0.93
    out.append(Tube(start, centroid, r, r_end, gen))
    if gen >= max_gen or len(pts) < 8:
        # terminal twig towards the far side of this share of the lung
        far = pts[np.argmax(((pts - centroid) ** 2).sum(axis=1))]
        out.append(Tube(centroid, centroid + 0.7 * (far - centroid), r_end * MURRAY_RATIO, 0.5, gen + 1))
        return
    spread = pts - centroid
    cov = spread.T @ spread
    _, vecs = np.linalg.eigh(cov)
    axis = vecs[:, -1] + jitter * rng.standard_normal(3)
    side = spread @ axis >= 0
    if side.all() or (~side).all():
        return
    for part in (pts[side], pts[~side]):
        _grow(rng, centroid, part, r * MURRAY_RATIO, gen + 1, max_gen, jitter, out)


def lung_trees(rng: np.random.Generator, h: Hilum, points: dict[int, np.ndarray], max_gen: int
               ) -> tuple[list[Tube], list[Tube], list[Tube]]:
    """``(arteries, veins, airways)`` of both lungs.

    Args:
        rng: random generator.
        h: hilum positions.
        points: ``{1: (N, 3), 2: (M, 3)}`` points (mm, ``(z, y, x)``) inside the left and right lungs.
        max_gen: number of bifurcations (7 gives vessels down to about 1 mm).

    The airways accompany the arteries (bronchovascular bundles) for the first five generations, offset
    sideways by the two radii, with a lumen slightly smaller than the artery.
    """
    arteries: list[Tube] = []
    veins: list[Tube] = []
    airways: list[Tube] = []
    for side in (1, 2):
        pts = points[side]
        if len(pts) < 16:
            continue
        tree: list[Tube] = []
        _grow(rng, h.artery_root[side], pts, 6.5, 0, max_gen, 0.15, tree)
        arteries.extend(tree)
        sub = pts[rng.permutation(len(pts))[: max(16, len(pts) * 2 // 3)]]
        _grow(rng, h.vein_root[side], sub, 6.0, 0, max_gen, 0.6, veins)
        for tube in tree:
            if tube.generation > 4:
                continue
            d = tube.p1 - tube.p0
            perp = np.cross(d, np.array([1.0, 0.0, 0.0]))
            n = np.linalg.norm(perp)
            perp = perp / n if n > 1e-6 else np.array([0.0, 1.0, 0.0])
            r_aw = 0.7 * tube.r0
            shift = perp * (tube.r0 + r_aw + 1.5)
            start = h.bronchus_end[side] if tube.generation == 0 else tube.p0 + shift
            airways.append(Tube(start, tube.p1 + shift, r_aw, 0.7 * tube.r1, tube.generation))
    return arteries, veins, airways
