"""The inference form of a trained network: batch norm folded into the convolutions, weights stored in the
compute dtype and memory format, by public torch APIs only.

Sliding-window inference (:mod:`covidseg.inference.sliding_window`) runs a copy made by :func:`deploy_copy`
instead of the training module:

- batch norm folded into the preceding convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``): one pass over
  the activations less per ``ConvBNReLU``; exact up to float rounding;
- weights in the compute dtype (bfloat16 where it is used): no cast of every weight on every call, as autocast
  would do;
- for a 3D network, weights in ``channels_last_3d`` like the windows fed to it: oneDNN then runs its
  channels-last kernels without reordering the weights around every convolution.

``kernels="onednn"`` (``runtime.cpu_kernels``, CPU only) adds the forms of :mod:`covidseg.models.onednn`.
The copy is for inference only (``eval`` mode, batch norm statistics frozen); the original is left untouched.
Figures: docs/performance.md.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from covidseg.models.blocks import ConvBNReLU

CpuKernels = Literal["public", "onednn"]
"""How the inference form runs on the CPU: ``public`` (torch's public modules) or ``onednn`` (oneDNN's fused
operators and the FV gates folded into the fusion convolution, :mod:`covidseg.models.onednn`)."""

BATCH_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Fold the batch norm of every :class:`~covidseg.models.blocks.ConvBNReLU` of ``model`` into its
    convolution (in place; the batch norm becomes ``nn.Identity``). ``model`` must be in ``eval`` mode: the folded
    affine map is the one of the running statistics.

    Returns:
        ``model``.

    Raises:
        ValueError: ``model`` is in training mode.
    """
    if model.training:
        raise ValueError("fold_batch_norm needs a model in eval mode (batch norm with frozen statistics)")
    for module in model.modules():
        if isinstance(module, ConvBNReLU) and isinstance(module[1], BATCH_NORMS):
            conv, bn = module[0], module[1]
            assert isinstance(conv, (nn.Conv2d, nn.Conv3d))
            module[0] = fuse_conv_bn_eval(conv, bn)
            module[1] = nn.Identity()
    return model


def deploy_copy(model: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                kernels: CpuKernels = "public") -> nn.Module:
    """An inference copy of ``model``: ``eval`` mode, batch norm folded, parameters in ``dtype`` and, when
    ``channels_last``, in channels-last memory format (``channels_last_3d`` for a 3D network).

    Args:
        model: a covidseg network (its ``ConvBNReLU`` blocks are folded; other modules are copied as they are).
        dtype: ``torch.float32`` or ``torch.bfloat16`` (feed inputs of the same dtype).
        channels_last: store the weights channels-last (feed ``channels_last_3d`` inputs to a 3D network,
            ``channels_last`` ones to a 2D network).
        kernels: ``public``, or ``onednn`` for a copy that runs on the CPU only
            (:func:`covidseg.models.onednn.onednn_form`).

    Returns:
        A new module on the same device as ``model``, mapping ``(B, C, *S)`` to the logits ``(B, K, *S)`` as
        ``model`` does; ``model`` itself is not changed.
    """
    out = fold_batch_norm(copy.deepcopy(model).eval())
    if kernels == "onednn":
        from covidseg.models.onednn import onednn_form

        out = onednn_form(out, dtype)
    elif kernels != "public":
        raise ValueError(f"kernels={kernels!r}: expected 'public' or 'onednn'")
    out.to(dtype=dtype)
    if channels_last:
        layout = torch.channels_last_3d if int(getattr(out, "spatial_dims", 3)) == 3 else torch.channels_last
        out.to(memory_format=layout)  # type: ignore[call-overload]
    for p in out.parameters():
        p.requires_grad_(False)
    return out
