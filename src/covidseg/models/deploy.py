"""The inference form of a trained network: batch norm folded into the convolutions, weights stored in the
compute dtype and memory format.

Sliding-window inference (:mod:`covidseg.inference.sliding_window`) runs a copy made by :func:`deploy_copy`
instead of the training module; measured on the development CPU (docs/performance.md), for the full model on an
8x128x128 window:

- batch norm folded into the preceding convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``): one pass over
  the activations less per ``ConvBNReLU``; exact up to float rounding (max |logit diff| ~3e-8 in float32);
- weights in ``channels_last_3d`` like the input: oneDNN then runs its blocked channels-last kernels without
  reordering the weights and activations around every convolution (about 20 % of the network time; converting
  only the input, as before, gained nothing);
- weights and activations in bfloat16 instead of float32 weights under autocast, where bf16 is used: no cast of
  every weight on every call (autocast computed these convolutions in bf16 already, so the answer is the same to
  bf16 rounding).

The copy is for inference only (``eval`` mode, batch norm statistics frozen); the original is left untouched.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from covidseg.models.blocks import ConvBNReLU


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Fold the batch norm of every :class:`~covidseg.models.blocks.ConvBNReLU` of ``model`` into its
    convolution (in place; the batch norm becomes ``nn.Identity``). ``model`` must be in ``eval`` mode: the folded
    affine map is the one of the running statistics.

    Returns:
        ``model``.
    """
    if model.training:
        raise ValueError("fold_batch_norm needs a model in eval mode (batch norm with frozen statistics)")
    for module in model.modules():
        if isinstance(module, ConvBNReLU) and isinstance(module[1], nn.modules.batchnorm._BatchNorm):
            conv, bn = module[0], module[1]
            assert isinstance(conv, (nn.Conv2d, nn.Conv3d))
            module[0] = fuse_conv_bn_eval(conv, bn)
            module[1] = nn.Identity()
    return model


def deploy_copy(model: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> nn.Module:
    """An inference copy of ``model``: ``eval`` mode, batch norm folded, parameters in ``dtype`` and, for a 3D
    network, in ``channels_last_3d`` memory format when ``channels_last``.

    Args:
        model: a covidseg network (its ``ConvBNReLU`` blocks are folded; other modules are copied as they are).
        dtype: ``torch.float32`` or ``torch.bfloat16`` (feed inputs of the same dtype).
        channels_last: store 5D weights channels-last (feed ``channels_last_3d`` inputs).

    Returns:
        A new module on the same device as ``model``; ``model`` itself is not changed.
    """
    out = copy.deepcopy(model).eval()
    fold_batch_norm(out)
    out.to(dtype=dtype)
    if channels_last and int(getattr(out, "spatial_dims", 3)) == 3:
        out.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    for p in out.parameters():
        p.requires_grad_(False)
    return out
