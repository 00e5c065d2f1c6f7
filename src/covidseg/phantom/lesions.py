"""COVID-19 pneumonia lesions: ground-glass opacities and consolidations, often peripheral and sub-pleural.

Typical CT findings (Bernheim et al., Radiology 2020; Pan et al., Radiology 2020): bilateral, multifocal
ground-glass opacities (GGO, about -700 to -300 HU, vessels still visible through them) with a peripheral,
posterior and basal predominance, and in later or severe disease consolidations (about -100 to +50 HU, vessels
hidden, air bronchograms). Consolidations that lie against the pleura are the classical trap of threshold-based
lung extraction (issue 5): they are not air, so a threshold cuts them - and the infection - out of the lung.
Every phantom with lesions therefore holds at least one consolidation touching the costal pleura.

A lesion is an ellipsoid whose surface is perturbed by a smooth random field (lobulated, irregular margins) and
whose inside carries a smooth texture; it is clipped to the lung, so it is part of the lung mask as in expert masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covidseg.phantom.shapes import soft

SEVERITIES: tuple[tuple[str, float, tuple[int, int], tuple[float, float]], ...] = (
    # name, probability, number of foci (min, max), focus radius (mm, min, max)
    ("none", 0.15, (0, 0), (0.0, 0.0)),
    ("mild", 0.35, (2, 4), (8.0, 20.0)),
    ("moderate", 0.30, (4, 8), (12.0, 30.0)),
    ("severe", 0.20, (7, 12), (18.0, 38.0)),
)
"""Involvement classes from none to large; the consolidations are drawn in addition to these GGO foci."""
GGO_HU = (-650.0, -380.0)
"""Range of the mean value of a ground-glass opacity (HU); texture and soft edges spread it to about -700..-300."""
CONSOLIDATION_HU = (-60.0, 35.0)
"""Range of the mean value of a consolidation (HU); with texture and noise about -100..+50."""
_FIELD_NODES = 6
"""Nodes per axis of the low-resolution random field that perturbs a lesion's surface and texture."""


