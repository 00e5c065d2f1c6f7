"""The lung stage's working grid: block means, nearest-neighbour upsampling, a threaded 3D opening, boxes.

The classical lung extraction (:mod:`covidseg.inference.lungs`) runs on block means of the CT at about
``LungConfig.work_spacing_mm`` and its body mask on a grid twice as coarse in-plane; these helpers move masks
between the grids.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

Box = tuple[slice, slice, slice]
"""A box of a canonical ``(D, H, W)`` volume."""

SLICE_2D = np.zeros((3, 3, 3), dtype=bool)
SLICE_2D[1] = ndimage.generate_binary_structure(2, 1)
"""Connectivity within an axial slice only (labels every slice of a stack at once)."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def work_factors(spacing: Sequence[float], work_spacing_mm: float) -> tuple[int, int, int]:
    """Integer block sizes ``(D, H, W)`` bringing ``spacing`` (mm) up to about ``work_spacing_mm``.

    In-plane the smallest integer factor that brings the pixel to at least three quarters of the work spacing
    (0.78 mm pixels, the most common, become 1.56 mm; 1.07 mm pixels 2.15 mm: at full resolution they would be
    4x the voxels and 3-4x the time); through-plane only a whole multiple that stays at most the work spacing
    (slices are merged only when at least two fit in it), so the per-slice steps see each slice of a thin-slice
    CT."""
    d = max(1, int(math.floor(work_spacing_mm / spacing[0] + 1e-6)))
    h, w = (max(1, int(math.ceil(0.75 * work_spacing_mm / s - 1e-6))) for s in spacing[1:])
    return (d, h, w)


def block_mean(volume: np.ndarray, factors: Sequence[int], floor: float | None = None) -> np.ndarray:
    """Mean over ``factors``-sized blocks (the volume is edge-padded to a multiple first); float32.

    Args:
        volume: ``(D, H, W)`` array.
        factors: block size per axis.
        floor: values below it count as ``floor`` (the padding outside a scanner's field of view, -2048 or
            -3024 HU, counts as air, -1024 HU, instead of darkening the blocks it shares with the body).
    """
    if all(f == 1 for f in factors):
        out1 = np.array(volume, dtype=np.float32, copy=True)
        if floor is not None:
            np.maximum(out1, np.float32(floor), out=out1)
        return out1
    pad = [(0, (-n) % f) for n, f in zip(volume.shape, factors, strict=True)]
    v = np.pad(volume, pad, mode="edge") if any(p[1] for p in pad) else volume
    # the sum of the blocks' strided sub-grids, then one division: the same values as a reshape-mean (exactly for
    # integer HU) in a third of its time
    fd, fh, fw = factors
    out: np.ndarray | None = None
    for od, oh, ow in itertools.product(range(fd), range(fh), range(fw)):
        part = v[od::fd, oh::fh, ow::fw]
        if floor is not None:
            part = np.maximum(part, np.float32(floor), dtype=np.float32)
        if out is None:
            out = part.astype(np.float32, copy=True)
        else:
            out += part
    assert out is not None
    out /= np.float32(fd * fh * fw)
    return out


