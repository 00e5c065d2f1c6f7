"""The U-Net of the report, assembled from :mod:`covidseg.models.blocks` (docs/method.md, docs/model.md).

Encoder level ``l`` (``l = 0 .. depth``) has ``base_width * 2**l`` channels. Pooling ``l`` (between level ``l``
and ``l + 1``) halves the in-plane axes always and the slice axis only for the first ``slice_poolings`` poolings,
so an 8-slice patch keeps 2 slices at the bottleneck with the defaults (depth 4, 2 slice poolings). A Feature
Variation block follows every encoder stage except the bottleneck, PASPP follows the bottleneck, the decoder
upsamples with transposed convolutions and concatenates the skip, and a 1x1 head gives the logits. With deep
supervision every intermediate decoder level (1 .. depth-1) has a head too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from covidseg.config import ModelConfig
from covidseg.errors import ConfigError, InputError
from covidseg.models.blocks import (
    PASPP,
    ConvBlock,
    FVBlock,
    SpatialDims,
    UpsampleHead,
    conv_nd,
    conv_transpose_nd,
)
from covidseg.models.shapes import POOL, check_fits, pool_factors, size_divisor


def _is_tracing() -> bool:
    """True while TorchScript/ONNX tracing, torch.compile or torch.export traces the model (no Python checks)."""
    if torch.jit.is_tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    if compiler is None:
        return False
    return bool(compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)())


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` for settings no network can be built from."""
    if cfg.spatial_dims not in (2, 3):
        raise ConfigError(f"model.spatial_dims: expected 2 or 3, got {cfg.spatial_dims!r}")
    for key in ("in_channels", "out_channels", "base_width", "depth", "se_reduction"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key}: expected a positive integer, got {getattr(cfg, key)!r}")
    if cfg.spatial_dims == 3 and not 0 <= cfg.slice_poolings <= cfg.depth:
        raise ConfigError(
            f"model.slice_poolings: expected 0..{cfg.depth} (model.depth), got {cfg.slice_poolings}; "
            f"set it to at most the depth"
        )
    if cfg.fv not in ("none", "se", "ce"):
        raise ConfigError(f"model.fv: expected 'none', 'se' or 'ce', got {cfg.fv!r}")
    bottleneck = cfg.base_width * POOL**cfg.depth
    if cfg.paspp and bottleneck % 4:
        raise ConfigError(
            f"model.paspp: the bottleneck width {bottleneck} (base_width {cfg.base_width} x 2^{cfg.depth}) must be "
            f"divisible by 4; use an even base_width or a larger depth"
        )
    if cfg.deep_supervision and cfg.depth < 2:
        raise ConfigError("model.deep_supervision needs depth >= 2 (an intermediate decoder level); "
                          f"got depth {cfg.depth}; set model.deep_supervision=false or a larger depth")


