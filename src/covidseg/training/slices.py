"""2D training on CT slices: the report's network in 2D mode, trained by the step of :mod:`covidseg.training.loop`.

The slices (e.g. COVID-SemiSeg's 50 at 352x352) live as one tensor on the training device; :class:`SliceBatches`
draws each batch by seeded generators (the labelled slices in a per-epoch order, pseudo-labelled slices at
random) and augments it on the device (:mod:`covidseg.training.augment`). The step, the loss (the report's
``0.5 BCE + Dice`` per head, 0.5 final / 0.5 shared by the other heads under deep supervision), Adam, the
polynomial decay and the mixed-precision policy are those of the 3D trainer (:mod:`covidseg.training.loop`); the
settings are a :class:`covidseg.config.SemisegConfig`.

A run given a ``state_path`` saves its whole state there (weights, optimizer, grad scaler, the torch RNG and the
batch source's generators; atomically) and, when the file exists, continues from it to the weights of an
uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from covidseg.config import SemisegConfig
from covidseg.errors import ConfigError, UserError
from covidseg.models.heads import set_heads
from covidseg.progress import progress_bar
from covidseg.training.augment import SliceAugment
from covidseg.training.loop import (
    Engine,
    engine_state,
    load_engine_state,
    make_engine,
    poly_lr,
    save_state,
    set_learning_rate,
    train_step,
)

AMP_OPTION = "--amp"
"""The option a 2D run's ``amp`` comes from, named in errors."""


def build_model(cfg: SemisegConfig) -> nn.Module:
    """The 2D network of ``cfg.variant`` (one input channel, one infection channel).

    Raises:
        ConfigError: a variant that is not 2D, or a size that does not fit the poolings.
    """
    from covidseg.models import create_model
    from covidseg.models.registry import MODELS, variant_config

    if cfg.variant not in MODELS or MODELS[cfg.variant].get("spatial_dims") != 2:
        names = ", ".join(n for n, s in MODELS.items() if s.get("spatial_dims") == 2)
        raise ConfigError(f"--variant {cfg.variant!r}: expected a 2D variant ({names})")
    model = create_model(variant_config(cfg.variant, base_width=cfg.base_width, depth=cfg.depth,
                                        in_channels=1, out_channels=1))
    div = model.size_divisor
    if any(s % d for s, d in zip(cfg.size, div, strict=True)):
        raise ConfigError(f"size {cfg.size}: each side must be a multiple of {div} for depth {cfg.depth}")
    return model


