"""The inference form of a trained network: batch norm folded into the convolutions, weights stored in the
compute dtype and memory format.

Sliding-window inference (:mod:`covidseg.inference.sliding_window`) runs a copy made by :func:`deploy_copy`
instead of the training module. The first three steps together take an 8x128x128 window of the full model from
0.111 s (autocast) to 0.083 s on the development CPU; the fourth a further 7-15 %, the fifth and sixth 0-14 % in bf16
(within the shared cores' noise) and 15-19 % in float32 (``benchmarks/window_speed.py``, docs/performance.md):

- batch norm folded into the preceding convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``): one pass over
  the activations less per ``ConvBNReLU``; exact up to float rounding (max |logit diff| 7.5e-8 in float32);
- weights in ``channels_last_3d`` like the input: oneDNN then runs its blocked channels-last kernels without
  reordering the weights around every convolution (converting only the input, as before, gained nothing);
- weights and activations in bfloat16 instead of float32 weights under autocast, where bf16 is used: no cast of
  every weight on every call (autocast computed these convolutions in bf16 already, so the answer is the same to
  bf16 rounding);
- each FV block's channel gate folded into its fusion convolution (:class:`GateFoldedFV`): two C -> C convolutions
  instead of a 3C -> C one (in float32 only where oneDNN's fused operators run, below: torch sends a float32 batch of
  one through its slow im2col convolution);
- the FV fusion as ``relu(conv_a(F1) + conv_b(F1 * s))``, without concatenating ``[F1, F1 * s]``;
- in float32 on the CPU, oneDNN's fused operators (``torch.ops.mkldnn._convolution_pointwise``, those
  torch.compile's CPU backend emits): convolution + ReLU in one call (:class:`ConvReLU`), the FV fusion's sum and
  ReLU applied in place, and the per-sample convolutions kept on oneDNN. Elsewhere (bf16, a GPU, a torch without
  them) the same maps run as plain convolutions, which the tests compare them against.

The copy is for inference only (``eval`` mode, batch norm statistics frozen); the original is left untouched.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

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
    faster than plain convolutions, which oneDNN runs anyway, and torch's fallback for small shapes has no bf16
    add + ReLU.)"""
    return x.device.type == "cpu" and x.dtype == torch.float32 and onednn_fused_ops()


def _conv_args(conv: nn.Conv2d | nn.Conv3d) -> tuple[list[int], list[int], list[int], int]:
    """``padding, stride, dilation, groups`` of ``conv`` as oneDNN's operators take them."""
    assert not isinstance(conv.padding, str), "explicit padding only"
    return list(conv.padding), list(conv.stride), list(conv.dilation), int(conv.groups)


class ConvReLU(nn.Module):
    """A batch-norm folded :class:`~covidseg.models.blocks.ConvBNReLU`: ``relu(conv(x))``, on the CPU as one oneDNN
    call (ReLU as the convolution's post-op: no second pass over the output)."""

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


def fuse_relu(model: nn.Module) -> nn.Module:
    """Replace every batch-norm folded :class:`~covidseg.models.blocks.ConvBNReLU` of ``model`` by a
    :class:`ConvReLU` (in place)."""
    _replace(model, lambda m: isinstance(m, ConvBNReLU) and isinstance(m[1], nn.Identity),
             lambda m: ConvReLU(cast(ConvBNReLU, m)[0]))  # type: ignore[arg-type]
    return model