class UNet(nn.Module):
    """3D (or 2D) U-Net with optional Feature Variation, PASPP and deep supervision.

    Args:
        cfg: the resolved :class:`~covidseg.config.ModelConfig`; its fields are taken as they are (use
            :func:`covidseg.models.registry.create_model` to start from a named variant).

    Attributes:
        config: a copy of ``cfg``.
        deep_supervision: whether ``forward`` returns a list of heads (see :meth:`set_deep_supervision`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        validate_model_config(cfg)
        self.config = dataclasses.replace(cfg)
        dims: SpatialDims = 3 if cfg.spatial_dims == 3 else 2
        self.spatial_dims = dims
        widths = [cfg.base_width * POOL**level for level in range(cfg.depth + 1)]
        self.pool_factors: list[tuple[int, ...]] = pool_factors(cfg)
        pool = nn.MaxPool3d if dims == 3 else nn.MaxPool2d

        self.encoders = nn.ModuleList()
        self.fv = nn.ModuleList()
        self.pools = nn.ModuleList()
        in_ch = cfg.in_channels
        for level in range(cfg.depth):
            self.encoders.append(ConvBlock(dims, in_ch, widths[level]))
            self.fv.append(
                nn.Identity() if cfg.fv == "none" else FVBlock(dims, widths[level], cfg.fv, cfg.se_reduction)
            )
            self.pools.append(pool(self.pool_factors[level], self.pool_factors[level]))
            in_ch = widths[level]
        self.bottleneck = ConvBlock(dims, widths[-2], widths[-1])
        self.paspp: nn.Module = PASPP(dims, widths[-1]) if cfg.paspp else nn.Identity()

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(cfg.depth)):
            f: Any = self.pool_factors[level]  # (2|1, 2, 2) or (2, 2)
            self.ups.append(conv_transpose_nd(dims)(widths[level + 1], widths[level], f, stride=f))
            self.decoders.append(ConvBlock(dims, 2 * widths[level], widths[level]))
        self.head = conv_nd(dims)(widths[0], cfg.out_channels, 1)
        # heads of decoder levels 1 .. depth-1 (shallowest first), built only when the variant has them
        self.ds_heads = nn.ModuleList(
            UpsampleHead(dims, widths[level], cfg.out_channels) for level in range(1, cfg.depth)
        ) if cfg.deep_supervision else nn.ModuleList()
        self.deep_supervision = cfg.deep_supervision

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Per-axis divisor of valid input sizes: ``(D, H, W)`` in 3D, ``(H, W)`` in 2D."""
        return size_divisor(self.config)

    @property
    def num_heads(self) -> int:
        """How many outputs ``forward`` returns with deep supervision on (final + intermediate)."""
        return 1 + len(self.ds_heads)

    def set_deep_supervision(self, enabled: bool) -> UNet:
        """Switch the intermediate heads on (training) or off (inference: ``forward`` returns one tensor).

        Raises:
            ConfigError: when enabling heads on a model built without them.
        """
        if enabled and not len(self.ds_heads):
            raise ConfigError(
                f"model '{self.config.name}' was built without deep-supervision heads; "
                "build it with model.deep_supervision=true"
            )
        self.deep_supervision = bool(enabled)
        return self

    def check_input_shape(self, shape: tuple[int, ...] | torch.Size) -> None:
        """Raise :class:`InputError` naming a valid size when ``shape`` (``(B, C, *S)``) does not fit the poolings."""
        if len(shape) != 2 + self.spatial_dims:
            axes = "(B, C, D, H, W)" if self.spatial_dims == 3 else "(B, C, H, W)"
            raise InputError(f"model input of shape {tuple(shape)}: expected {axes} for a {self.spatial_dims}D model")
        if int(shape[1]) != self.config.in_channels:
            raise InputError(
                f"model input of shape {tuple(shape)}: expected {self.config.in_channels} channel(s), got {shape[1]}"
            )
        check_fits(f"model '{self.config.name}': input size", tuple(int(s) for s in shape[2:]), self.size_divisor,
                   use="{fit}: pad or crop", fewer="or fewer poolings (model.depth, model.slice_poolings)",
                   error=InputError)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits of the segmentation.

        Args:
            x: ``(B, C_in, D, H, W)`` (3D) or ``(B, C_in, H, W)`` (2D); each spatial axis a multiple of
                :attr:`size_divisor`.

        Returns:
            ``(B, K, D, H, W)`` logits (``K = out_channels``) when :attr:`deep_supervision` is off; otherwise a
            list ``[final, level 1, ..., level depth-1]`` of ``(B, K, D, H, W)`` logits, all at the input size.
        """
        if not _is_tracing():
            self.check_input_shape(tuple(x.shape))
        skips = []
        for encoder, fv, pool in zip(self.encoders, self.fv, self.pools, strict=True):
            x = fv(encoder(x))  # (B, w_l, *S_l)
            skips.append(x)
            x = pool(x)  # (B, w_l, *S_{l+1})
        x = self.paspp(self.bottleneck(x))  # (B, w_depth, *S_depth)
        decoded = []
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = decoder(torch.cat([skip, up(x)], dim=1))  # (B, w_l, *S_l)
            decoded.append(x)
        final = self.head(x)  # (B, K, *S_0)
        if not self.deep_supervision:
            return final
        size = final.shape[2:]
        # decoded[-1] is level 0, decoded[-1 - l] is level l
        heads = [head(decoded[-1 - level], size) for level, head in enumerate(self.ds_heads, start=1)]
        return [final, *heads]  # (depth) x (B, K, *S_0)
