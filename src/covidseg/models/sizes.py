"""The input sizes a network accepts: each spatial axis a positive multiple of the model's size divisor.

A U-Net halves an axis at each of its poolings of that axis, so an input (a training patch, a sliding window, an
exported graph's input) fits when each axis is a multiple of ``2 ** poolings`` of it
(:attr:`covidseg.models.UNet.size_divisor`). Every "does not fit, use N x M x K" message takes its check and its
suggestion from here: :func:`fits_divisor`, and :func:`fit_divisor` (the smallest fitting size at least as large).
"""

from __future__ import annotations

from collections.abc import Sequence


def fits_divisor(sizes: Sequence[int], divisor: Sequence[int]) -> bool:
    """Whether every size is a positive multiple of its divisor (``sizes`` and ``divisor`` per axis)."""
    if len(sizes) != len(divisor):
        raise ValueError(f"sizes {tuple(sizes)} and divisor {tuple(divisor)} have different numbers of axes")
    return all(int(s) >= int(d) and int(s) % int(d) == 0 for s, d in zip(sizes, divisor, strict=True))


def fit_divisor(sizes: Sequence[int], divisor: Sequence[int]) -> tuple[int, ...]:
    """The smallest fitting size at least as large as ``sizes``: each axis rounded up to a multiple of its divisor
    (and at least the divisor)."""
    if len(sizes) != len(divisor):
        raise ValueError(f"sizes {tuple(sizes)} and divisor {tuple(divisor)} have different numbers of axes")
    return tuple(max(int(d), -(-int(s) // int(d)) * int(d)) for s, d in zip(sizes, divisor, strict=True))


def format_size(sizes: Sequence[int], sep: str = "x") -> str:
    """``(8, 128, 128)`` -> ``8x128x128`` (``sep=" "`` for command-line arguments)."""
    return sep.join(str(int(s)) for s in sizes)
