"""Perturbations of a real CT that real scanners and protocols bring, for testing the lung stage on them.

Each takes a canonical ``(D, H, W)`` CT in HU (and, where needed, its spacing or masks) and returns a new array;
the input is never modified. They stand in for scans no one has at hand: a field of view padded with -3024 HU, a
5 mm reconstruction, a couch moved against the patient's back or to the other side (prone), a solid tumour against
the pleura or a consolidation flattened along it, a bulla, lower-lobe emphysema, a colon full of gas, the white
noise of a lower dose, a sharper reconstruction kernel. The lesion and effusion makers (:func:`pleural_lesion`,
:func:`subpleural_patch`, :func:`bulla`, :func:`pleural_effusion`) return masks to paint with :func:`add_blob`.
Crops to the bases, the apices or the abdomen are plain slicing (``hu[lo:hi]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TISSUE_HU = 40.0
"""Density of an inserted solid lesion (HU: soft tissue, a tumour or a consolidation)."""
GAS_HU = -1000.0
"""Density of inserted gas (HU)."""


def pad_outside_fov(hu: np.ndarray, value: float, radius_fraction: float = 0.5) -> np.ndarray:
    """The CT with every pixel outside a centred circle set to ``value`` (a scanner's padding outside its field of
    view: -1024, -2048 or -3024 HU). ``radius_fraction`` is the circle's radius over the slice width."""
    h, w = hu.shape[1:]
    y, x = np.ogrid[:h, :w]
    outside = (y - (h - 1) / 2.0) ** 2 + (x - (w - 1) / 2.0) ** 2 > (radius_fraction * w) ** 2
    out = np.array(hu, dtype=np.float32, copy=True)
    out[:, outside] = np.float32(value)
    return out


