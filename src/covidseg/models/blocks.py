"""Building blocks of the network family (docs/method.md): conv block, Feature Variation, PASPP, heads.

Every block works in 3D (tensors ``(B, C, D, H, W)``) and in 2D (``(B, C, H, W)``), chosen by ``spatial_dims``;
in 2D there are no through-plane kernels, dilations or poolings. The network module
(:mod:`covidseg.models.unet`) only assembles these blocks.

References:
    Yan Q. et al., "COVID-19 chest CT image segmentation network by multi-scale fusion and enhancement
    operations", IEEE Trans. Big Data 7(1), 2021 (FV block with the CE channel branch, PASPP).
    Hu J., Shen L., Sun G., "Squeeze-and-excitation networks", CVPR 2018 (SE channel branch).
    Chen L.-C. et al., "DeepLab: semantic image segmentation with deep convolutional nets, atrous convolution,
    and fully connected CRFs", IEEE TPAMI 40(4), 2018 (ASPP).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

SpatialDims = Literal[2, 3]

PASPP_DILATIONS: tuple[int, int, int, int] = (1, 2, 4, 8)
"""In-plane dilations of the four atrous branches of PASPP (Yan et al. 2021)."""
PASPP_SLICE_DILATION = 1
"""Through-plane dilation of every PASPP branch: at the bottleneck an 8-slice patch has 2 slices left, so a
larger slice dilation would only read zero padding (see docs/model.md)."""
PASPP_BRANCHES = len(PASPP_DILATIONS)


def conv_nd(spatial_dims: SpatialDims) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def batch_norm_nd(spatial_dims: SpatialDims) -> type[nn.BatchNorm2d] | type[nn.BatchNorm3d]:
    """``nn.BatchNorm2d`` or ``nn.BatchNorm3d``."""
    return nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d


def conv_transpose_nd(spatial_dims: SpatialDims) -> type[nn.ConvTranspose2d] | type[nn.ConvTranspose3d]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d


def kernel(spatial_dims: SpatialDims, size: int, slice_size: int | None = None) -> Any:
    """An isotropic kernel ``size`` per axis; in 3D the slice axis (first) may differ (``slice_size``).

    Returns ``(size, size)`` or ``(slice_size, size, size)`` (typed ``Any`` because torch types its 2D and 3D
    arguments as fixed-length tuples)."""
    if spatial_dims == 2:
        return (size, size)
    return (size if slice_size is None else slice_size, size, size)


def spatial_axes(spatial_dims: SpatialDims) -> tuple[int, ...]:
    """Tensor axes of the spatial dimensions: ``(2, 3, 4)`` in 3D, ``(2, 3)`` in 2D."""
    return tuple(range(2, 2 + spatial_dims))


class ConvBNReLU(nn.Sequential):
    """Convolution (no bias) -> batch norm -> ReLU, "same" padding.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels C_in.
        out_channels: output channels C_out.
        kernel_size: 1 or 3 (per axis).
        dilation: in-plane dilation; in 3D the slice axis uses ``slice_dilation``.
        slice_dilation: through-plane dilation (3D only).

    Shapes: ``(B, C_in, *S) -> (B, C_out, *S)``.
    """

    def __init__(
        self,
        spatial_dims: SpatialDims,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        slice_dilation: int = 1,
    ) -> None:
        pad = dilation * (kernel_size - 1) // 2
        slice_pad = slice_dilation * (kernel_size - 1) // 2
        super().__init__(
            conv_nd(spatial_dims)(
                in_channels,
                out_channels,
                kernel(spatial_dims, kernel_size),
                padding=kernel(spatial_dims, pad, slice_pad),
                dilation=kernel(spatial_dims, dilation, slice_dilation),
                bias=False,
            ),
            batch_norm_nd(spatial_dims)(out_channels),
            nn.ReLU(inplace=True),
        )


class ConvBlock(nn.Sequential):
    """The U-Net stage: two 3x3(x3) ConvBNReLU. Shapes: ``(B, C_in, *S) -> (B, C_out, *S)``."""

    def __init__(self, spatial_dims: SpatialDims, in_channels: int, out_channels: int) -> None:
        super().__init__(
            ConvBNReLU(spatial_dims, in_channels, out_channels),
            ConvBNReLU(spatial_dims, out_channels, out_channels),
        )


class SEChannelAttention(nn.Module):
    """SE channel branch (Hu et al. 2018): GAP -> FC C->C/r -> ReLU -> FC C/r->C -> sigmoid, one weight per channel.

    The fully connected layers are 1x1(x1) convolutions on the pooled ``(B, C, 1, 1, 1)`` tensor (the same maps,
    without reshapes, so channels_last and ONNX export stay simple).

    Args:
        spatial_dims: 2 or 3.
        channels: C.
        reduction: r (``C/r`` hidden units, at least 1).
    """

    def __init__(self, spatial_dims: SpatialDims, channels: int, reduction: int = 2) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        conv = conv_nd(spatial_dims)
        self.axes = spatial_axes(spatial_dims)
        self.fc1 = conv(channels, hidden, 1)
        self.fc2 = conv(hidden, channels, 1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel weights in (0, 1): ``(B, C, *S) -> (B, C, 1, ..., 1)``."""
        pooled = x.mean(dim=self.axes, keepdim=True)  # (B, C, 1, 1, 1)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))  # (B, C, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` reweighted per channel: ``(B, C, *S) -> (B, C, *S)``."""
        return x * self.weights(x)


