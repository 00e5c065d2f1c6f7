"""The optimisation step every trainer runs: the model, Adam, autocast + grad scaler, the deep-supervision loss.

One home for what the 3D patch trainer (:mod:`covidseg.training.trainer`) and the 2D slice trainer
(:mod:`covidseg.training.slices`) share:

- :func:`make_engine`: the model on its device (channels-last on GPUs), Adam, the mixed-precision policy of
  :func:`covidseg.runtime.autocast_dtype` with its :class:`torch.amp.GradScaler` (fp16 only), and the report's
  loss ``0.5 BCE + Dice`` per head under deep supervision (:mod:`covidseg.losses`);
- :func:`train_step`: one optimizer step on one batch;
- :func:`poly_lr` and :func:`set_learning_rate`: nnU-Net's polynomial decay ``lr * (1 - step / steps)^0.9``;
- :func:`engine_state` / :func:`load_engine_state`: the optimizer, grad-scaler and torch RNG states a resumed run
  needs to end with the weights of an uninterrupted one, and :func:`save_state`, an atomic ``torch.save``.

The trainers differ only in where their batches come from (seeded 3D patches of cached volumes; 2D slices held
on the device, mixed with pseudo-labelled slices and augmented there) and in what they write at an epoch's end.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidseg.runtime import autocast_dtype

POLY_EXPONENT = 0.9
"""Exponent of the polynomial learning-rate decay (nnU-Net)."""


@dataclasses.dataclass
class Engine:
    """The model and what one optimizer step needs.

    Attributes:
        model: the bare model (saved and validated).
        net: what a step calls (``model`` itself, or its DistributedDataParallel wrapper under torchrun).
        channels_last: batches and weights in channels-last memory format (on GPUs: ``channels_last_3d`` for
            ``(B, C, D, H, W)`` batches, ``channels_last`` for ``(B, C, H, W)``).
    """

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp_dtype: torch.dtype | None
    channels_last: bool
    device: torch.device


def make_engine(
    model: nn.Module, device: torch.device, *, spatial_dims: int, learning_rate: float, weight_decay: float = 0.0,
    amp: str, bce_weight: float, dice_weight: float, amp_setting: str = "runtime.amp", batch_dice: bool = True,
    loss: str = "bce-dice",
) -> Engine:
    """``model`` moved to ``device`` with Adam, the grad scaler and the deep-supervision loss.

    Draws no random number: seed the weights before building ``model``.

    Args:
        model: the freshly built (or initialised) network.
        device: where it trains.
        spatial_dims: 2 or 3 (the channels-last format on GPUs).
        learning_rate: Adam's (initial) learning rate.
        weight_decay: Adam's L2 penalty.
        amp: mixed-precision mode (``auto``, ``bf16``, ``fp16``, ``off``; :func:`covidseg.runtime.autocast_dtype`).
        bce_weight: weight of the BCE term of the loss.
        dice_weight: weight of the soft Dice term.
        amp_setting: the option or config key ``amp`` came from, named in errors.
        batch_dice: the soft Dice over the whole batch (the report's loss) or per sample.
        loss: the per-head loss (:func:`covidseg.losses.segmentation_loss`): ``bce-dice`` (the report's, with the
            two weights and ``batch_dice``) or ``structure`` (Inf-Net's, 2D only).
    """
    from covidseg.losses import DeepSupervisionLoss, segmentation_loss

    model.to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        fmt = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
        model.to(memory_format=fmt)  # type: ignore[call-overload]
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    amp_dtype = autocast_dtype(amp, device, setting=amp_setting)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16 and device.type == "cuda")
    criterion = DeepSupervisionLoss(segmentation_loss(loss, bce_weight, dice_weight, batch_dice))
    return Engine(model, model, optimizer, scaler, criterion, amp_dtype, channels_last, device)


def poly_lr(base: float, step: int, total: int, exponent: float = POLY_EXPONENT) -> float:
    """nnU-Net's polynomial decay: ``base * (1 - step / total)^exponent`` at ``step`` of ``total``."""
    return base * (1.0 - step / total) ** exponent


def set_learning_rate(engine: Engine, lr: float) -> None:
    """Set the learning rate of every parameter group of the engine's optimizer."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def train_step(engine: Engine, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimizer step on a batch; returns its loss.

    Args:
        engine: from :func:`make_engine`.
        x: ``(B, C, D, H, W)`` or ``(B, C, H, W)`` input batch (moved to the engine's device).
        y: ``(B, K, D, H, W)`` or ``(B, K, H, W)`` targets in {0, 1}.
    """
    device = engine.device
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    if engine.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
    engine.optimizer.zero_grad(set_to_none=True)
    amp = engine.amp_dtype
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        outputs = engine.net(x)
    loss = engine.criterion(outputs, y)
    engine.scaler.scale(loss).backward()
    engine.scaler.step(engine.optimizer)
    engine.scaler.update()
    return float(loss.detach())


# ------------------------------------------------------------------------------------------------ state


def engine_state(engine: Engine) -> dict[str, Any]:
    """Optimizer, grad-scaler (when enabled) and torch RNG states, for :func:`load_engine_state`."""
    return {
        "optimizer": engine.optimizer.state_dict(),
        "scaler": engine.scaler.state_dict() if engine.scaler.is_enabled() else None,
        "torch_rng": torch.get_rng_state(),
    }


def load_engine_state(engine: Engine, saved: dict[str, Any]) -> None:
    """Restore what :func:`engine_state` saved (the model's weights are restored by the caller)."""
    raw = saved["optimizer"]
    # a checkpoint's meta may hold the parameter indices of ``state`` as strings
    engine.optimizer.load_state_dict({"state": {int(k): v for k, v in raw["state"].items()},
                                      "param_groups": raw["param_groups"]})
    if saved.get("scaler"):
        engine.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["torch_rng"])


def save_state(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` atomically: a killed write leaves the previous file intact."""
    from covidseg.io.atomic import atomic_path

    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


__all__ = ["POLY_EXPONENT", "Engine", "engine_state", "load_engine_state", "make_engine", "poly_lr", "save_state",
           "set_learning_rate", "train_step"]
