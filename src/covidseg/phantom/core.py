"""One synthetic chest CT with its lung and infection masks: :func:`make_phantom`.

The volume is built in the canonical order ``(D, H, W)`` = (inferior -> superior, anterior -> posterior, patient's
right -> left) (``docs/architecture.md``), slice by slice from :mod:`covidseg.phantom.anatomy`, then the oblique
tubes, lesions and noise are added in 3D. Thick slices are rendered as several thin sub-slices averaged together,
which is what a thick reconstructed slice is (partial volume along ``z``). The file orientation and intensity
convention depend on the style, as in the real dataset (docs/method.md):

- ``coronacases``: about 512 x 512 x 200-300, 0.6-0.8 mm pixels, slices about 1 mm, Hounsfield units (int16),
  voxel axes L, P, S (NIfTI affine ``diag(-sx, -sy, sz)``).
- ``radiopaedia``: about 630 x 630 x 40-110, 0.55-0.7 mm pixels, slices 2.5-7.5 mm, windowed to [-1250, 250] HU and
  stored as [0, 255] (uint8), voxel axes R, A, S (affine ``diag(sx, sy, sz)``), so readers must reorient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nibabel import orientations

from covidseg.phantom.anatomy import AIR_HU, CARTILAGE_HU, Anatomy, draw_anatomy, paint_slice
from covidseg.phantom.lesions import Lesion, draw_lesions, paint_lesion
from covidseg.phantom.noise import add_noise
from covidseg.phantom.shapes import tube_occupancy
from covidseg.phantom.trees import Tube, central_tubes, hilum, lung_trees, rib_tubes

CANONICAL_AXCODES = ("S", "P", "L")
"""Where the canonical array's axes point (nibabel axis codes, RAS world)."""
HU_CLIP = (-1024.0, 3071.0)
"""Range of stored Hounsfield units (12-bit CT)."""
WINDOW_HU = (-1250.0, 250.0)
"""Window of the pre-windowed (radiopaedia) convention, mapped onto [0, 255]."""
COARSE_MM = 4.0
"""Grid step (mm) of the coarse pass that places vessels and lesions."""
SUBSLICE_MM = 2.0
"""Thick slices are averaged from sub-slices at most this far apart (mm)."""
MAX_SUBSLICES = 6
MIN_SLICES = 16
"""Fewest slices of a phantom at any scale (a small radiopaedia-style case would otherwise be a few slabs)."""
MIN_LUNG_HEIGHT_MM = 100.0
"""Shortest lung height a phantom's slices must cover (``slices`` of a thin-slice style sets its extent)."""
TREE_GENERATIONS = 9
AIRWAY_WALL_HU = 20.0


@dataclass(frozen=True)
class StyleSpec:
    """Geometry and storage of one source of the real dataset."""

    size_xy: int
    pixel_mm: tuple[float, float]
    slices: tuple[int, int]
    convention: str
    file_axcodes: tuple[str, str, str]
    thin: bool


STYLES: dict[str, StyleSpec] = {
    "coronacases": StyleSpec(512, (0.6, 0.82), (200, 300), "hu", ("L", "P", "S"), True),
    "radiopaedia": StyleSpec(630, (0.55, 0.7), (40, 110), "windowed", ("R", "A", "S"), False),
}


