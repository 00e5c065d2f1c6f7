"""The CPU-only inference form ``runtime.cpu_kernels=onednn``: oneDNN's fused operators and the FV gates folded
into the fusion convolution, on top of the public form of :mod:`covidseg.models.deploy`.

- each FV block's channel gate folded into its fusion convolution (:class:`GateFoldedFV`): two C -> C convolutions
  instead of a 3C -> C one, without concatenating ``[F1, F1 * c, F1 * s]``;
- in float32, oneDNN's fused operators (``torch.ops.mkldnn._convolution_pointwise``, those torch.compile's CPU
  backend emits; a private torch API, probed once by :func:`onednn_fused_ops`): convolution + ReLU in one call
  (:class:`ConvReLU`), the FV fusion's sum, bias and ReLU as post-ops of the per-sample convolution. Where they are
  missing or wrong, and in bfloat16, the same maps run as plain convolutions.

The plain model is the reference of ``tests/test_deploy.py``; docs/performance.md has the figures.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from covidseg.models.blocks import CEChannelAttention, ConvBNReLU, FVBlock, SEChannelAttention


@functools.cache
def onednn_fused_ops() -> bool:
    """Whether this torch has oneDNN's fused convolution operators (``torch.ops.mkldnn._convolution_pointwise``
    and its in-place binary form) and they compute float32 right on this CPU: checked once on a tiny convolution
    against ``F.conv3d``, so that a build or CPU where they are missing or fail falls back to plain convolutions
    instead of failing in the middle of a CT."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x = torch.arange(32, dtype=torch.float32).reshape(1, 2, 2, 2, 4).sub(16).div(8)
        w = torch.linspace(-1, 1, 2 * 2 * 27).reshape(2, 2, 3, 3, 3)
        args = ([1, 1, 1], [1, 1, 1], [1, 1, 1], 1)
        expected = F.relu(F.conv3d(x, w, padding=1))
        y = torch.ops.mkldnn._convolution_pointwise(x, w, None, *args, "relu", [], "")
        other = torch.zeros_like(y)
        torch.ops.mkldnn._convolution_pointwise_(other, x, w, None, *args, "add", 1.0, "relu", [], "")
        return all(bool(torch.allclose(t, expected, atol=1e-5)) for t in (y, other))
    except (AttributeError, RuntimeError, NotImplementedError, TypeError, ValueError):  # missing, or another schema
        return False


def _fused(x: torch.Tensor) -> bool:
    """Whether ``x`` goes through oneDNN's fused operators: a float32 CPU tensor. (In bfloat16 they measured no
    faster than plain convolutions, which oneDNN runs anyway.)"""
    return x.device.type == "cpu" and x.dtype == torch.float32 and onednn_fused_ops()


def _conv_args(conv: nn.Conv2d | nn.Conv3d) -> tuple[list[int], list[int], list[int], int]:
    """``padding, stride, dilation, groups`` of ``conv`` as oneDNN's operators take them."""
    assert not isinstance(conv.padding, str), "explicit padding only"
    return list(conv.padding), list(conv.stride), list(conv.dilation), int(conv.groups)


