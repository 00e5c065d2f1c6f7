"""Which sizes a U-Net accepts: each axis a multiple of ``2 ** (its poolings)``, and the error that says so.

Pooling ``l`` halves the in-plane axes always and the slice axis only for the first ``slice_poolings`` poolings
(:mod:`covidseg.models.unet`), so with the defaults (depth 4, 2 slice poolings) a 3D input must be a multiple of
``(4, 16, 16)`` voxels ``(D, H, W)``. :func:`check_fits` is the one check of training patches, inference windows,
export windows and model inputs; its message names the poolings, the multiple and a size that fits, as in
"train.patch_size 6x128x128 (D x H x W) does not fit 2 poolings of the slice axis; use a multiple of 4
(e.g. 4x128x128) or fewer poolings".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from covidseg.config import ModelConfig
from covidseg.errors import ConfigError, UserError

POOL = 2
"""Pooling (and upsampling) factor of every pooled axis."""
AXIS_NAMES: dict[int, tuple[str, ...]] = {3: ("slice", "row", "column"), 2: ("row", "column")}
"""Names of the spatial axes, ``(D, H, W)`` in 3D and ``(H, W)`` in 2D."""
AXIS_LETTERS: dict[int, str] = {3: "D x H x W", 2: "H x W"}

Rounding = Literal["up", "down"]


def pool_factors(cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Pooling factor per axis of each of the ``cfg.depth`` poolings: ``(2|1, 2, 2)`` in 3D, ``(2, 2)`` in 2D."""
    if cfg.spatial_dims == 2:
        return [(POOL, POOL) for _ in range(cfg.depth)]
    return [(POOL if level < cfg.slice_poolings else 1, POOL, POOL) for level in range(cfg.depth)]


def size_divisor(cfg: ModelConfig) -> tuple[int, ...]:
    """Per-axis divisor of the sizes the model ``cfg`` accepts: ``(D, H, W)`` in 3D, ``(H, W)`` in 2D."""
    out = [1] * cfg.spatial_dims
    for factors in pool_factors(cfg):
        out = [o * f for o, f in zip(out, factors, strict=True)]
    return tuple(out)


def fit_size(size: Sequence[int], divisor: Sequence[int], rounding: Rounding = "up") -> tuple[int, ...]:
    """``size`` with every axis rounded to a multiple of its divisor (``up``, or ``down``: never above ``size``),
    at least one divisor."""
    _same_length(size, divisor)
    if rounding == "down":
        return tuple(max(d, s // d * d) for s, d in zip(size, divisor, strict=True))
    return tuple(max(d, -(-s // d) * d) for s, d in zip(size, divisor, strict=True))


def fits(size: Sequence[int], divisor: Sequence[int]) -> bool:
    """Whether every axis of ``size`` is a positive multiple of its divisor."""
    _same_length(size, divisor)
    return all(int(s) >= int(d) and int(s) % int(d) == 0 for s, d in zip(size, divisor, strict=True))


def format_size(size: Sequence[int], sep: str = "x") -> str:
    """``(8, 128, 128)`` -> ``8x128x128`` (``sep=" "`` for command-line arguments)."""
    return sep.join(str(int(s)) for s in size)


def fit_message(
    what: str,
    size: Sequence[int],
    divisor: Sequence[int],
    *,
    rounding: Rounding = "up",
    use: str = "e.g. {fit}",
    fewer: str | None = "or fewer poolings",
) -> str | None:
    """The error message for a ``size`` that does not fit ``divisor``, or ``None`` when it fits.

    Args:
        what: what the size is, e.g. ``"train.patch_size"`` or ``"model 'unet': input size"``.
        size: the size, ``(D, H, W)`` or ``(H, W)`` voxels.
        divisor: the model's :func:`size_divisor` (same length).
        rounding: how the suggested size is rounded (``up``, or ``down`` to stay within a memory budget).
        use: how to suggest the fitting size; ``{fit}`` is replaced by it (``"--set inference.window={fit}"``).
        fewer: the other way out, or ``None`` where the model is given (a trained checkpoint).
    """
    _same_length(size, divisor)
    bad = [a for a, (s, d) in enumerate(zip(size, divisor, strict=True)) if s % d or s < d]
    if not bad:
        return None
    names = AXIS_NAMES.get(len(size), tuple(f"axis {a}" for a in range(len(size))))
    poolings = [round(math.log(divisor[a], POOL)) for a in bad]
    parts = [f"{n} pooling{'s' if n != 1 else ''} of the {names[a]} axis" for n, a in zip(poolings, bad, strict=True)]
    multiples = [str(divisor[a]) for a in bad]
    if len(bad) == 1:
        fits, need = parts[0], f"a multiple of {multiples[0]}"
    else:
        short = [p.replace(" pooling of", " of").replace(" poolings of", " of") for p in parts[1:]]
        fits = ", ".join([parts[0], *short[:-1]]) + f" and {short[-1]}"
        need = f"multiples of {', '.join(multiples[:-1])} and {multiples[-1]}"
    fit = "x".join(map(str, fit_size(size, divisor, rounding)))
    letters = AXIS_LETTERS.get(len(size))
    shown = "x".join(map(str, size)) + (f" ({letters})" if letters else "")
    text = f"{what} {shown} does not fit {fits}; use {need} ({use.format(fit=fit)})"
    return f"{text} {fewer}" if fewer else text


def check_fits(
    what: str,
    size: Sequence[int],
    divisor: Sequence[int],
    *,
    rounding: Rounding = "up",
    use: str = "e.g. {fit}",
    fewer: str | None = "or fewer poolings",
    error: type[UserError] = ConfigError,
) -> None:
    """Raise ``error`` with :func:`fit_message` when ``size`` does not fit ``divisor`` (arguments as there).

    Raises:
        ConfigError (or ``error``): an axis that is not a positive multiple of its divisor; a size and a divisor
            of different lengths (a 3D patch for a 2D model).
    """
    message = fit_message(what, size, divisor, rounding=rounding, use=use, fewer=fewer)
    if message is not None:
        raise error(message)


def _same_length(size: Sequence[int], divisor: Sequence[int]) -> None:
    if len(size) != len(divisor):
        raise ConfigError(
            f"size {'x'.join(map(str, size))} has {len(size)} axes but the model pools {len(divisor)} "
            f"({AXIS_LETTERS.get(len(divisor), len(divisor))}); give one size per axis of a {len(divisor)}D model"
        )


__all__ = ["POOL", "check_fits", "fit_message", "fit_size", "fits", "format_size", "pool_factors", "size_divisor"]