@dataclass
class Phantom:
    """A synthetic case in canonical order; :meth:`file_ct` etc. give what is written to disk.

    Attributes:
        case_id: e.g. ``coronacases_001`` (set by :func:`~covidseg.phantom.cohort.write_cohort`).
        style: ``coronacases`` or ``radiopaedia``.
        ct: ``(D, H, W)`` float32, Hounsfield units (whatever the stored convention).
        lungs: ``(D, H, W)`` uint8, 0 background, 1 patient's left lung, 2 right lung (lesions included).
        infection: ``(D, H, W)`` uint8, 0/1, inside the lungs.
        spacing: ``(D, H, W)`` mm.
        affine: 4 x 4 RAS affine of the *file's* voxel order.
        axcodes: where the file's voxel axes point (nibabel codes, e.g. ``("L", "P", "S")``).
        convention: ``hu`` (int16) or ``windowed`` ([0, 255], uint8) - how the file stores the CT.
        severity: ``none``, ``mild``, ``moderate`` or ``severe``.
        lesions: the lesions drawn (positions in mm in the canonical frame; ``x = y = 0`` at the body's centre).
        origin_mm: canonical-frame position (mm, ``(z, y, x)``) of voxel ``(0, 0, 0)``.
        anatomy: the drawn shape parameters (for tests and figures).
    """

    case_id: str
    style: str
    ct: np.ndarray
    lungs: np.ndarray
    infection: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    axcodes: tuple[str, str, str]
    convention: str
    severity: str
    lesions: list[Lesion] = field(default_factory=list)
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    anatomy: Anatomy | None = None

    def index_of(self, point_mm: np.ndarray | tuple[float, float, float]) -> tuple[int, int, int]:
        """Canonical voxel index nearest to a point given in the phantom's frame (mm, ``(z, y, x)``)."""
        idx = np.rint((np.asarray(point_mm, dtype=float) - np.asarray(self.origin_mm)) / np.asarray(self.spacing))
        return int(idx[0]), int(idx[1]), int(idx[2])

    def to_file(self, canonical: np.ndarray) -> np.ndarray:
        """Reorder a canonical ``(D, H, W)`` array into the file's voxel order."""
        return np.ascontiguousarray(orientations.apply_orientation(canonical, _transform(self.axcodes)))

    def stored_ct(self) -> np.ndarray:
        """The CT as stored: int16 HU, or uint8 [0, 255] over the [-1250, 250] HU window; file order."""
        if self.convention == "hu":
            arr = np.clip(np.rint(self.ct), *HU_CLIP).astype(np.int16)
        else:
            lo, hi = WINDOW_HU
            arr = np.rint(np.clip((self.ct - lo) * (255.0 / (hi - lo)), 0.0, 255.0)).astype(np.uint8)
        return self.to_file(arr)

    def lung_and_infection(self) -> np.ndarray:
        """Canonical joint labels: 1 left lung, 2 right lung, 3 infection."""
        out = self.lungs.copy()
        out[self.infection > 0] = 3
        return out


def _transform(axcodes: tuple[str, str, str]) -> np.ndarray:
    return orientations.ornt_transform(orientations.axcodes2ornt(CANONICAL_AXCODES),
                                       orientations.axcodes2ornt(axcodes))