def _replace(model: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]) -> None:
    """Replace, in place, every sub-module of ``model`` for which ``match`` holds by ``make(sub-module)``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if match(child):
                setattr(module, name, make(child))


class GateFoldedFV(nn.Module):
    """A (batch-norm folded) :class:`~covidseg.models.blocks.FVBlock` whose channel gate is folded into the fusion
    convolution, the same map with a third fewer FLOPs in that convolution.

    The block's fusion is ``relu(conv_W(concat[F1, F1 * c, F1 * s]) + b)`` with ``W = [W1 | W2 | W3]`` split over
    its input channels, ``c`` the channel gate (one weight per channel or per sample) and ``s`` the spatial map.
    Since ``conv_W2(F1 * c) = conv_{W2 * c}(F1)``, it equals ``relu(conv_{W1 + W2 * c}(F1) + conv_W3(F1 * s) + b)``:
    two C -> C convolutions instead of a 3C -> C one. ``conv_W3`` runs on the whole batch; the first has weights
    made per sample (``c`` differs between samples), and on the CPU adds ``conv_W3``'s output, the bias and the
    ReLU in place (one oneDNN call per sample, no concatenation).
    """

    def __init__(self, fv: FVBlock) -> None:
        super().__init__()
        conv = fv.fuse[0]
        assert isinstance(conv, (nn.Conv2d, nn.Conv3d)) and conv.bias is not None, "fold batch norm first"
        self.reduce, self.spatial = fv.reduce, fv.spatial
        assert isinstance(fv.channel, (SEChannelAttention, CEChannelAttention))
        self.channel: SEChannelAttention | CEChannelAttention = fv.channel
        w1, w2, w3 = conv.weight.detach().float().chunk(3, dim=1)
        # plain float32 tensors, not parameters: ``Module.to(bfloat16)`` leaves them in float32, so the per-sample
        # weights are formed in float32 and rounded once (the copy is made on its device and never moved)
        self.w1, self.w2 = w1.clone(), w2.clone()
        # conv_W3 (the fusion convolution's part over F1 * s) and the bias are ordinary parameters: they follow the
        # copy's dtype and memory format
        make: Any = type(conv)  # Conv2d or Conv3d, typed by torch with fixed-length tuples
        self.conv_w3 = make(w3.shape[1], w3.shape[0], conv.kernel_size, padding=conv.padding,
                           dilation=conv.dilation, bias=False).to(w3.device)
        self.conv_w3.weight.data.copy_(w3)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.args = _conv_args(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, C, *S)``, as the FV block."""
        f1 = self.reduce(x)  # (B, C, *S)
        gate = self.channel.weights(f1).float()  # (B, C or 1, 1, ...)
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
        ones = (1,) * (self.w1.ndim - 2)
        channels_last = f1.ndim == 5 and f1.is_contiguous(memory_format=torch.channels_last_3d)
        memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        bias = self.bias.to(f1.dtype)
        conv_fn = F.conv3d if f1.ndim == 5 else F.conv2d
        padding, _, dilation, _ = self.args
        for b in range(f1.shape[0]):
            weight = (self.w1 + self.w2 * gate[b].reshape(1, -1, *ones)).to(f1.dtype).contiguous(
                memory_format=memory_format)  # (C, C, *k): W1 + W2 * c, rounded once
            if fused:  # out[b] = relu(conv(F1[b]) + bias + out[b]), in place
                torch.ops.mkldnn._convolution_pointwise_(out[b : b + 1], f1[b : b + 1], weight, bias, *self.args,
                                                         "add", 1.0, "relu", [], "")
            else:
                out[b : b + 1] = F.relu(conv_fn(f1[b : b + 1], weight, bias, padding=padding, dilation=dilation)
                                        + out[b : b + 1])
        return out.add_(x)


def fold_gates(model: nn.Module) -> nn.Module:
    """Replace every FV block of ``model`` (batch norm already folded) by its :class:`GateFoldedFV` (in place)."""
    _replace(model, lambda m: isinstance(m, FVBlock), GateFoldedFV)  # type: ignore[arg-type]
    return model


def deploy_copy(model: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> nn.Module:
    """An inference copy of ``model``: ``eval`` mode, batch norm folded, the FV blocks' channel gates folded
    (:func:`fold_gates`; in float32 only on the CPU with oneDNN's fused operators), every ``ConvBNReLU`` a
    :class:`ConvReLU`, parameters in ``dtype`` and, for a 3D network, in ``channels_last_3d`` memory format when
    ``channels_last``.

    Args:
        model: a covidseg network (its ``ConvBNReLU`` blocks are folded; other modules are copied as they are).
        dtype: ``torch.float32`` or ``torch.bfloat16`` (feed inputs of the same dtype).
        channels_last: store 5D weights channels-last (feed ``channels_last_3d`` inputs).

    Returns:
        A new module on the same device as ``model``; ``model`` itself is not changed.
    """
    out = copy.deepcopy(model).eval()
    fold_batch_norm(out)
    on_cpu = all(p.device.type == "cpu" for p in out.parameters())
    # the folded gates run sample by sample: in float32 only through oneDNN's operators, as torch would send a
    # float32 batch of one through its slow im2col convolution
    if dtype == torch.bfloat16 or (on_cpu and onednn_fused_ops()):
        fold_gates(out)
    fuse_relu(out)
    out.to(dtype=dtype)
    if channels_last and int(getattr(out, "spatial_dims", 3)) == 3:
        out.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    for p in out.parameters():
        p.requires_grad_(False)
    return out