class SliceBatches:
    """The batches of a 2D run: labelled slices in a seeded per-epoch order, pseudo-labelled ones mixed in.

    Each batch holds ``n_labelled`` labelled slices (the next ones of the epoch's permutation; one epoch = every
    labelled slice once) and ``n_pseudo`` pseudo-labelled slices drawn at random, then goes through the seeded
    :class:`~covidseg.training.augment.SliceAugment`, then, with several ``cfg.scales``, is resized by one of them
    (images bilinearly, masks bilinearly and binarised at 0.5). Every random draw comes from the batch source's own
    generators (seeds ``seed + 1`` augmentation, ``seed + 2`` order, ``seed + 3`` pseudo draws, ``seed + 4``
    scales).

    Args:
        images: ``(N, 1, H, W)`` labelled images in [0, 1] (moved to ``device`` once).
        masks: ``(N, 1, H, W)`` masks in {0, 1}.
        pseudo: ``(M, 1, H, W)`` pseudo-labelled images and masks, or ``None``.
        cfg: ``batch_size``, ``pseudo_per_batch`` and ``augment`` are read.
        seed: the run's seed.
        device: where the slices live and are augmented.
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, pseudo: tuple[torch.Tensor, torch.Tensor] | None,
                 cfg: SemisegConfig, seed: int, device: torch.device) -> None:
        n = int(images.shape[0])
        self.n_pseudo = min(cfg.pseudo_per_batch, cfg.batch_size - 1) if pseudo is not None else 0
        self.n_labelled = min(cfg.batch_size - self.n_pseudo, n)
        self.steps_per_epoch = max(1, n // self.n_labelled)
        self.images, self.masks = images.to(device), masks.to(device)
        self.pseudo = None if pseudo is None else (pseudo[0].to(device), pseudo[1].to(device))
        self.augment = SliceAugment(cfg.augment, seed=seed + 1)
        self.order_gen = torch.Generator().manual_seed(seed + 2)
        self.pseudo_gen = torch.Generator().manual_seed(seed + 3)
        self.scale_gen = torch.Generator().manual_seed(seed + 4)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        self.sizes = scaled_sizes(size, cfg.scales, 2 ** cfg.depth)
        self.rescale = self.sizes != [size]
        """Whether batches are resized (``cfg.scales`` other than ``(1.0,)``)."""
        self.perm: torch.Tensor | None = None
        """The current epoch's order of the labelled slices."""

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented batch of ``step`` (steps are drawn in order): ``(B, 1, H, W)`` images and masks."""
        b = step % self.steps_per_epoch
        if b == 0 or self.perm is None:
            self.perm = torch.randperm(int(self.images.shape[0]), generator=self.order_gen)
        idx = self.perm[b * self.n_labelled:(b + 1) * self.n_labelled]
        x, y = self.images[idx.to(self.images.device)], self.masks[idx.to(self.masks.device)]
        if self.pseudo is not None and self.n_pseudo > 0:
            pidx = torch.randint(int(self.pseudo[0].shape[0]), (self.n_pseudo,), generator=self.pseudo_gen)
            x = torch.cat([x, self.pseudo[0][pidx.to(x.device)]])
            y = torch.cat([y, self.pseudo[1][pidx.to(y.device)]])
        x, y = self.augment(x, y)  # (B, 1, H, W) each
        if self.rescale:
            size = self.sizes[int(torch.randint(len(self.sizes), (1,), generator=self.scale_gen))]
            if size != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                y = (F.interpolate(y, size=size, mode="bilinear", align_corners=False) >= 0.5).to(y.dtype)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        """The epoch's order and the generators' states (for :meth:`load_state_dict`)."""
        return {"perm": self.perm, "order": self.order_gen.get_state(), "pseudo": self.pseudo_gen.get_state(),
                "augment": self.augment.generator.get_state(), "scale": self.scale_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream :meth:`state_dict` saved."""
        self.perm = state["perm"]
        self.order_gen.set_state(state["order"])
        self.pseudo_gen.set_state(state["pseudo"])
        self.augment.generator.set_state(state["augment"])
        if "scale" in state:  # a state saved before multi-scale training existed drew no scale
            self.scale_gen.set_state(state["scale"])


def scaled_sizes(size: tuple[int, int], scales: tuple[float, ...], divisor: int) -> list[tuple[int, int]]:
    """``size`` times each of ``scales``, each side rounded to the nearest multiple of ``divisor`` (at least one).

    Raises:
        ConfigError: an empty ``scales`` or a factor that is not positive.
    """
    if not scales or any(not (f > 0) for f in scales):
        raise ConfigError(f"scales {list(scales)}: expected one or more positive factors (e.g. 0.75,1,1.25)")
    return [tuple(max(divisor, int(round(side * f / divisor)) * divisor) for side in size)  # type: ignore[misc]
            for f in scales]


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (``torch.optim.swa_utils``), or ``None``
    when ``decay`` is 0.

    Raises:
        ConfigError: a decay outside [0, 1).
    """
    if not 0.0 <= decay < 1.0:
        raise ConfigError(f"ema_decay {decay}: expected 0 (off) or a decay in (0, 1), e.g. 0.98")
    if decay == 0.0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _save(path: Path, engine: Engine, batches: SliceBatches, cfg: SemisegConfig, step: int, running: float,
          average: AveragedModel | None) -> None:
    """Write the run's state atomically (a killed write leaves the previous state intact)."""
    save_state(path, {"config": cfg.to_dict(), "step": step, "running": running,
                      "model": engine.model.state_dict(), "train_state": engine_state(engine),
                      "batches": batches.state_dict(),
                      "average": None if average is None else average.state_dict()})


