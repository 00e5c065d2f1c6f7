"""CT noise: correlated in-plane (the "grain" of filtered back-projection), not white only.

Reconstruction kernels shape the noise power spectrum: soft kernels give coarse, blotchy grain, sharp kernels fine
grain (Boedeker et al., Phys. Med. Biol. 2007). The phantom mixes white noise with a low-passed copy of it (a
separable binomial kernel in-plane); ``correlation`` sets the mix and ``sigma`` the standard deviation (HU).
Noise is generated and added slab by slab to keep memory flat.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_BINOMIAL = np.array([1.0, 4.0, 6.0, 4.0, 1.0], dtype=np.float32) / 16.0
"""In-plane low-pass kernel; applied along rows and columns."""
_BINOMIAL_GAIN = float((_BINOMIAL**2).sum())
"""Standard deviation of white noise after the separable 2D kernel: ``sum(k^2)`` (variance ``sum(k^2)^2``)."""
_SLAB = 16
"""Slices per slab."""


def add_noise(ct: np.ndarray, rng: np.random.Generator, sigma: float, correlation: float) -> None:
    """Add correlated Gaussian noise to ``ct`` in place.

    Args:
        ct: volume ``(D, H, W)`` float32 (HU).
        rng: random generator.
        sigma: standard deviation of the added noise (HU).
        correlation: in [0, 1]; fraction (in amplitude) of low-passed noise.
    """
    white_w = np.float32(sigma * np.sqrt(max(1.0 - correlation**2, 0.0)))
    smooth_w = np.float32(sigma * correlation / _BINOMIAL_GAIN)
    for k in range(0, ct.shape[0], _SLAB):
        block = ct[k:k + _SLAB]
        white = rng.standard_normal(block.shape, dtype=np.float32)
        smooth = ndimage.convolve1d(white, _BINOMIAL, axis=1, mode="wrap")
        ndimage.convolve1d(smooth, _BINOMIAL, axis=2, mode="wrap", output=smooth)
        block += white * white_w
        block += smooth * smooth_w