def upsample_labels(labels: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour upsampling by integer ``factors``, cropped to ``shape``."""
    out = labels
    for axis, f in enumerate(factors):
        if f > 1:
            out = np.repeat(out, f, axis=axis)
    return np.ascontiguousarray(out[: shape[0], : shape[1], : shape[2]])


def binary_opening(mask: np.ndarray, iterations: int = 1, workers: int | None = None) -> np.ndarray:
    """``scipy.ndimage.binary_opening`` with the 6-connected structure, in slabs along axis 0 on several threads.

    Each slab is opened with a halo of ``2 * iterations`` slices (how far an erosion then a dilation can carry a
    change), so the result equals the whole-volume opening voxel for voxel; scipy releases the GIL, so the slabs run
    in parallel. ``workers`` defaults to the available cores.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    n = mask.shape[0]
    workers = max(1, min(workers or available_cores(), n // 16))  # slabs of at least 16 slices
    if workers == 1:
        return ndimage.binary_opening(mask, structure=structure, iterations=iterations)
    halo = 2 * iterations
    edges = np.linspace(0, n, workers + 1).astype(int)
    out = np.empty_like(mask, dtype=bool)

    def slab(k: int) -> None:
        lo, hi = int(edges[k]), int(edges[k + 1])
        a, b = max(lo - halo, 0), min(hi + halo, n)
        opened = ndimage.binary_opening(mask[a:b], structure=structure, iterations=iterations)
        out[lo:hi] = opened[lo - a : hi - a]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(slab, range(workers)))
    return out


def bbox(mask: np.ndarray, margin: Sequence[int]) -> Box | None:
    """Bounding box of ``mask`` grown by ``margin`` voxels per axis, clipped to the volume; ``None`` when empty."""
    from covidseg.inference.sliding_window import mask_box

    return mask_box(mask, margin)


def components(mask: np.ndarray, min_voxels: int, structure: np.ndarray | None = None) -> list[np.ndarray]:
    """Components of ``mask`` (6-connected unless ``structure`` says otherwise) with at least ``min_voxels``
    voxels, largest first."""
    labels, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return [labels == int(i) for i in np.argsort(sizes)[::-1] if sizes[i] >= min_voxels]


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """``mask`` with the holes of each axial slice filled: the background regions of a slice (4-connected) that do
    not touch its border. The same as ``scipy.ndimage.binary_fill_holes`` slice by slice, by one labelling of the
    stack (several times faster on a CT)."""
    labels, n = ndimage.label(~mask, structure=SLICE_2D)
    outside = np.zeros(n + 1, dtype=bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[face] = True
    outside[0] = True
    return mask | ~outside[labels]


def octagon_closing(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Closing of each axial slice of ``mask`` by an octagon of about ``radius_px`` pixels' radius (a disk's
    stand-in): a diamond of ``a`` steps (4-connected iterations) and a square of ``b`` steps (8-connected), with
    ``a = 0.586 r`` and ``a + b = r``, so that the octagon's axial and diagonal extents both match the disk's.
    Iterated 3x3 steps are several times faster in scipy than one large disk. ``mask`` is padded by the radius,
    so nothing is cut at the array's border."""
    r = max(int(round(radius_px)), 1)
    a = int(round(2.0 * radius_px * (1.0 - 1.0 / math.sqrt(2.0))))
    b = max(r - a, 0)
    square = np.zeros((3, 3, 3), dtype=bool)
    square[1] = True
    pad = ((0, 0), (r + 1, r + 1), (r + 1, r + 1))
    out = np.pad(mask, pad)
    for structure, steps in ((SLICE_2D, a), (square, b)):
        if steps:
            out = ndimage.binary_dilation(out, structure=structure, iterations=steps)
    for structure, steps in ((SLICE_2D, a), (square, b)):
        if steps:
            out = ndimage.binary_erosion(out, structure=structure, iterations=steps, border_value=1)
    return out[:, r + 1 : -(r + 1), r + 1 : -(r + 1)]


def convex_hull_2d(mask: np.ndarray) -> np.ndarray:
    """Convex hull of a 2D mask: :func:`convex_hulls` of one slice."""
    return convex_hulls(mask[None])[0]


def convex_hulls(stack: np.ndarray) -> np.ndarray:
    """Convex hull of each axial slice of ``stack``: the pixels whose centres lie in the hull of the pixels' edge
    midpoints, the definition of ``skimage.morphology.convex_hull_image`` (its reference in the tests). The
    candidate points (first and last pixel of each row and column) and the rasterisation (a convex polygon covers
    one run of each row) are done for all slices at once, qhull once per slice: several times faster.

    Args:
        stack: ``(D, H, W)`` bool.

    Returns:
        ``(D, H, W)`` bool; an empty slice stays empty.
    """
    from scipy.spatial import ConvexHull, QhullError

    d, h, w = stack.shape
    out = np.zeros(stack.shape, dtype=bool)
    row_any, col_any = np.asarray(stack.any(axis=2)), np.asarray(stack.any(axis=1))  # (D, H), (D, W)
    first_c, last_c = stack.argmax(axis=2), w - 1 - stack[:, :, ::-1].argmax(axis=2)
    first_r, last_r = stack.argmax(axis=1), h - 1 - stack[:, ::-1, :].argmax(axis=1)
    offsets = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])
    width = 2 * w + 3
    hulls: list[np.ndarray | None] = []
    for z in range(d):
        rows, cols = np.flatnonzero(row_any[z]), np.flatnonzero(col_any[z])
        if rows.size == 0:
            hulls.append(None)
            continue
        pts = np.concatenate([np.stack([rows, first_c[z, rows]], 1), np.stack([rows, last_c[z, rows]], 1),
                              np.stack([first_r[z, cols], cols], 1), np.stack([last_r[z, cols], cols], 1)])
        # the edge midpoints of each candidate pixel, without repeats (repeated points can upset qhull): on the
        # half-pixel grid every point is one integer key
        twice = (2 * pts[:, None, :] + offsets).reshape(-1, 2)
        keys = np.unique((twice[:, 0] + 1) * width + twice[:, 1] + 1)
        half = np.stack([keys // width - 1, keys % width - 1], axis=1) / 2.0
        try:
            hulls.append(half[ConvexHull(half).vertices])
        except QhullError:  # a line of pixels: its own hull
            hulls.append(None)
            out[z] = stack[z]
    _rasterise_hulls(hulls, out)
    return out


def _rasterise_hulls(hulls: list[np.ndarray | None], out: np.ndarray) -> None:
    """Fill ``out[z]`` with the convex polygon ``hulls[z]`` (``(V, 2)`` row, column vertices in order; ``None``:
    leave the slice): each row's run between its crossings of the polygon's edges, for all slices at once."""
    zs = [z for z, v in enumerate(hulls) if v is not None]
    if not zs:
        return
    n = max(len(hulls[z]) for z in zs)  # type: ignore[arg-type]
    verts = np.full((len(zs), n + 1, 2), np.nan)
    for k, z in enumerate(zs):
        v = hulls[z]
        assert v is not None
        verts[k, : len(v)] = v
        verts[k, len(v) :] = v[0]  # closed: the padding repeats the first vertex (zero-length edges)
    y0, x0 = verts[:, :-1, 0][:, None, :], verts[:, :-1, 1][:, None, :]  # (K, 1, V)
    y1, x1 = verts[:, 1:, 0][:, None, :], verts[:, 1:, 1][:, None, :]
    y = np.arange(out.shape[1], dtype=np.float64)[None, :, None]  # (1, H, 1)
    dy = y1 - y0
    eps = 1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (y - y0) / np.where(dy == 0, np.nan, dy)
        x = x0 + t * (x1 - x0)
    ok = (t >= -eps) & (t <= 1 + eps)
    lo = np.where(ok, x, np.inf).min(axis=2)  # (K, H)
    hi = np.where(ok, x, -np.inf).max(axis=2)
    c = np.arange(out.shape[2], dtype=np.float64)
    out[zs] = (c[None, None, :] >= lo[:, :, None] - eps) & (c[None, None, :] <= hi[:, :, None] + eps)