def _resume(path: Path, engine: Engine, batches: SliceBatches, cfg: SemisegConfig,
            average: AveragedModel | None) -> tuple[int, float]:
    """Restore a state written by :func:`_save` for the same settings; returns its step and running loss sum."""
    hint = "delete it to start this stage again"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable training state ({exc}); {hint}") from None
    if not isinstance(state, dict) or not {"train_state", "batches", "model", "step"} <= set(state):
        raise UserError(f"{path}: not a training state of this version of covidseg; {hint}")
    # a setting added after the state was saved ran at its default
    saved = {**SemisegConfig().to_dict(), **state["config"]} if isinstance(state.get("config"), dict) else None
    if saved is not None:  # how the model will predict is not the training's business
        saved = {k: v for k, v in saved.items() if k not in SemisegConfig.PREDICTION_KEYS}
    wanted = {k: v for k, v in cfg.to_dict().items() if k not in SemisegConfig.PREDICTION_KEYS}
    if saved != wanted:
        raise ConfigError(f"{path}: saved by a run with other settings; rerun with the same settings or {hint}")
    engine.model.load_state_dict(state["model"])
    load_engine_state(engine, state["train_state"])
    batches.load_state_dict(state["batches"])
    if average is not None and state.get("average") is not None:
        average.load_state_dict(state["average"])
    return int(state["step"]), float(state["running"])


def train_model(
    images: torch.Tensor,
    masks: torch.Tensor,
    cfg: SemisegConfig,
    device: torch.device,
    *,
    seed: int | None = None,
    desc: str = "train",
    progress: bool = True,
    log: Callable[[dict[str, Any]], None] | None = None,
    init: dict[str, torch.Tensor] | None = None,
    pseudo: tuple[torch.Tensor, torch.Tensor] | None = None,
    state_path: Path | None = None,
    save_every_s: float = 300.0,
) -> nn.Module:
    """Train a model on resized slices, optionally from given weights, mixed with pseudo-labelled slices, resumably.

    Args:
        images: ``(N, 1, H, W)`` float32 in [0, 1] at ``cfg.size``.
        masks: ``(N, 1, H, W)`` float32 in {0, 1}.
        cfg: the run's settings (``epochs``, ``batch_size``, ``learning_rate``, ``pseudo_per_batch`` ...).
        device: where to train; the data is moved there once.
        seed: seeds the weights, the batch order and the augmentation (default ``cfg.seed``).
        desc: progress-bar and log label.
        progress: show a progress bar on stderr (:func:`covidseg.progress.progress_bar`).
        log: called with ``{"epoch", "step", "loss", "lr", "seconds"}`` after every epoch.
        init: a state dict to start from (a pretrained model) instead of fresh weights.
        pseudo: ``(M, 1, H, W)`` images and masks of pseudo-labelled slices; each batch then holds
            ``cfg.pseudo_per_batch`` of them (drawn at random) and ``cfg.batch_size - cfg.pseudo_per_batch``
            labelled slices (one epoch = every labelled slice once).
        state_path: where the run's state is saved every ``save_every_s`` seconds and at the end; when the file
            exists the run continues from it and ends with the same weights as an uninterrupted run.
        save_every_s: seconds between two saves of the state (0 = after every step).

    Returns:
        The trained model in eval mode with deep supervision switched off; with ``cfg.ema_decay`` it holds the
        moving average of the weights (:func:`weight_average`) instead of the last step's.

    Raises:
        UserError: the loss became NaN or infinite (names the step; lower the learning rate).
    """
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    model = build_model(cfg)
    if init is not None:
        model.load_state_dict(init)
    engine = make_engine(model, device, spatial_dims=2, learning_rate=cfg.learning_rate,
                         weight_decay=cfg.weight_decay, amp=cfg.amp, bce_weight=cfg.bce_weight,
                         dice_weight=cfg.dice_weight, amp_setting=AMP_OPTION, batch_dice=cfg.batch_dice,
                         loss=cfg.loss)
    batches = SliceBatches(images, masks, pseudo, cfg, seed, device)
    average = weight_average(engine.model, cfg.ema_decay)
    per_epoch = batches.steps_per_epoch
    total = max(1, cfg.epochs * per_epoch)
    step, running = 0, 0.0  # running: sum of the losses of the epoch in progress
    if state_path is not None and Path(state_path).is_file():
        step, running = _resume(Path(state_path), engine, batches, cfg, average)
    bar = progress_bar(total=total, initial=step, desc=desc, unit="step", disable=not progress, leave=False)
    engine.net.train()
    start = last_save = time.perf_counter()
    while step < total:
        x, y = batches.batch(step)
        lr = poly_lr(cfg.learning_rate, step, total) if cfg.poly_lr else cfg.learning_rate
        set_learning_rate(engine, lr)
        value = train_step(engine, x, y)
        if not math.isfinite(value):
            raise UserError(f"{desc}: the loss became {value} at step {step}; lower the learning rate")
        running += value
        step += 1
        if average is not None:
            average.update_parameters(engine.model)
        bar.update(1)
        if step % per_epoch == 0:
            bar.set_postfix(loss=f"{running / per_epoch:.3f}")
            if log is not None:
                log({"epoch": step // per_epoch, "step": step, "loss": running / per_epoch, "lr": lr,
                     "seconds": time.perf_counter() - start})
            running = 0.0
        if state_path is not None and (step == total or time.perf_counter() - last_save >= save_every_s):
            _save(Path(state_path), engine, batches, cfg, step, running, average)
            last_save = time.perf_counter()
    bar.close()
    if average is not None:
        engine.model.load_state_dict(average.module.state_dict())
    set_heads(engine.model, False)
    engine.model.eval()
    return engine.model


