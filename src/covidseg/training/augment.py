"""Batch augmentation of 2D slices, on the device the batch lives on: flips, rotation, scaling, intensity.

The field's slice augmentations (nnU-Net's 2D defaults, Inf-Net's flips/rotations; ranges and probabilities in
:class:`covidseg.config.AugmentConfig`): mirroring, in-plane rotation and isotropic scaling in one affine
resampling, then, when switched on, white noise and another reconstruction kernel (an unsharp mask that sharpens
or softens, as scanners' kernels differ; nnU-Net draws noise and blur), then brightness, contrast and gamma. As
in TorchIO, the random
part only *draws* parameters (:func:`draw_params`, from an explicit seeded :class:`torch.Generator` on the CPU)
and a deterministic twin *applies* them (:func:`apply_params`), so a batch can be replayed from its parameters
and the same seed gives the same batches on any device.

Written with ``affine_grid``/``grid_sample`` so that a whole batch is augmented on the GPU (a per-sample CPU
pipeline would starve a GPU on 352x352 slices); ``tests/test_semiseg.py`` checks the resampling against
``scipy.ndimage.affine_transform`` and the intensity part against MONAI's ``AdjustContrast`` (gamma) when MONAI
is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from covidseg.config import AugmentConfig
from covidseg.errors import ConfigError

MASK_THRESHOLD = 0.5
"""A resampled mask pixel is foreground when its bilinear value is >= 0.5."""


@dataclass
class AugmentParams:
    """Parameters of one augmented batch; every field is a ``(B,)`` CPU tensor.

    Identity values: no flips, angle 0, zoom 1, brightness 0, contrast 1, gamma 1.
    """

    flip_h: torch.Tensor
    flip_v: torch.Tensor
    angle: torch.Tensor
    """Radians."""
    zoom: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    gamma: torch.Tensor
    noise_std: torch.Tensor | None = None
    """Image scale; ``None`` = no noise."""
    noise_seed: torch.Tensor | None = None
    """Seed of each slice's noise (int64), so that the noise is replayed from the parameters."""
    kernel_amount: torch.Tensor | None = None
    """``None`` = no kernel change; 0 = none for that slice."""
    kernel_sigma: torch.Tensor | None = None
    """Pixels."""

    @classmethod
    def identity(cls, batch: int) -> AugmentParams:
        """Parameters that leave a batch of ``batch`` slices unchanged."""
        zeros, ones = torch.zeros(batch), torch.ones(batch)
        return cls(zeros.bool(), zeros.bool(), zeros, ones, zeros, ones, ones)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _log_uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.exp(_uniform(n, math.log(lo), math.log(hi), g))