@dataclass(frozen=True)
class Lesion:
    """One lesion (mm, ``(z, y, x)``)."""

    kind: str
    """``"ggo"`` or ``"consolidation"``."""
    center: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    """3 x 3; rows are the lesion's axes in ``(z, y, x)``."""
    hu: float
    edge: float
    """Width (mm) of the soft margin."""
    subpleural: bool
    side: int
    """1 = left lung, 2 = right lung."""


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _pleural_frame(normal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation whose first axis is ``normal`` (so a small first radius makes the lesion lie along the pleura)."""
    a = rng.standard_normal(3)
    a -= (a @ normal) * normal
    a /= np.linalg.norm(a) + 1e-9
    return np.stack([normal, a, np.cross(normal, a)])


def draw_lesions(rng: np.random.Generator, boundary: dict[int, np.ndarray], weights: dict[int, np.ndarray],
                 inside: dict[int, np.ndarray], centroid: dict[int, np.ndarray]) -> tuple[str, list[Lesion]]:
    """Draw the severity class and the lesions of one case.

    Args:
        rng: random generator.
        boundary: per side (1 left, 2 right), points (mm) on the lung surface.
        weights: per side, preference of each boundary point (posterior, lateral and basal are favoured).
        inside: per side, points (mm) inside the lung.
        centroid: per side, the lung's centroid (mm).

    Returns:
        ``(severity, lesions)``.
    """
    probs = np.array([s[1] for s in SEVERITIES])
    name, _, (n_lo, n_hi), (r_lo, r_hi) = SEVERITIES[int(rng.choice(len(SEVERITIES), p=probs / probs.sum()))]
    lesions: list[Lesion] = []
    if name == "none":
        return name, lesions
    sides = [s for s in (1, 2) if len(boundary.get(s, ())) > 0]
    if not sides:
        return "none", lesions

    def pleural_point(side: int) -> tuple[np.ndarray, np.ndarray]:
        w = weights[side] / weights[side].sum()
        p = boundary[side][rng.choice(len(w), p=w)]
        inward = centroid[side] - p
        inward /= np.linalg.norm(inward) + 1e-9
        return p, inward

    n_foci = int(rng.integers(n_lo, n_hi + 1))
    for _ in range(n_foci):
        side = int(rng.choice(sides))
        r = rng.uniform(r_lo, r_hi)
        if rng.random() < 0.75:
            p, inward = pleural_point(side)
            center = p + inward * r * rng.uniform(0.1, 0.5)
            rot = _pleural_frame(inward, rng)
            radii = r * np.array([rng.uniform(0.5, 0.8), rng.uniform(0.9, 1.3), rng.uniform(0.9, 1.6)])
            sub = True
        else:
            pts = inside[side]
            center = pts[rng.integers(len(pts))]
            rot = _random_rotation(rng)
            radii = r * rng.uniform(0.7, 1.2, size=3)
            sub = False
        lesions.append(Lesion("ggo", center, radii, rot, rng.uniform(*GGO_HU), rng.uniform(4.0, 8.0), sub, side))
    n_cons = {"mild": 1, "moderate": int(rng.integers(1, 3)), "severe": int(rng.integers(2, 5))}[name]
    for i in range(n_cons):
        side = int(rng.choice(sides))
        r = rng.uniform(0.6 * r_lo + 4.0, 0.7 * r_hi + 4.0)
        p, inward = pleural_point(side)
        # the first consolidation always sits on the pleura (the extraction trap); later ones mostly do
        center = p + inward * r * (rng.uniform(-0.1, 0.25) if i == 0 or rng.random() < 0.7 else 1.2)
        rot = _pleural_frame(inward, rng)
        radii = r * np.array([rng.uniform(0.5, 0.8), rng.uniform(0.8, 1.2), rng.uniform(0.9, 1.5)])
        hu = rng.uniform(*CONSOLIDATION_HU)
        # a ground-glass halo around the dense core
        lesions.append(Lesion("ggo", center, radii * 1.35, rot, rng.uniform(*GGO_HU), 4.0, True, side))
        lesions.append(Lesion("consolidation", center, radii, rot, hu, rng.uniform(1.0, 2.0), True, side))
    return name, lesions


def _interp_matrix(n: int, nodes: int) -> np.ndarray:
    """``(n, nodes)`` weights of linear interpolation from ``nodes`` evenly spread nodes onto ``n`` points."""
    pos = (np.arange(n, dtype=np.float32) + 0.5) * (nodes / n) - 0.5
    pos = np.clip(pos, 0.0, nodes - 1.0)
    lo = np.minimum(pos.astype(np.int64), nodes - 2)
    frac = pos - lo
    m = np.zeros((n, nodes), dtype=np.float32)
    m[np.arange(n), lo] = 1.0 - frac
    m[np.arange(n), lo + 1] = frac
    return m


def _field(rng: np.random.Generator, shape: tuple[int, ...], nodes: int = _FIELD_NODES) -> np.ndarray:
    """Smooth random field of unit-ish amplitude on ``shape``: a coarse grid upsampled (tri)linearly.

    Equivalent to ``scipy.ndimage.zoom(coarse, ..., order=1, grid_mode=True, mode="nearest")`` (the test compares
    them) but done as three small matrix products, which is about 50 times faster on large boxes.
    """
    coarse = rng.standard_normal(tuple(min(nodes, max(2, s)) for s in shape)).astype(np.float32)
    return upsample_linear(coarse, shape)


def upsample_linear(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear upsampling of a small 3D grid onto ``shape`` (cell-centred, edges held)."""
    mz, my, mx = (_interp_matrix(n, k) for n, k in zip(shape, coarse.shape, strict=True))
    out = np.tensordot(coarse, mx, axes=([2], [1]))          # (kz, ky, W)
    out = np.einsum("yj,ijx->iyx", my, out)                  # (kz, H, W)
    return np.tensordot(mz, out, axes=([1], [0])).astype(np.float32, copy=False)  # (D, H, W)


def paint_lesion(rng: np.random.Generator, lesion: Lesion, ct: np.ndarray, infection: np.ndarray,
                 lung: np.ndarray, coords: tuple[np.ndarray, np.ndarray, np.ndarray], edge_min: float) -> None:
    """Blend one lesion into ``ct`` (HU, in place) and raise ``infection`` (occupancy x 255, uint8) where it lies.

    Args:
        rng: random generator (surface and texture fields).
        lesion: the lesion.
        ct: volume in HU, ``(D, H, W)`` float32.
        infection: lesion occupancy so far, ``(D, H, W)`` uint8 (0..255).
        lung: lung occupancy, ``(D, H, W)`` uint8 (0..255); the lesion is clipped to it.
        coords: voxel-centre positions (mm) of the three axes.
        edge_min: smallest margin width (mm), about one voxel.
    """
    zs, ys, xs = coords
    reach = float(lesion.radii.max()) * 1.25 + lesion.edge
    c = lesion.center
    win = tuple(slice(int(np.searchsorted(a, c[i] - reach)), int(np.searchsorted(a, c[i] + reach)))
                for i, a in enumerate((zs, ys, xs)))
    if any(s.stop <= s.start for s in win):
        return
    w = lung[win]
    if not w.any():
        return
    z = (zs[win[0]] - np.float32(c[0]))[:, None, None]
    y = (ys[win[1]] - np.float32(c[1]))[None, :, None]
    x = (xs[win[2]] - np.float32(c[2]))[None, None, :]
    r2 = np.zeros(w.shape, dtype=np.float32)
    for axis, radius in zip(lesion.rotation, lesion.radii, strict=True):
        a = axis.astype(np.float32) / np.float32(radius)
        u = z * a[0] + y * a[1] + x * a[2]
        r2 += u * u
    rr = np.sqrt(r2)
    bumps = _field(rng, w.shape)
    rr += np.float32(0.3) * bumps
    if lesion.kind == "ggo":  # finer lobulation of the hazy margin
        rr += np.float32(0.12) * _field(rng, w.shape, nodes=12)
    mean_r = float(np.mean(lesion.radii))
    occ = soft((rr - 1.0) * np.float32(mean_r), max(lesion.edge, edge_min))
    occ *= w.astype(np.float32) * np.float32(1.0 / 255.0)
    texture_amp = 45.0 if lesion.kind == "ggo" else 12.0
    value = np.float32(lesion.hu) + np.float32(texture_amp) * _field(rng, w.shape)
    value += np.float32(texture_amp) * _field(rng, w.shape, nodes=16)
    block = ct[win]
    block += occ * (value - block)
    inf = infection[win]
    np.maximum(inf, (occ * 255.0 + 0.5).astype(np.uint8), out=inf)