def thick_slices(hu: np.ndarray, spacing: Sequence[float], thickness_mm: float
                 ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A thick-slice reconstruction: the mean of each run of ``round(thickness_mm / spacing[0])`` slices (a slab
    average, what a scanner's thick reconstruction is close to). Returns the CT and its spacing (mm)."""
    k = max(1, int(round(thickness_mm / float(spacing[0]))))
    d = hu.shape[0] // k * k
    out = np.asarray(hu[:d], dtype=np.float32).reshape(d // k, k, *hu.shape[1:]).mean(axis=1, dtype=np.float32)
    return out, (float(spacing[0]) * k, float(spacing[1]), float(spacing[2]))


def _couch(hu: np.ndarray, body: np.ndarray, tissue_hu: float) -> np.ndarray:
    return (hu > tissue_hu) & ~body


def move_couch(hu: np.ndarray, body: np.ndarray, rows: int, tissue_hu: float = -500.0) -> np.ndarray:
    """The couch (everything denser than ``tissue_hu`` outside ``body``) moved by ``rows`` rows (negative: up,
    towards the anterior), air where it was; where it lands on the body, the body stays."""
    couch = _couch(hu, body, tissue_hu)
    out = np.array(hu, dtype=np.float32, copy=True)
    out[couch] = np.float32(GAS_HU)
    moved = np.roll(couch, rows, axis=1)
    src = np.roll(np.asarray(hu, dtype=np.float32), rows, axis=1)
    if rows < 0:
        moved[:, rows:] = False
    elif rows > 0:
        moved[:, :rows] = False
    place = moved & ~body
    out[place] = src[place]
    return out


def mirror_couch(hu: np.ndarray, body: np.ndarray, tissue_hu: float = -500.0) -> np.ndarray:
    """The couch (everything denser than ``tissue_hu`` outside ``body``) mirrored to the other side of the image
    (top to bottom): a prone scan's couch, in front of the patient; where it lands on the body, the body stays."""
    couch = _couch(hu, body, tissue_hu)
    out = np.array(hu, dtype=np.float32, copy=True)
    out[couch] = np.float32(GAS_HU)
    flipped = couch[:, ::-1, :]
    place = flipped & ~body
    out[place] = np.asarray(hu, dtype=np.float32)[:, ::-1, :][place]
    return out


def ellipsoid(shape: Sequence[int], spacing: Sequence[float], centre: Sequence[float],
              radii_mm: Sequence[float]) -> np.ndarray:
    """``(D, H, W)`` bool ellipsoid around ``centre`` (voxel indices) with semi-axes ``radii_mm`` (mm)."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    dist = sum(((g - c) * s / r) ** 2 for g, c, s, r in zip((z, y, x), centre, spacing, radii_mm, strict=True))
    return np.asarray(dist <= 1.0)


def add_noise(hu: np.ndarray, sigma_hu: float, seed: int = 0) -> np.ndarray:
    """The CT plus white Gaussian noise of ``sigma_hu`` (HU) in every voxel: a noisier scan (a lower dose, a sharper
    reconstruction kernel), as a float32 copy; values below -1024 HU (padding) are left as they were."""
    out = np.array(hu, dtype=np.float32, copy=True)
    inside = out >= -1024.0
    out[inside] += np.random.default_rng(seed).normal(0.0, sigma_hu, int(inside.sum())).astype(np.float32)
    return out


def sharpen(hu: np.ndarray, amount: float, sigma_px: float = 1.0) -> np.ndarray:
    """The CT as a sharper reconstruction kernel (a lung or bone kernel) would give it, roughly: each axial slice
    plus ``amount`` times its detail above a Gaussian of ``sigma_px`` pixels (an unsharp mask), which boosts the
    scan's own noise and overshoots at edges, as sharp kernels do. A float32 copy; padding (below -1024 HU) is
    left as it was and taken as air for the blur."""
    from scipy import ndimage

    if sigma_px <= 0:
        raise ValueError(f"sigma_px {sigma_px}: expected > 0")
    out = np.array(hu, dtype=np.float32, copy=True)
    padding = out < -1024.0
    base = np.where(padding, np.float32(-1024.0), out)
    detail = base - ndimage.gaussian_filter(base, (0.0, sigma_px, sigma_px))
    out[~padding] += np.float32(amount) * detail[~padding]
    return out


def soft_tissue_noise_hu(hu: np.ndarray, window: int = 7) -> float:
    """The scan's noise: the median, over the pixels of the middle axial slice whose ``window`` x ``window`` mean
    is soft tissue (0-80 HU), of the standard deviation in that window (HU)."""
    from scipy import ndimage

    plane = np.asarray(hu[hu.shape[0] // 2], dtype=np.float64)
    mean = ndimage.uniform_filter(plane, window)
    sd = np.sqrt(np.maximum(ndimage.uniform_filter(plane * plane, window) - mean * mean, 0.0))
    tissue = (mean > 0.0) & (mean < 80.0)
    return float(np.median(sd[tissue])) if tissue.any() else float("nan")


def add_blob(hu: np.ndarray, blob: np.ndarray, value: float, noise_hu: float = 20.0, seed: int = 0) -> np.ndarray:
    """The CT with ``blob`` set to ``value`` plus Gaussian noise of ``noise_hu`` (HU)."""
    rng = np.random.default_rng(seed)
    out = np.array(hu, dtype=np.float32, copy=True)
    out[blob] = (value + rng.normal(0.0, noise_hu, int(blob.sum()))).astype(np.float32)
    return out


def _lung_slices(lung: np.ndarray, caller: str) -> np.ndarray:
    """The axial slices holding ``lung``, in order; ``ValueError`` naming ``caller`` when there are none."""
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    if zs.size == 0:
        raise ValueError(f"{caller}: empty lung mask")
    return zs


def pleural_lesion(lung: np.ndarray, spacing: Sequence[float], radius_mm: float, side: str = "lateral",
                   z: int | None = None, radii_mm: Sequence[float] | None = None,
                   inset_mm: float | None = None) -> np.ndarray:
    """A sphere of ``radius_mm`` inside ``lung`` touching its pleura: in slice ``z`` (default: the lung's middle
    slice), the lung's most lateral (``side="lateral"``, away from the image's centre) or most posterior
    (``"posterior"``) pixel on the row (column) through the lung's centre, moved inwards by the radius. Returns the
    sphere's voxels that lie in ``lung`` (the lesion a lung mask must keep).

    ``radii_mm`` (z, y, x semi-axes) makes it an ellipsoid and ``inset_mm`` moves its centre that far inwards
    instead: a centre closer to the pleura than the semi-axis across it gives a sub-pleural patch flattened along
    the chest wall (the ellipsoid's part in ``lung``), the typical COVID-19 consolidation."""
    zs = _lung_slices(lung, "pleural_lesion")
    z = int((zs[0] + zs[-1]) // 2) if z is None else int(z)
    radii = (radius_mm,) * 3 if radii_mm is None else tuple(float(r) for r in radii_mm)
    rows, cols = np.nonzero(lung[z])
    cy, cx = float(rows.mean()), float(cols.mean())
    if side == "lateral":
        inset = radii[2] if inset_mm is None else inset_mm
        row = int(round(cy))
        line = np.flatnonzero(lung[z, row])
        outward = 1 if cx > lung.shape[2] / 2.0 else -1
        edge = float(line.max() if outward > 0 else line.min())
        centre = (float(z), float(row), edge - outward * inset / float(spacing[2]))
    elif side == "posterior":
        inset = radii[1] if inset_mm is None else inset_mm
        col = int(round(cx))
        line = np.flatnonzero(lung[z, :, col])
        centre = (float(z), float(line.max()) - inset / float(spacing[1]), float(col))
    else:
        raise ValueError(f"pleural_lesion: side {side!r}: use 'lateral' or 'posterior'")
    return ellipsoid(lung.shape, spacing, centre, radii) & lung


PATCH_RADII_MM = {"posterior": (30.0, 20.0, 45.0), "lateral": (30.0, 45.0, 20.0)}
"""Semi-axes (z, y, x) of :func:`subpleural_patch`: 60 mm high, 90 mm along the chest wall."""
PATCH_INSET_MM = 5.0
"""How far inside the pleura :func:`subpleural_patch` is centred: its part in the lung is about 25 mm thick."""


def height_slice(lung: np.ndarray, fraction: float) -> int:
    """The axial slice at ``fraction`` of ``lung``'s height (0 its lowest slice, 1 its highest)."""
    zs = _lung_slices(lung, "height_slice")
    return int(zs[0] + fraction * (zs[-1] - zs[0]))


def bulla(lung: np.ndarray, spacing: Sequence[float], side: str = "central", z: int | None = None,
          radius_mm: float = 20.0) -> np.ndarray:
    """An emphysematous bulla's voxels in ``lung`` (paint them at about -990 HU): a sphere against the pleura
    (``side`` ``"lateral"`` or ``"posterior"``, :func:`pleural_lesion`) or around the centre of slice ``z`` of the
    lung (``"central"``; default slice: the lung's middle)."""
    if side != "central":
        return pleural_lesion(lung, spacing, radius_mm, side, z=z)
    z = height_slice(lung, 0.5) if z is None else int(z)
    rows, cols = np.nonzero(lung[z])
    centre = (float(z), float(rows.mean()), float(cols.mean()))
    return ellipsoid(lung.shape, spacing, centre, (radius_mm,) * 3) & lung


def subpleural_patch(lung: np.ndarray, spacing: Sequence[float], side: str = "posterior",
                     z: int | None = None) -> np.ndarray:
    """A COVID-19-like consolidation flattened along the posterior or lateral chest wall of ``lung``:
    :func:`pleural_lesion` with :data:`PATCH_RADII_MM` and :data:`PATCH_INSET_MM`."""
    if side not in PATCH_RADII_MM:
        raise ValueError(f"subpleural_patch: side {side!r}: use 'lateral' or 'posterior'")
    return pleural_lesion(lung, spacing, 0.0, side, z=z, radii_mm=PATCH_RADII_MM[side], inset_mm=PATCH_INSET_MM)


def emphysema(hu: np.ndarray, lung: np.ndarray, below_fraction: float = 0.5, shift_hu: float = -120.0) -> np.ndarray:
    """The CT with the aerated lung (below -500 HU) of ``lung``'s lowest ``below_fraction`` of slices made darker
    by ``shift_hu`` (floor -1024 HU): lower-lobe emphysema, much of it below -950 HU."""
    _lung_slices(lung, "emphysema")
    out = np.array(hu, dtype=np.float32, copy=True)
    lower = np.zeros(lung.shape, dtype=bool)
    lower[: height_slice(lung, below_fraction) + 1] = True
    region = lung & lower & (out < -500.0)
    out[region] = np.maximum(out[region] + shift_hu, -1024.0)
    return out


def pleural_effusion(lung: np.ndarray, spacing: Sequence[float], depth_mm: float = 30.0,
                     height_fraction: float = 0.4) -> np.ndarray:
    """A layering pleural effusion of ``lung`` (supine): in the lowest ``height_fraction`` of its slices, the
    lung's posterior part of each column, from 0 mm thick at the top of that range to ``depth_mm`` at the lowest
    slice. Returns those voxels (fluid, outside the lung of an expert's contour; set them to about 10 HU)."""
    zs = _lung_slices(lung, "pleural_effusion")
    top = zs[0] + height_fraction * (zs[-1] - zs[0])
    rows = np.arange(lung.shape[1])[:, None]
    out = np.zeros(lung.shape, dtype=bool)
    for z in zs[zs <= top]:
        thickness = depth_mm * (top - z) / max(top - zs[0], 1.0) / float(spacing[1])
        present = lung[z].any(axis=0)
        last = np.where(present, lung.shape[1] - 1 - np.argmax(lung[z][::-1], axis=0), -1)  # most posterior row
        out[z] = lung[z] & (rows > last[None, :] - thickness) & present[None, :]
    return out
