"""The inference form of a trained network: batch norm folded into the convolutions, weights stored in the
compute dtype and memory format.

Sliding-window inference (:mod:`covidseg.inference.sliding_window`) runs a copy made by :func:`deploy_copy`
instead of the training module. The first three steps together take an 8x128x128 window of the full model from
0.111 s (autocast) to 0.083 s on the development CPU; the fourth a further 7-15 % (``benchmarks/window_speed.py``,
docs/performance.md):

- batch norm folded into the preceding convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``): one pass over
  the activations less per ``ConvBNReLU``; exact up to float rounding (max |logit diff| 7.5e-8 in float32);
- weights in ``channels_last_3d`` like the input: oneDNN then runs its blocked channels-last kernels without
  reordering the weights around every convolution (converting only the input, as before, gained nothing);
- weights and activations in bfloat16 instead of float32 weights under autocast, where bf16 is used: no cast of
  every weight on every call (autocast computed these convolutions in bf16 already, so the answer is the same to
  bf16 rounding);
- in bf16, each FV block's channel gate folded into its fusion convolution (:class:`GateFoldedFV`): a 2C -> C
  instead of a 3C -> C convolution.

The copy is for inference only (``eval`` mode, batch norm statistics frozen); the original is left untouched.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from covidseg.models.blocks import CEChannelAttention, ConvBNReLU, FVBlock, SEChannelAttention


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


class GateFoldedFV(nn.Module):
    """A (batch-norm folded) :class:`~covidseg.models.blocks.FVBlock` whose channel gate is folded into the fusion
    convolution, the same map with a third fewer FLOPs in that convolution.

    The block's fusion is ``conv_W(concat[F1, F1 * c, F1 * s])`` with ``W = [W1 | W2 | W3]`` split over its input
    channels, ``c`` the channel gate (one weight per channel or per sample) and ``s`` the spatial map. Since
    ``conv_W2(F1 * c) = conv_{W2 * c}(F1)``, it equals ``conv_[W1 + W2 * c | W3](concat[F1, F1 * s])``: a 2C -> C
    instead of a 3C -> C convolution, with weights made per sample (``c`` differs between samples, so a batch runs
    sample by sample; in bf16 a batch of 1 is as fast per window as a batch of 2, docs/performance.md).
    """

    def __init__(self, fv: FVBlock) -> None:
        super().__init__()
        conv = fv.fuse[0]
        assert isinstance(conv, (nn.Conv2d, nn.Conv3d)) and conv.bias is not None, "fold batch norm first"
        self.reduce, self.spatial, self.relu = fv.reduce, fv.spatial, fv.fuse[2]
        assert isinstance(fv.channel, (SEChannelAttention, CEChannelAttention))
        self.channel: SEChannelAttention | CEChannelAttention = fv.channel
        # plain float32 tensors, not buffers: ``Module.to(bfloat16)`` leaves them in float32, so the per-sample
        # weights are formed in float32 and rounded once (the copy is made on its device and never moved)
        self.w1, self.w2, self.w3 = (w.clone() for w in conv.weight.detach().float().chunk(3, dim=1))
        self.bias = conv.bias.detach().float().clone()
        self.conv_fn = F.conv3d if isinstance(conv, nn.Conv3d) else F.conv2d
        self.padding, self.dilation = conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, C, *S)``, as the FV block."""
        f1 = self.reduce(x)  # (B, C, *S)
        gate = self.channel.weights(f1).float()  # (B, C or 1, 1, ...)
        both = torch.cat([f1, self.spatial(f1)], dim=1)  # (B, 2C, *S): F1 and F1 * s
        ones = (1,) * (self.w1.ndim - 2)
        channels_last = both.ndim == 5 and both.is_contiguous(memory_format=torch.channels_last_3d)
        memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        out = []
        for b in range(both.shape[0]):
            folded = self.w1 + self.w2 * gate[b].reshape(1, -1, *ones)  # (C, C, *k): W1 + W2 * c, float32
            weight = torch.cat([folded, self.w3], dim=1).to(both.dtype).contiguous(memory_format=memory_format)
            out.append(self.conv_fn(both[b : b + 1], weight, self.bias.to(both.dtype), padding=self.padding,
                                    dilation=self.dilation))
        return x + self.relu(torch.cat(out) if len(out) > 1 else out[0])


def fold_gates(model: nn.Module) -> nn.Module:
    """Replace every FV block of ``model`` (batch norm already folded) by its :class:`GateFoldedFV` (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, FVBlock):
                setattr(module, name, GateFoldedFV(child))
    return model


def deploy_copy(model: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> nn.Module:
    """An inference copy of ``model``: ``eval`` mode, batch norm folded, in bfloat16 the FV blocks' channel gates
    folded (:func:`fold_gates`), parameters in ``dtype`` and, for a 3D network, in ``channels_last_3d`` memory
    format when ``channels_last``.

    Args:
        model: a covidseg network (its ``ConvBNReLU`` blocks are folded; other modules are copied as they are).
        dtype: ``torch.float32`` or ``torch.bfloat16`` (feed inputs of the same dtype).
        channels_last: store 5D weights channels-last (feed ``channels_last_3d`` inputs).

    Returns:
        A new module on the same device as ``model``; ``model`` itself is not changed.
    """
    out = copy.deepcopy(model).eval()
    fold_batch_norm(out)
    if dtype == torch.bfloat16:  # in float32 a batch of 1 would take torch's slow convolution path
        fold_gates(out)
    out.to(dtype=dtype)
    if channels_last and int(getattr(out, "spatial_dims", 3)) == 3:
        out.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    for p in out.parameters():
        p.requires_grad_(False)
    return out