def file_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                axcodes: tuple[str, str, str], centre_ras: tuple[float, float, float]) -> np.ndarray:
    """RAS affine of the file's voxel grid for a canonical volume of ``shape`` and ``spacing`` (mm).

    The canonical axes point S, P, L, so its affine has columns ``(0, 0, dz)``, ``(0, -dy, 0)``, ``(-dx, 0, 0)``;
    the file's affine is that composed with the reordering into ``axcodes`` (nibabel's ``inv_ornt_aff``).
    """
    dz, dy, dx = spacing
    canon = np.array([[0.0, 0.0, -dx, 0.0], [0.0, -dy, 0.0, 0.0], [dz, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    centre_vox = (np.array(shape, dtype=float) - 1.0) / 2.0
    canon[:3, 3] = np.array(centre_ras) - canon[:3, :3] @ centre_vox
    return canon @ orientations.inv_ornt_aff(_transform(axcodes), shape)


def make_phantom(style: str, seed: int, scale: float = 1.0, case_id: str | None = None,
                 slices: int | None = None) -> Phantom:
    """Make one synthetic chest CT with lung and infection masks.

    Args:
        style: ``coronacases`` (thin slices, HU) or ``radiopaedia`` (thick slices, stored windowed [0, 255]).
        seed: seed of the numpy Generator; the same seed (and style and scale) gives identical arrays.
        scale: multiplies the in-plane size and the number of slices (spacing grows accordingly, so the anatomy
            keeps its size in mm); 0.25 gives about 128 x 128 x 60 for tests and the demo.
        case_id: name recorded in the phantom (default ``<style>_seed<seed>``).
        slices: number of slices at scale 1 (default: drawn from the style's range); used for benchmarks.

    Returns:
        The :class:`Phantom` (canonical arrays, spacing, affine).
    """
    if style not in STYLES:
        from covidseg.errors import UserError

        raise UserError(f"phantom style {style!r} does not exist; use one of {sorted(STYLES)} (or 'mixed' for a cohort)")
    if not 0.02 <= scale <= 4.0:
        from covidseg.errors import UserError

        raise UserError(f"phantom scale {scale} is out of range; use a value in [0.02, 4] (1 = full size)")
    spec = STYLES[style]
    rng = np.random.default_rng(seed)
    u = rng.uniform

    # ---- scanner geometry ------------------------------------------------------------------------------
    n_slices0 = int(rng.integers(spec.slices[0], spec.slices[1] + 1))
    if slices is not None:
        n_slices0 = int(slices)
    margin_bottom, margin_top = u(20.0, 45.0), u(10.0, 28.0)
    lung_height = u(200.0, 265.0)
    extent = lung_height + margin_bottom + margin_top
    if spec.thin:
        thick0 = float(np.clip(extent / n_slices0, 0.8, 1.25))
        extent = n_slices0 * thick0
        if extent - margin_bottom - margin_top < MIN_LUNG_HEIGHT_MM:
            from covidseg.errors import UserError

            need = math.ceil((MIN_LUNG_HEIGHT_MM + margin_bottom + margin_top) / 1.25)
            raise UserError(f"a {style} phantom of {n_slices0} slices covers {extent:.0f} mm, too short for the lungs; "
                            f"ask for at least {need} slices (or crop the central slices of a longer phantom)")
    else:
        thick0 = extent / n_slices0
    pixel0 = u(*spec.pixel_mm)
    n_xy = max(16, round(spec.size_xy * scale))
    n_z = max(MIN_SLICES, round(n_slices0 * scale))
    dxy = pixel0 * spec.size_xy / n_xy
    dz = extent / n_z
    fov = n_xy * dxy
    n_sub = int(min(MAX_SUBSLICES, max(1, math.ceil(dz / SUBSLICE_MM - 1e-6))))
    dzf = dz / n_sub
    edge = max(dxy, 0.6) * u(0.8, 1.4)
    an = draw_anatomy(rng, extent, margin_bottom, margin_top, fov)

    x_shift, y_shift = u(-0.03, 0.03) * fov, u(-0.08, 0.0) * fov
    xs = ((np.arange(n_xy) - (n_xy - 1) / 2.0) * dxy - x_shift).astype(np.float32)
    ys = ((np.arange(n_xy) - (n_xy - 1) / 2.0) * dxy - y_shift).astype(np.float32)
    zs = ((np.arange(n_z * n_sub) + 0.5) * dzf).astype(np.float32)

    # ---- coarse pass: where the lungs are (for the trees and the lesions) ---------------------------------
    points, boundary, weights, centroid = _coarse_lungs(an, fov, rng)

    # ---- fine slices -----------------------------------------------------------------------------------
    pad = 25.0
    rows = slice(int(np.searchsorted(ys, -an.body_b - pad)), int(np.searchsorted(ys, an.body_b + an.table_gap + pad)))
    cols = slice(int(np.searchsorted(xs, -an.body_a * 1.3 - pad)), int(np.searchsorted(xs, an.body_a * 1.3 + pad)))
    ct = np.full((len(zs), n_xy, n_xy), AIR_HU, dtype=np.float32)
    lung = np.zeros(ct.shape, dtype=np.uint8)
    for k, z in enumerate(zs):
        hu, occ = paint_slice(an, float(z), xs[cols], ys[rows], edge, fov / 2.0)
        ct[k, rows, cols] = hu
        lung[k, rows, cols] = (occ * 255.0 + 0.5).astype(np.uint8)
    coords = (zs, ys, xs)

    severity, lesions, infection = _paint_structures(rng, an, ct, lung, coords, edge,
                                                     (points, boundary, weights, centroid))
    lungs, infection_mask = _slab_masks(ct.shape, n_sub, lung, infection, xs > an.x_mid)
    if n_sub > 1:  # thick slices: the mean of their sub-slices
        ct = ct.reshape(n_z, n_sub, n_xy, n_xy).mean(axis=1, dtype=np.float32)

    # ---- scanner noise ----------------------------------------------------------------------------------
    sigma = u(12.0, 32.0) if spec.thin else u(6.0, 16.0)
    add_noise(ct, rng, sigma * math.sqrt(scale) if scale < 1 else sigma, u(0.4, 0.9))
    np.clip(ct, HU_CLIP[0], HU_CLIP[1], out=ct)

    spacing = (float(dz), float(dxy), float(dxy))
    centre_ras = (float(-x_shift), float(y_shift), float(u(-150.0, -50.0)))
    affine = file_affine(ct.shape, spacing, spec.file_axcodes, centre_ras)
    return Phantom(
        case_id=case_id or f"{style}_seed{seed}", style=style, ct=ct, lungs=lungs, infection=infection_mask,
        spacing=spacing, affine=affine, axcodes=spec.file_axcodes, convention=spec.convention,
        severity=severity, lesions=lesions, origin_mm=(float(zs[0] - (n_sub - 1) * dzf / 2), float(ys[0]),
                                                       float(xs[0])),
        anatomy=an,
    )


def _paint_structures(rng: np.random.Generator, an: Anatomy, ct: np.ndarray, lung: np.ndarray,
                      coords: tuple[np.ndarray, np.ndarray, np.ndarray], edge: float,
                      coarse: tuple[Any, Any, Any, Any]) -> tuple[str, list[Lesion], np.ndarray]:
    """Paint the oblique structures and the lesions into ``ct`` (and ``lung``), in the order that fixes the
    random draws: ribs, central vessels and bronchi, the lung trees, GGO lesions, vessels, consolidations, airways.
    Returns ``(severity, lesions, infection occupancy)``."""
    points, boundary, weights, centroid = coarse
    ts = an.tissues
    for tube, cartilage in rib_tubes(an):
        if cartilage:
            _paint_tube(ct, coords, tube, CARTILAGE_HU, edge)
        else:
            _paint_tube(ct, coords, tube, ts.bone_cortex, edge)
            _paint_tube(ct, coords, tube, ts.bone_marrow, edge, shrink=1.4)
    h = hilum(an)
    bronchi, central = central_tubes(an, h)
    for tube in central:
        _paint_tube(ct, coords, tube, ts.blood, edge, clear=lung)
    for tube in bronchi:
        _paint_tube(ct, coords, tube, AIRWAY_WALL_HU, edge, clear=lung, grow=2.0)
        _paint_tube(ct, coords, tube, AIR_HU, edge)
    arteries, veins, airways = lung_trees(rng, h, points, TREE_GENERATIONS)
    severity, lesions = draw_lesions(rng, boundary, weights, points, centroid)
    infection = np.zeros(ct.shape, dtype=np.uint8)
    for lesion in lesions:
        if lesion.kind == "ggo":
            paint_lesion(rng, lesion, ct, infection, lung, coords, edge)
    for tube in arteries + veins:
        _paint_tube(ct, coords, tube, ts.blood, edge, weight=lung)
    for lesion in lesions:
        if lesion.kind == "consolidation":
            paint_lesion(rng, lesion, ct, infection, lung, coords, edge)
    for tube in airways:
        _paint_tube(ct, coords, tube, AIRWAY_WALL_HU, edge, weight=lung, grow=0.25 * tube.r0 + 0.5)
        _paint_tube(ct, coords, tube, AIR_HU, edge, weight=lung)
    return severity, lesions, infection


def _slab_masks(shape: tuple[int, ...], n_sub: int, lung: np.ndarray, infection: np.ndarray,
                left_columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lung labels (1 left, 2 right) and the infection mask of the slices: a voxel of a thick slice is inside
    when most of its sub-slices' occupancy is."""
    if n_sub > 1:
        n_z = shape[0] // n_sub
        lung_f = lung.reshape(n_z, n_sub, *shape[1:]).mean(axis=1, dtype=np.float32)
        inf_f = infection.reshape(n_z, n_sub, *shape[1:]).mean(axis=1, dtype=np.float32)
    else:
        lung_f, inf_f = lung, infection
    inside = lung_f >= 127.5
    left = left_columns[None, None, :]
    lungs = np.where(inside, np.where(left, np.uint8(1), np.uint8(2)), np.uint8(0)).astype(np.uint8)
    return lungs, ((inf_f >= 127.5) & inside).astype(np.uint8)


def _paint_tube(ct: np.ndarray, coords: tuple[np.ndarray, np.ndarray, np.ndarray], tube: Tube, value: float,
                edge: float, weight: np.ndarray | None = None, clear: np.ndarray | None = None,
                grow: float = 0.0, shrink: float = 0.0) -> None:
    """Blend ``value`` (HU) along a tube; ``weight`` (uint8 occupancy) restricts it, ``clear`` is erased by it."""
    win, occ = tube_occupancy(*coords, tube.p0, tube.p1, max(tube.r0 + grow - shrink, 0.3),
                              max(tube.r1 + grow - shrink, 0.3), edge)
    if win is None or occ is None:
        return
    if weight is not None:
        occ *= weight[win].astype(np.float32) * np.float32(1.0 / 255.0)
    block = ct[win]
    block += occ * (np.float32(value) - block)
    if clear is not None:
        c = clear[win]
        np.minimum(c, ((1.0 - occ) * 255.0 + 0.5).astype(np.uint8), out=c)


def _coarse_lungs(an: Anatomy, fov: float, rng: np.random.Generator
                  ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[int, np.ndarray],
                             dict[int, np.ndarray]]:
    """Render the lungs on a 4 mm grid; return per side inside points, surface points, their weights, centroid."""
    half = fov / 2.0
    xs = np.arange(-half, half, COARSE_MM, dtype=np.float32)
    ys = np.arange(-half, half, COARSE_MM, dtype=np.float32)
    zs = np.arange(an.z_base, an.z_apex, COARSE_MM, dtype=np.float32)
    occ = np.stack([paint_slice(an, float(z), xs, ys, COARSE_MM, half)[1] for z in zs]) >= 0.5
    from scipy import ndimage

    surface = occ & ~ndimage.binary_erosion(occ)
    zz, yy, xx = np.meshgrid(zs, ys, xs, indexing="ij")
    points: dict[int, np.ndarray] = {}
    boundary: dict[int, np.ndarray] = {}
    weights: dict[int, np.ndarray] = {}
    centroid: dict[int, np.ndarray] = {}
    jitter = COARSE_MM / 2.0
    for side, sel in ((1, xx > an.x_mid), (2, xx <= an.x_mid)):
        inside = occ & sel
        pts = np.stack([zz[inside], yy[inside], xx[inside]], axis=1).astype(np.float64)
        pts += rng.uniform(-jitter, jitter, size=pts.shape)
        if len(pts) > 4000:
            pts = pts[rng.choice(len(pts), 4000, replace=False)]
        points[side] = pts
        centroid[side] = pts.mean(axis=0) if len(pts) else np.zeros(3)
        surf = surface & sel
        b = np.stack([zz[surf], yy[surf], xx[surf]], axis=1).astype(np.float64)
        boundary[side] = b
        if len(b):
            cy, ca, cb = an.cavity(an.z_base + 0.4 * (an.z_apex - an.z_base))
            lateral = np.abs(b[:, 2] - an.x_mid) / ca
            posterior = (b[:, 1] - cy) / cb
            basal = 1.0 - (b[:, 0] - an.z_base) / (an.z_apex - an.z_base)
            weights[side] = np.exp(2.0 * lateral + 1.5 * posterior + 1.0 * basal)
        else:
            weights[side] = np.zeros(0)
    return points, boundary, weights, centroid
