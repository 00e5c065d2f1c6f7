"""Soft (partial-volume) shapes: 2D ellipses on an axial slice and 3D tapered tubes in a volume.

A shape is rendered as an *occupancy* in [0, 1]: ``clip(0.5 - sdf / edge, 0, 1)`` where ``sdf`` is an
approximate signed distance in mm (negative inside) and ``edge`` the width in mm of the partial-volume ramp
(about one pixel, wider for a softer reconstruction kernel). Painting a value ``v`` with occupancy ``a`` blends
``hu += a * (v - hu)``, which is how a voxel half filled by a structure looks in CT.

Shapes are evaluated only inside their bounding window, so a slice costs about the area of the structures it
holds, not ``number of structures x image size``.
"""

from __future__ import annotations

import numpy as np

Window2 = tuple[slice, slice]
Window3 = tuple[slice, slice, slice]

_EPS = 1e-6


def soft(sdf: np.ndarray, edge: float) -> np.ndarray:
    """Occupancy in [0, 1] (float32) of a signed distance ``sdf`` (mm, negative inside) with a ramp ``edge`` mm wide."""
    out = np.multiply(sdf, np.float32(-1.0 / edge), dtype=np.float32)
    out += np.float32(0.5)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _span(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Index range of the sorted 1D ``coords`` (mm) that lies within [lo, hi]."""
    return slice(int(np.searchsorted(coords, lo)), int(np.searchsorted(coords, hi, side="right")))


class SliceCanvas:
    """An axial slice in HU on a grid of column positions ``xs`` and row positions ``ys`` (mm).

    Args:
        xs: column centres (mm, patient's right -> left), increasing.
        ys: row centres (mm, anterior -> posterior), increasing.
        edge: partial-volume ramp width (mm).
        fill: initial value (HU).
    """

    def __init__(self, xs: np.ndarray, ys: np.ndarray, edge: float, fill: float) -> None:
        self.xs = xs.astype(np.float32)
        self.ys = ys.astype(np.float32)
        self.edge = float(edge)
        self.hu = np.full((len(ys), len(xs)), fill, dtype=np.float32)

    def window(self, cx: float, cy: float, rx: float, ry: float) -> Window2:
        """Rows and columns covering the box centre ``(cx, cy)``, half sizes ``(rx, ry)`` mm, plus the edge."""
        pad = self.edge
        return _span(self.ys, cy - ry - pad, cy + ry + pad), _span(self.xs, cx - rx - pad, cx + rx + pad)

    def grid(self, win: Window2) -> tuple[np.ndarray, np.ndarray]:
        """Broadcastable ``(x, y)`` coordinates (mm) of a window: shapes ``(1, w)`` and ``(h, 1)``."""
        return self.xs[win[1]][None, :], self.ys[win[0]][:, None]

    def ellipse(self, cx: float, cy: float, a: float, b: float, angle: float = 0.0,
                edge: float | None = None) -> tuple[Window2, np.ndarray]:
        """Occupancy of an ellipse centred at ``(cx, cy)`` with half axes ``a`` (along x) and ``b`` (along y), mm.

        ``angle`` (radians) rotates the ellipse; the distance is the first-order approximation
        ``(r - 1) / |grad r|`` (exact for circles, accurate near the boundary, right sign everywhere).
        """
        edge = self.edge if edge is None else edge
        reach = max(a, b) if angle else 0.0
        win = self.window(cx, cy, reach or a, reach or b)
        x, y = self.grid(win)
        x = x - np.float32(cx)
        y = y - np.float32(cy)
        if angle:
            c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
            x, y = x * c + y * s, y * c - x * s
        return win, soft(ellipse_sdf(x, y, a, b), edge)

    def capsule(self, p0: tuple[float, float], p1: tuple[float, float], r: float,
                edge: float | None = None) -> tuple[Window2, np.ndarray]:
        """Occupancy of a 2D capsule (a thick segment) from ``p0`` to ``p1`` (``(x, y)`` mm) with radius ``r``."""
        edge = self.edge if edge is None else edge
        cx, cy = (p0[0] + p1[0]) / 2, (p0[1] + p1[1]) / 2
        win = self.window(cx, cy, abs(p1[0] - p0[0]) / 2 + r, abs(p1[1] - p0[1]) / 2 + r)
        x, y = self.grid(win)
        dx, dy = p1[0] - p0[0], p1[1] - p0[1]
        length2 = dx * dx + dy * dy + _EPS
        px, py = x - np.float32(p0[0]), y - np.float32(p0[1])
        t = np.clip(px * np.float32(dx / length2) + py * np.float32(dy / length2), 0.0, 1.0)
        dist = np.sqrt((px - t * np.float32(dx)) ** 2 + (py - t * np.float32(dy)) ** 2)
        return win, soft(dist - np.float32(r), edge)

    def paint(self, win: Window2, occ: np.ndarray, value: float | np.ndarray) -> None:
        """Blend ``value`` (HU, scalar or window-shaped array) into the window with occupancy ``occ``."""
        h = self.hu[win]
        h += occ * (value - h)


def ellipse_sdf(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipse centred at the origin (half axes ``a``, ``b``)."""
    u = x * np.float32(1.0 / a)
    v = y * np.float32(1.0 / b)
    r = np.sqrt(u * u + v * v)
    g = np.sqrt((u * np.float32(1.0 / a)) ** 2 + (v * np.float32(1.0 / b)) ** 2) / np.maximum(r, _EPS)
    np.clip(g, 1.0 / max(a, b), 1.0 / min(a, b), out=g)
    return (r - 1.0) / g


def tube_occupancy(zs: np.ndarray, ys: np.ndarray, xs: np.ndarray, p0: np.ndarray, p1: np.ndarray,
                   r0: float, r1: float, edge: float) -> tuple[Window3 | None, np.ndarray | None]:
    """Occupancy of a tapered tube (a capsule) from ``p0`` to ``p1`` (mm, order ``(z, y, x)``), radii ``r0 -> r1``.

    Args:
        zs, ys, xs: voxel-centre coordinates (mm) of the volume's three axes, increasing.
        p0, p1: end points (mm) as ``(z, y, x)``.
        r0, r1: radius (mm) at ``p0`` and ``p1``.
        edge: partial-volume ramp width (mm).

    Returns:
        ``(window, occupancy)`` with ``occupancy`` of the window's shape, or ``(None, None)`` if the tube misses
        the volume.
    """
    rmax = max(r0, r1) + edge
    lo = np.minimum(p0, p1) - rmax
    hi = np.maximum(p0, p1) + rmax
    win = (_span(zs, lo[0], hi[0]), _span(ys, lo[1], hi[1]), _span(xs, lo[2], hi[2]))
    if any(s.stop <= s.start for s in win):
        return None, None
    d = (p1 - p0).astype(np.float32)
    length2 = float(d @ d) + _EPS
    z = (zs[win[0]] - np.float32(p0[0]))[:, None, None]
    y = (ys[win[1]] - np.float32(p0[1]))[None, :, None]
    x = (xs[win[2]] - np.float32(p0[2]))[None, None, :]
    t = (z * np.float32(d[0] / length2) + y * np.float32(d[1] / length2)) + x * np.float32(d[2] / length2)
    np.clip(t, 0.0, 1.0, out=t)
    dz = z - t * np.float32(d[0])
    dy = y - t * np.float32(d[1])
    dx = x - t * np.float32(d[2])
    dist = np.sqrt(dz * dz + dy * dy + dx * dx)
    radius = np.float32(r0) + t * np.float32(r1 - r0)
    return win, soft(dist - radius, edge)
