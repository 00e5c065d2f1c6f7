"""Intensity conventions of chest CT and the one [0, 1] scale the networks see (docs/method.md).

The real dataset mixes two conventions: the coronacases volumes are in Hounsfield units (HU), the radiopaedia
volumes were already windowed to [-1250, 250] HU and rescaled to [0, 255]. A fixed HU window applied to both is
wrong for half the data, so each volume's convention is detected (or forced with
``IntensityConfig.convention``), mapped to HU, and windowed onto [0, 1] with ``IntensityConfig.window_hu``.

Detection rule (:func:`detect_convention`): a chest CT in HU always holds air (about -1000 HU, padding often
-1024 to -3024 HU), so its minimum lies below ``air_hu`` (-500 HU); a windowed volume lies entirely inside
``windowed_range`` ([0, 255]). Anything else — all zeros, a constant, NaN/Inf, a range that is neither (an MR
image, a CT stored without its rescale intercept, a volume already normalised to [0, 1]) — raises
:class:`~covidseg.errors.InputError` naming the values found and the fix.

:func:`lung_only` builds the report's "lung only" input (Table 5); training and ``segment`` both call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from covidseg.config import IntensityConfig
from covidseg.errors import ConfigError, InputError

Convention = Literal["hu", "windowed"]
CONVENTIONS: tuple[str, ...] = ("hu", "windowed")
RANGE_TOL = 0.5
"""Slack (stored units) on the windowed range's ends: rounding of a [0, 255] volume saved as float."""
NORMALISED_MAX = 1.0
"""A volume whose maximum is at most this is taken to be already normalised (neither HU nor [0, 255])."""


def _where(path: str | Path | None) -> str:
    return f"{path}: " if path is not None else ""


def value_range(array: np.ndarray, path: str | Path | None = None) -> tuple[float, float]:
    """``(min, max)`` of a CT volume; NaN/Inf, all-zero and constant volumes raise InputError."""
    if array.size == 0:
        raise InputError(f"{_where(path)}the volume is empty (shape {array.shape}); give a non-empty CT")
    lo, hi = float(np.min(array)), float(np.max(array))  # NaN propagates through min/max: one pass each
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"{_where(path)}the volume holds NaN or infinite values (range {lo}..{hi}); this is not "
                         f"a CT as stored by a scanner — re-export it, or replace them (e.g. numpy.nan_to_num)")
    if lo == hi:
        what = "all zeros" if lo == 0 else f"constant ({lo:g})"
        raise InputError(f"{_where(path)}the volume is {what}; it holds no image — check that the right file "
                         f"was given and that it was exported completely")
    return lo, hi


def detect_convention(array: np.ndarray, cfg: IntensityConfig | None = None,
                      path: str | Path | None = None) -> Convention:
    """Decide whether a CT volume is in Hounsfield units or pre-windowed to ``[0, 255]``.

    Args:
        array: the volume as stored (any axis order).
        cfg: thresholds (``air_hu``, ``max_hu``, ``windowed_range``); defaults when ``None``.
        path: named in error messages.

    Returns:
        ``"hu"`` when the minimum is below ``cfg.air_hu`` (air present) and the maximum at most ``cfg.max_hu``;
        ``"windowed"`` when every value lies in ``cfg.windowed_range`` (to :data:`RANGE_TOL`).

    Raises:
        InputError: NaN/Inf, all zeros or constant, or a range that is neither convention (MR-like).
    """
    cfg = cfg or IntensityConfig()
    lo, hi = value_range(array, path)
    r0, r1 = cfg.windowed_range
    if lo >= r0 - RANGE_TOL and hi <= r1 + RANGE_TOL:
        if hi <= NORMALISED_MAX:
            raise InputError(
                f"{_where(path)}intensities {lo:.4g}..{hi:.4g} look already normalised to [0, 1], neither HU nor "
                f"windowed [0, 255]; give the original CT (in HU), or scale it to [0, 255] over the "
                f"{list(cfg.windowed_source_hu)} HU window"
            )
        return "windowed"
    if lo <= cfg.air_hu and hi <= cfg.max_hu:
        return "hu"
    raise InputError(
        f"{_where(path)}intensities {lo:.4g}..{hi:.4g} look neither like Hounsfield units (air near -1000 HU) nor "
        f"like a CT windowed to {r0:g}..{r1:g}; this may be an MR image or a CT stored without its rescale "
        f"intercept — convert it to HU, or force it with --set intensity.convention=hu (or windowed)"
    )