class ConvReLU(nn.Module):
    """A batch-norm folded :class:`~covidseg.models.blocks.ConvBNReLU`: ``relu(conv(x))``, in float32 on the CPU as
    one oneDNN call (ReLU as the convolution's post-op: no second pass over the output)."""

    def __init__(self, conv: nn.Conv2d | nn.Conv3d) -> None:
        super().__init__()
        self.conv = conv
        self.args = _conv_args(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S) -> (B, C_out, *S)``."""
        if _fused(x):
            return torch.ops.mkldnn._convolution_pointwise(x, self.conv.weight, self.conv.bias, *self.args,
                                                           "relu", [], "")
        return F.relu(self.conv(x), inplace=True)


class GateFoldedFV(nn.Module):
    """A (batch-norm folded) :class:`~covidseg.models.blocks.FVBlock` whose channel gate is folded into the fusion
    convolution, the same map with a third fewer FLOPs in that convolution.

    The block's fusion is ``relu(conv_W(concat[F1, F1 * c, F1 * s]) + b)`` with ``W = [W1 | W2 | W3]`` split over
    its input channels, ``c`` the channel gate (one weight per channel and sample) and ``s`` the spatial map.
    Since ``conv_W2(F1 * c) = conv_{W2 * c}(F1)``, it equals ``relu(conv_{W1 + W2 * c}(F1) + conv_W3(F1 * s) + b)``:
    two C -> C convolutions instead of a 3C -> C one. ``conv_W3`` runs on the whole batch; the first has weights
    made per sample (``c`` differs between samples) and, in float32 on the CPU, adds ``conv_W3``'s output, the bias
    and the ReLU in place (one oneDNN call per sample).
    """

    def __init__(self, fv: FVBlock) -> None:
        super().__init__()
        conv = fv.fuse[0]
        assert isinstance(conv, (nn.Conv2d, nn.Conv3d)) and conv.bias is not None, "fold batch norm first"
        self.reduce, self.spatial = fv.reduce, fv.spatial
        assert isinstance(fv.channel, (SEChannelAttention, CEChannelAttention))
        self.channel: SEChannelAttention | CEChannelAttention = fv.channel
        w1, w2, w3 = conv.weight.detach().chunk(3, dim=1)
        # buffers: in the state dict, converted and moved with the copy; W1 + W2 * c is formed in float32 per sample
        self.register_buffer("w1", w1.clone())
        self.register_buffer("w2", w2.clone())
        make: Any = type(conv)  # Conv2d or Conv3d, typed by torch with fixed-length tuples
        self.conv_w3 = make(w3.shape[1], w3.shape[0], conv.kernel_size, padding=conv.padding,
                           dilation=conv.dilation, bias=False).to(w3.device)
        self.conv_w3.weight.data.copy_(w3)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.args = _conv_args(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, C, *S)``, as the FV block."""
        f1 = self.reduce(x)  # (B, C, *S)
        gate = self.channel.weights(f1).float()  # (B, C, 1, ...)
        fused = _fused(f1)
        s = self.spatial.weights(f1)  # (B, 1, *S)
        # F1 * s, (B, C, *S); on the CPU a bf16 * bf16 product broadcast over the channels is slower than
        # bf16 * float32 rounded to bf16, the same values (both are the float32 product rounded once)
        cpu_bf16 = f1.device.type == "cpu" and f1.dtype == torch.bfloat16
        fs = (f1 * s.float()).to(f1.dtype) if cpu_bf16 else f1 * s
        if fused:
            out = torch.ops.mkldnn._convolution_pointwise(fs, self.conv_w3.weight, None, *self.args, "none",
                                                          [], "")  # conv_W3(F1 * s)
        else:
            out = self.conv_w3(fs)
        del s, fs
        w1, w2 = cast(torch.Tensor, self.w1).float(), cast(torch.Tensor, self.w2).float()
        ones = (1,) * (w1.ndim - 2)
        channels_last = f1.ndim == 5 and f1.is_contiguous(memory_format=torch.channels_last_3d)
        memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        bias = self.bias.to(f1.dtype)
        conv_fn = F.conv3d if f1.ndim == 5 else F.conv2d
        padding, _, dilation, _ = self.args
        for b in range(f1.shape[0]):
            weight = (w1 + w2 * gate[b].reshape(1, -1, *ones)).to(f1.dtype).contiguous(
                memory_format=memory_format)  # (C, C, *k): W1 + W2 * c, rounded once
            if fused:  # out[b] = relu(conv(F1[b]) + bias + out[b]), in place
                torch.ops.mkldnn._convolution_pointwise_(out[b : b + 1], f1[b : b + 1], weight, bias, *self.args,
                                                         "add", 1.0, "relu", [], "")
            else:
                out[b : b + 1] = F.relu(conv_fn(f1[b : b + 1], weight, bias, padding=padding, dilation=dilation)
                                        + out[b : b + 1])
        return out.add_(x)


def _replace(model: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]) -> None:
    """Replace, in place, every sub-module of ``model`` for which ``match`` holds by ``make(sub-module)``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if match(child):
                setattr(module, name, make(child))


def onednn_form(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Turn a batch-norm folded copy (:func:`covidseg.models.deploy.fold_batch_norm`) into the ``onednn`` form, in
    place: every FV block a :class:`GateFoldedFV` (in float32 only where :func:`onednn_fused_ops` holds: torch would
    send each sample's float32 convolution through its slow im2col path), every ``ConvBNReLU`` a :class:`ConvReLU`.

    Returns:
        ``model``.
    """
    if dtype == torch.bfloat16 or onednn_fused_ops():
        _replace(model, lambda m: isinstance(m, FVBlock), GateFoldedFV)  # type: ignore[arg-type]
    _replace(model, lambda m: isinstance(m, ConvBNReLU) and isinstance(m[1], nn.Identity),
             lambda m: ConvReLU(cast(ConvBNReLU, m)[0]))  # type: ignore[arg-type]
    return model