SOUP_SEED_STRIDE = 1000
"""Member ``j`` of a soup trains with seed ``seed + SOUP_SEED_STRIDE * j`` (clear of the folds' ``seed + k``)."""


def tagged_state_path(state_path: Path | str, tag: str) -> Path:
    """``NAME.<tag>.state.pt`` beside the state file ``NAME.state.pt`` (the state of a part of that run)."""
    path = Path(state_path)
    stem = path.name[:-len(".state.pt")] if path.name.endswith(".state.pt") else path.stem
    return path.with_name(f"{stem}.{tag}.state.pt")


def member_state_path(state_path: Path | None, member: int) -> Path | None:
    """Member 0 keeps ``state_path``; member ``j`` > 0 saves to ``NAME.m<j>.state.pt`` beside it."""
    if state_path is None or member == 0:
        return state_path
    return tagged_state_path(state_path, f"m{member}")


def train_soup(
    images: torch.Tensor, masks: torch.Tensor, cfg: SemisegConfig, device: torch.device, *,
    seed: int | None = None, desc: str = "train", state_path: Path | None = None,
    log: Callable[[dict[str, Any]], None] | None = None, **kwargs: Any,
) -> nn.Module:
    """:func:`train_model`, or with ``cfg.soup`` > 1 that many members averaged into one model (a uniform soup).

    Every member starts from the same ``init`` (arguments of :func:`train_model`); member ``j`` draws with seed
    ``seed + SOUP_SEED_STRIDE * j`` and keeps its resumable state at :func:`member_state_path`. The weights and
    batch-norm buffers are their mean (``torch.optim.swa_utils.AveragedModel``); a member's log records carry
    ``"member"``.

    Raises:
        ConfigError: ``cfg.soup`` < 1.
    """
    if cfg.soup < 1:
        raise ConfigError(f"soup {cfg.soup}: expected 1 (one model) or more members")
    seed = cfg.seed if seed is None else seed
    if cfg.soup == 1:
        return train_model(images, masks, cfg, device, seed=seed, desc=desc, state_path=state_path, log=log,
                           **kwargs)
    first: nn.Module | None = None
    average: AveragedModel | None = None
    for j in range(cfg.soup):
        member_log = None if log is None else (lambda rec, j=j: log({"member": j, **rec}))
        model = train_model(images, masks, cfg, device, seed=seed + SOUP_SEED_STRIDE * j,
                            desc=f"{desc} member {j + 1}/{cfg.soup}", state_path=member_state_path(state_path, j),
                            log=member_log, **kwargs)
        if average is None:
            first, average = model, AveragedModel(model, use_buffers=True)  # the running mean of the members
        average.update_parameters(model)  # the first call copies, each later one averages in
    assert first is not None and average is not None
    first.load_state_dict(average.module.state_dict())
    return first


__all__ = ["SOUP_SEED_STRIDE", "SliceBatches", "build_model", "member_state_path", "scaled_sizes",
           "tagged_state_path", "train_model", "train_soup", "weight_average"]