def resolve_convention(array: np.ndarray, cfg: IntensityConfig, convention: str | None = None,
                       path: str | Path | None = None) -> Convention:
    """The convention to use: ``convention`` if given, else ``cfg.convention`` unless ``auto``, else detected.

    A forced convention skips the range test but still refuses NaN/Inf and empty volumes.
    """
    chosen = convention or cfg.convention
    if chosen == "auto":
        return detect_convention(array, cfg, path)
    if chosen not in CONVENTIONS:
        raise ConfigError(f"intensity convention {chosen!r} is not one of auto, hu, windowed")
    value_range(array, path)
    return chosen  # type: ignore[return-value]


def to_hu(array: np.ndarray, convention: str, cfg: IntensityConfig | None = None) -> np.ndarray:
    """Map stored values to Hounsfield units (float32, a new array).

    ``windowed``: ``windowed_range`` -> ``windowed_source_hu`` linearly ([0, 255] -> [-1250, 250] HU); values
    outside the source window were clipped when the volume was made and cannot be recovered.
    """
    cfg = cfg or IntensityConfig()
    out = np.array(array, dtype=np.float32, copy=True)
    if convention == "hu":
        return out
    if convention != "windowed":
        raise ConfigError(f"intensity convention {convention!r} is not one of hu, windowed")
    (r0, r1), (h0, h1) = cfg.windowed_range, cfg.windowed_source_hu
    out -= np.float32(r0)
    out *= np.float32((h1 - h0) / (r1 - r0))
    out += np.float32(h0)
    return out


def normalize(array: np.ndarray, cfg: IntensityConfig | None = None, convention: str | None = None,
              path: str | Path | None = None) -> np.ndarray:
    """Stored CT values -> float32 in [0, 1] over ``cfg.window_hu`` ([-1250, 250] HU by default).

    Args:
        array: CT volume in HU or windowed [0, 255].
        cfg: intensity settings.
        convention: ``"hu"`` / ``"windowed"`` to force; ``None`` uses ``cfg.convention`` (``auto`` detects).
        path: named in error messages.
    """
    cfg = cfg or IntensityConfig()
    chosen = resolve_convention(array, cfg, convention, path)
    return window_hu(to_hu(array, chosen, cfg), cfg, in_place=True)


def window_hu(hu: np.ndarray, cfg: IntensityConfig | None = None, in_place: bool = False) -> np.ndarray:
    """Hounsfield units -> float32 in [0, 1] over ``cfg.window_hu`` (the last step of :func:`normalize`).

    Args:
        hu: values in HU (float32 when ``in_place``).
        cfg: gives ``window_hu``.
        in_place: overwrite ``hu`` (a float32 array) instead of making a new array.
    """
    cfg = cfg or IntensityConfig()
    w0, w1 = cfg.window_hu
    if not w1 > w0:
        raise ConfigError(f"intensity.window_hu {list(cfg.window_hu)}: the upper end must exceed the lower")
    out = hu if in_place and hu.dtype == np.float32 else np.array(hu, dtype=np.float32, copy=True)
    out -= np.float32(w0)
    out *= np.float32(1.0 / (w1 - w0))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def lung_only(normalized: np.ndarray, lung_mask: np.ndarray, cfg: IntensityConfig | None = None) -> np.ndarray:
    """The report's "lung only" input: the normalised CT inside the lungs, ``cfg.outside_lung_value`` outside.

    Args:
        normalized: ``(D, H, W)`` float in [0, 1] from :func:`normalize`.
        lung_mask: ``(D, H, W)`` lung labels (any value > 0 is lung: 1 left, 2 right).
        cfg: gives ``outside_lung_value``.

    Returns:
        float32 ``(D, H, W)``.
    """
    cfg = cfg or IntensityConfig()
    if normalized.shape != lung_mask.shape:
        raise ValueError(f"lung mask of shape {lung_mask.shape} does not match the volume {normalized.shape}")
    return np.where(lung_mask > 0, normalized, np.float32(cfg.outside_lung_value)).astype(np.float32, copy=False)