def draw_params(batch: int, cfg: AugmentConfig, generator: torch.Generator) -> AugmentParams:
    """Draw the augmentation of a batch of ``batch`` slices from ``generator`` (a CPU generator).

    Always draws the same number of values per batch, so the stream stays aligned whatever was applied.
    """
    g = generator
    flip_h = torch.rand(batch, generator=g) < cfg.flip_h
    flip_v = torch.rand(batch, generator=g) < cfg.flip_v
    affine_on = torch.rand(batch, generator=g) < cfg.p_affine
    angle = _uniform(batch, -cfg.rotate_deg, cfg.rotate_deg, g) * math.pi / 180.0
    zoom = _log_uniform(batch, *cfg.scale, g)
    on = torch.rand(batch, 3, generator=g) < cfg.p_intensity
    brightness = _uniform(batch, -cfg.brightness, cfg.brightness, g)
    contrast = _uniform(batch, *cfg.contrast, g)
    gamma = _log_uniform(batch, *cfg.gamma, g)
    params = AugmentParams(
        flip_h=flip_h,
        flip_v=flip_v,
        angle=torch.where(affine_on, angle, 0.0).float(),
        zoom=torch.where(affine_on, zoom, 1.0).float(),
        brightness=torch.where(on[:, 0], brightness, 0.0).float(),
        contrast=torch.where(on[:, 1], contrast, 1.0).float(),
        gamma=torch.where(on[:, 2], gamma, 1.0).float(),
    )
    if cfg.p_noise > 0:  # drawn after the others, and only when on: runs without it keep their draws
        noise_on = torch.rand(batch, generator=g) < cfg.p_noise
        params.noise_std = torch.where(noise_on, _uniform(batch, *cfg.noise_std, g), 0.0).float()
        params.noise_seed = torch.randint(0, 2**62, (batch,), generator=g)
    if cfg.p_kernel > 0:
        kernel_on = torch.rand(batch, generator=g) < cfg.p_kernel
        params.kernel_amount = torch.where(kernel_on, _uniform(batch, *cfg.kernel_amount, g), 0.0).float()
        params.kernel_sigma = _uniform(batch, *cfg.kernel_sigma, g).float()
    return params


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each slice of ``images`` ``(B, C, H, W)`` blurred in-plane by a Gaussian of its own ``sigma[b]`` pixels
    (separable, truncated at 3 of the largest sigma, edges reflected; ``sigma`` > 0)."""
    b, c, h, w = images.shape
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    radius = min(radius, (min(h, w) - 1))  # reflect padding needs fewer than the side's pixels
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x[None, :] / sigma.float()[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0).to(images.device)  # (B*C, K)
    flat = images.reshape(1, b * c, h, w).float()
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def _noise(shape: tuple[int, ...], params: AugmentParams, device: torch.device) -> torch.Tensor:
    """The white noise of each slice, from its seed, scaled by its ``noise_std``."""
    assert params.noise_std is not None and params.noise_seed is not None
    out = torch.zeros(shape)
    for i, (std, seed) in enumerate(zip(params.noise_std.tolist(), params.noise_seed.tolist(), strict=True)):
        if std > 0:
            out[i] = std * torch.randn(shape[1:], generator=torch.Generator().manual_seed(int(seed)))
    return out.to(device)


def affine_theta(params: AugmentParams) -> torch.Tensor:
    """``(B, 2, 3)`` matrices for ``affine_grid``: output (x, y) in [-1, 1] -> input (x, y).

    Sampling the input at ``R(angle) @ F @ (x, y) / zoom`` mirrors the content by ``F`` (``x -> -x``
    left-right, ``y -> -y`` anterior-posterior), then rotates it about the centre (a positive angle turns it
    counter-clockwise on screen, as ``np.rot90``) and zooms it by ``zoom`` (> 1 enlarges).
    """
    cos, sin = torch.cos(params.angle), torch.sin(params.angle)
    fx = 1.0 - 2.0 * params.flip_h.float()
    fy = 1.0 - 2.0 * params.flip_v.float()
    inv = 1.0 / params.zoom
    theta = torch.zeros(params.angle.shape[0], 2, 3)
    theta[:, 0, 0] = cos * fx * inv
    theta[:, 0, 1] = -sin * fy * inv
    theta[:, 1, 0] = sin * fx * inv
    theta[:, 1, 1] = cos * fy * inv
    return theta


def apply_params(
    images: torch.Tensor, masks: torch.Tensor | None, params: AugmentParams
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply drawn parameters (deterministic).

    Args:
        images: ``(B, C, H, W)`` float in [0, 1].
        masks: ``(B, K, H, W)`` in {0, 1}, or ``None``.
        params: from :func:`draw_params` (``B`` entries).

    Returns:
        ``(B, C, H, W)`` images in [0, 1] and ``(B, K, H, W)`` masks in {0, 1} (or ``None``). Outside the
        resampled field of view the image is 0 (black, as the slices' own background) and the mask 0.
    """
    device = images.device
    theta = affine_theta(params).to(device=device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if params.noise_std is not None and bool((params.noise_std > 0).any()):
        out = out + _noise(tuple(out.shape), params, device)
    if params.kernel_amount is not None and bool((params.kernel_amount != 0).any()):
        assert params.kernel_sigma is not None
        amount = params.kernel_amount.to(device).view(-1, 1, 1, 1)
        out = out + amount * (out - gaussian_blur(out, params.kernel_sigma))
    out_masks = None
    if masks is not None:
        m = F.grid_sample(masks.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out_masks = (m >= MASK_THRESHOLD).to(masks.dtype)
    view = (-1, 1, 1, 1)
    gamma = params.gamma.to(device).view(view)
    contrast = params.contrast.to(device).view(view)
    brightness = params.brightness.to(device).view(view)
    out = out.clamp(0.0, 1.0) ** gamma  # (B, C, H, W)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness
    return out.clamp(0.0, 1.0), out_masks


class SliceAugment:
    """Seeded, replayable batch augmentation: ``augment(images, masks) -> (images, masks)``.

    Args:
        cfg: ranges and probabilities.
        seed: seed of the CPU generator that draws every parameter.

    Attributes:
        last_params: the parameters of the last batch (to replay it with :func:`apply_params`).
    """

    def __init__(self, cfg: AugmentConfig | None = None, seed: int = 0) -> None:
        self.cfg = cfg or AugmentConfig()
        for name in ("flip_h", "flip_v", "p_affine", "p_intensity", "p_noise", "p_kernel"):
            value = getattr(self.cfg, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment.{name} {value}: a probability must lie in [0, 1]")
        if self.cfg.p_kernel > 0 and min(self.cfg.kernel_sigma) <= 0:
            raise ConfigError(f"augment.kernel_sigma {self.cfg.kernel_sigma}: expected sigmas > 0 (pixels)")
        self.generator = torch.Generator().manual_seed(seed)
        self.last_params: AugmentParams | None = None

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` images and ``(B, K, H, W)`` masks -> augmented tensors of the same shapes."""
        params = draw_params(images.shape[0], self.cfg, self.generator)
        self.last_params = params
        out, out_masks = apply_params(images, masks, params)
        assert out_masks is not None
        return out, out_masks