class CEChannelAttention(nn.Module):
    """CE (contrast enhancement) channel branch of Yan et al. 2021: GAP -> FC C->C/r -> FC C/r->1 -> sigmoid.

    One weight per sample, broadcast over all C channels. As in docs/method.md there is no nonlinearity between the
    two fully connected layers (the report only says CE differs from SE "at the fully connected layers").

    Args:
        spatial_dims: 2 or 3.
        channels: C.
        reduction: r (``C/r`` hidden units, at least 1; the paper uses 2).
    """

    def __init__(self, spatial_dims: SpatialDims, channels: int, reduction: int = 2) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        conv = conv_nd(spatial_dims)
        self.axes = spatial_axes(spatial_dims)
        self.fc1 = conv(channels, hidden, 1)
        self.fc2 = conv(hidden, 1, 1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """One weight per sample in (0, 1): ``(B, C, *S) -> (B, 1, 1, ..., 1)``."""
        pooled = x.mean(dim=self.axes, keepdim=True)  # (B, C, 1, 1, 1)
        return torch.sigmoid(self.fc2(self.fc1(pooled)))  # (B, 1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` times its sample's weight (broadcast over channels): ``(B, C, *S) -> (B, C, *S)``."""
        return x * self.weights(x)


class SpatialAttention(nn.Module):
    """Position-sensitive branch of the FV block: conv3x3(x3) C->C/2 -> ReLU -> conv3x3(x3) C/2->1 -> sigmoid.

    The single-channel map in (0, 1) multiplies every channel of the input (a per-voxel gate that complements
    the per-channel gate of the channel branch).
    """

    def __init__(self, spatial_dims: SpatialDims, channels: int) -> None:
        super().__init__()
        hidden = max(1, channels // 2)
        conv = conv_nd(spatial_dims)
        pad = kernel(spatial_dims, 1)
        self.conv1 = conv(channels, hidden, kernel(spatial_dims, 3), padding=pad)
        self.conv2 = conv(hidden, 1, kernel(spatial_dims, 3), padding=pad)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map: ``(B, C, *S) -> (B, 1, *S)``."""
        return torch.sigmoid(self.conv2(F.relu(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, C, *S)``."""
        return x * self.weights(x)


class FVBlock(nn.Module):
    """Feature Variation block (Yan et al. 2021), with the CE or SE channel branch.

    ``F1 = ConvBNReLU_1x1(F)``; channel branch ``A_c(F1)`` and spatial branch ``A_s(F1)`` both reweight ``F1``;
    ``out = F + ConvBNReLU_3x3(concat[F1, A_c(F1), A_s(F1)])``.

    Args:
        spatial_dims: 2 or 3.
        channels: C (input and output).
        channel_branch: ``"se"`` or ``"ce"``.
        reduction: r of the channel branch.
    """

    def __init__(
        self, spatial_dims: SpatialDims, channels: int, channel_branch: Literal["se", "ce"], reduction: int = 2
    ) -> None:
        super().__init__()
        self.reduce = ConvBNReLU(spatial_dims, channels, channels, kernel_size=1)
        branch = {"se": SEChannelAttention, "ce": CEChannelAttention}[channel_branch]
        self.channel = branch(spatial_dims, channels, reduction)
        self.spatial = SpatialAttention(spatial_dims, channels)
        self.fuse = ConvBNReLU(spatial_dims, 3 * channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, C, *S)``."""
        f1 = self.reduce(x)  # (B, C, *S)
        fused = torch.cat([f1, self.channel(f1), self.spatial(f1)], dim=1)  # (B, 3C, *S)
        return x + self.fuse(fused)  # (B, C, *S)


class PASPP(nn.Module):
    """Progressive atrous spatial pyramid pooling (Yan et al. 2021), at the bottleneck.

    Four 1x1 branches ``b_i`` reduce C to C/4; atrous 3x3 convs ``a_i`` with in-plane dilations 1, 2, 4, 8
    (through-plane :data:`PASPP_SLICE_DILATION`). Progressive fusion: ``o_1 = a_1 + (b_1 + b_2)``,
    ``o_2 = a_2 + (b_1 + b_2)``, ``p_12 = ConvBNReLU_1x1(concat[o_1, o_2])`` (C/2 channels), likewise ``p_34``;
    ``out = x + ConvBNReLU_1x1(concat[p_12, p_34])`` back to C channels.

    Args:
        spatial_dims: 2 or 3.
        channels: C, a multiple of 4.
        dilations: the four in-plane dilations.
        slice_dilation: through-plane dilation of every branch (3D only).
    """

    def __init__(
        self,
        spatial_dims: SpatialDims,
        channels: int,
        dilations: tuple[int, ...] = PASPP_DILATIONS,
        slice_dilation: int = PASPP_SLICE_DILATION,
    ) -> None:
        super().__init__()
        if len(dilations) != PASPP_BRANCHES:
            raise ValueError(f"PASPP needs {PASPP_BRANCHES} dilations, got {dilations}")
        if channels % PASPP_BRANCHES:
            raise ValueError(f"PASPP needs channels divisible by {PASPP_BRANCHES}, got {channels}")
        quarter = channels // PASPP_BRANCHES
        self.reduce = nn.ModuleList(
            ConvBNReLU(spatial_dims, channels, quarter, kernel_size=1) for _ in dilations
        )
        self.atrous = nn.ModuleList(
            ConvBNReLU(spatial_dims, quarter, quarter, kernel_size=3, dilation=d, slice_dilation=slice_dilation)
            for d in dilations
        )
        self.fuse_pairs = nn.ModuleList(
            ConvBNReLU(spatial_dims, 2 * quarter, 2 * quarter, kernel_size=1) for _ in range(PASPP_BRANCHES // 2)
        )
        self.fuse = ConvBNReLU(spatial_dims, channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, C, *S)`` (spatial size preserved for every dilation)."""
        reduced = [r(x) for r in self.reduce]  # 4 x (B, C/4, *S)
        atrous = [a(b) for a, b in zip(self.atrous, reduced, strict=True)]  # 4 x (B, C/4, *S)
        pairs = []
        for k, fuse_pair in enumerate(self.fuse_pairs):
            i, j = 2 * k, 2 * k + 1
            shared = reduced[i] + reduced[j]  # (B, C/4, *S)
            pairs.append(fuse_pair(torch.cat([atrous[i] + shared, atrous[j] + shared], dim=1)))  # (B, C/2, *S)
        return x + self.fuse(torch.cat(pairs, dim=1))  # (B, C, *S)


class UpsampleHead(nn.Module):
    """Deep-supervision head: 1x1(x1) conv at the level's own resolution, then (tri/bi)linear upsampling.

    A 1x1 convolution and linear interpolation commute exactly (interpolation weights sum to one, so the bias
    passes through unchanged), so this equals the report's "upsample, then 1x1x1 conv" at a fraction of the
    cost. Returns logits; the sigmoid is applied in the loss.
    """

    def __init__(self, spatial_dims: SpatialDims, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_nd(spatial_dims)(in_channels, out_channels, 1)
        self.mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, x: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """``(B, C, *s) -> (B, K, *size)``."""
        return F.interpolate(self.conv(x), size=size, mode=self.mode, align_corners=False)
