"""2D training on COVID-SemiSeg slices: the report's network in 2D mode, its loss, Adam, k-fold cross-validation.

The whole set (50 slices at 352x352) lives as one tensor on the training device; batches are drawn by a seeded
generator and augmented on the device (:mod:`covidseg.semiseg.augment`). The loss is the report's
``0.5 BCE + Dice`` per head, weighted 0.5 final / 0.5 shared by the other heads under deep supervision
(:mod:`covidseg.losses`). Held-out folds are scored at the end of training only (no checkpoint picking on the
test fold), predictions are resized back to each GT's own size and scored with Inf-Net's metric
(:mod:`covidseg.semiseg.metric`).

Settings differing from the report's 3D Table 1, for a short 2D schedule (documented in docs/benchmarks.md):
Adam at 1e-3 with polynomial decay (nnU-Net's ``(1 - t)^0.9``) instead of a constant 1e-4, batch 8 slices of
352x352 (Inf-Net's ``trainsize``) instead of 5 patches of 128x128x8.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from covidseg.errors import ConfigError, UserError
from covidseg.runtime import autocast_dtype
from covidseg.semiseg.augment import AugmentConfig, SliceAugment
from covidseg.semiseg.data import Slice, resize_image, resize_stack
from covidseg.semiseg.metric import slice_metrics, summarize

VARIANTS_2D = ("unet-2d", "unet-fv-se-2d", "unet-fv-paspp-2d", "unet-fv-paspp-ds-2d")
"""The 2D ablation: UNet, +FV (SE), +FV+PASPP, +FV+PASPP+DS (report Table 3, in 2D)."""
DEFAULT_VARIANT = "unet-fv-paspp-ds-2d"
"""The report's final model, 2D twin."""
TRAIN_SIZE = (352, 352)
"""Slices are resized to 352x352 (H, W) pixels for training and prediction, Inf-Net's ``trainsize``."""
POLY_EXPONENT = 0.9
"""Exponent of the polynomial learning-rate decay (nnU-Net)."""


@dataclass
class SemisegConfig:
    """Settings of a 2D COVID-SemiSeg run (written into every run folder and checkpoint)."""

    variant: str = DEFAULT_VARIANT
    """A 2D variant of :data:`covidseg.models.registry.MODELS` (``*-2d``)."""
    size: tuple[int, int] = TRAIN_SIZE
    """Training and prediction size (H, W) in pixels; each a multiple of 2^depth."""
    base_width: int = 16
    depth: int = 4
    epochs: int = 150
    """One epoch = ``n_train // batch_size`` batches (every slice seen about once)."""
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    poly_lr: bool = True
    """Polynomial decay ``lr * (1 - step / steps)^0.9``; off = constant learning rate (the report's)."""
    bce_weight: float = 0.5
    dice_weight: float = 1.0
    folds: int = 5
    seed: int = 0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Mixed precision, :func:`covidseg.runtime.autocast_dtype`: ``auto`` = bf16 on CUDA GPUs that have it, fp16 on
    older ones, off on the CPU."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) for JSON and checkpoints."""
        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return list(v)
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        return plain(dataclasses.asdict(self))


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr, or a no-op stand-in when tqdm is missing or progress is off."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the GPU machine may lack tqdm
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def update(self, n: int = 1) -> None: ...
            def set_postfix(self, **kw: Any) -> None: ...
            def close(self) -> None: ...
        return _Null()
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------- folds


def make_folds(n: int, k: int, seed: int = 0) -> list[list[int]]:
    """Split ``range(n)`` into ``k`` test folds of (almost) equal size, from a seeded permutation.

    Args:
        n: number of slices (in :func:`~covidseg.semiseg.data.load_folder` order).
        k: number of folds, 2 <= k <= n.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``k`` sorted lists of indices; together a partition of ``range(n)``.
    """
    if not 2 <= k <= n:
        raise ConfigError(f"--folds {k}: expected 2 to {n} (the number of slices)")
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(order, k)]


# --------------------------------------------------------------------------------------------- model


def heads_off(model: nn.Module) -> None:
    """Switch deep supervision off (inference returns the final output only), for models that have heads."""
    switch = getattr(model, "set_deep_supervision", None)
    if callable(switch):
        switch(False)


def build_model(cfg: SemisegConfig) -> nn.Module:
    """The 2D network of ``cfg.variant`` (one input channel, one infection channel)."""
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
) -> nn.Module:
    """Train a fresh model on resized slices.

    Args:
        images: ``(N, 1, H, W)`` float32 in [0, 1] at ``cfg.size``.
        masks: ``(N, 1, H, W)`` float32 in {0, 1}.
        cfg: the run's settings (``epochs``, ``batch_size``, ``learning_rate`` ...).
        device: where to train; the data is moved there once.
        seed: seeds the weights, the batch order and the augmentation (default ``cfg.seed``).
        desc: progress-bar label.
        progress: show a tqdm bar on stderr.
        log: called with ``{"epoch", "loss", "lr", "seconds"}`` after every epoch.

    Returns:
        The trained model in eval mode with deep supervision switched off.
    """
    from covidseg.losses import DeepSupervisionLoss, SegmentationLoss

    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    model = build_model(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    n = int(images.shape[0])
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = max(1, cfg.epochs * steps_per_epoch)
    images, masks = images.to(device), masks.to(device)
    loss_fn = DeepSupervisionLoss(SegmentationLoss(cfg.bce_weight, cfg.dice_weight))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    dtype = autocast_dtype(cfg.amp, device, setting="--amp")
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16 and device.type == "cuda")
    augment = SliceAugment(cfg.augment, seed=seed + 1)
    order_gen = torch.Generator().manual_seed(seed + 2)
    bar = _progress(total, desc, progress)
    model.train()
    step = 0
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=order_gen)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * batch:(b + 1) * batch].to(device)
            x, y = augment(images[idx], masks[idx])  # (B, 1, H, W) each
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            lr = cfg.learning_rate * ((1.0 - step / total) ** POLY_EXPONENT if cfg.poly_lr else 1.0)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise UserError(f"{desc}: the loss became {value} at step {step}; lower the learning rate")
            running += value
            step += 1
            bar.update(1)
        bar.set_postfix(loss=f"{running / steps_per_epoch:.3f}")
        if log is not None:
            log({"epoch": epoch + 1, "loss": running / steps_per_epoch, "lr": lr,
                 "seconds": time.perf_counter() - start})
    bar.close()
    model.eval()
    heads_off(model)
    return model


# --------------------------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_slices(
    model: nn.Module, slices: Sequence[Slice], size: tuple[int, int], device: torch.device,
    amp: str = "auto", batch: int = 8,
) -> list[np.ndarray]:
    """Sigmoid probability maps of ``slices``, each at its own GT size.

    The slice is resized to ``size``, the logits are resized back bilinearly to the slice's size and then passed
    through the sigmoid (Inf-Net's test script upsamples its logits the same way).

    Returns:
        One ``(H_i, W_i)`` float32 array per slice.
    """
    import torch.nn.functional as F

    model.eval()
    heads_off(model)
    dtype = autocast_dtype(amp, device, setting="--amp")
    out: list[np.ndarray] = []
    for start in range(0, len(slices), batch):
        chunk = slices[start:start + batch]
        x = torch.stack([resize_image(s.image, size) for s in chunk]).to(device)  # (b, 1, h, w)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        logits = logits.float()  # (b, 1, h, w)
        for i, s in enumerate(chunk):
            full = F.interpolate(logits[i:i + 1], size=s.shape, mode="bilinear", align_corners=False)
            out.append(torch.sigmoid(full)[0, 0].cpu().numpy())
    return out


def score_slices(probs: Sequence[np.ndarray], slices: Sequence[Slice]) -> list[dict[str, Any]]:
    """One row of metrics per slice (``name`` + :data:`~covidseg.semiseg.metric.METRIC_KEYS`)."""
    return [{"name": s.name, **slice_metrics(p, s.mask)} for p, s in zip(probs, slices, strict=True)]


# --------------------------------------------------------------------------------------------- protocols


def cross_validate(
    slices: Sequence[Slice],
    cfg: SemisegConfig,
    device: torch.device,
    *,
    progress: bool = True,
    on_fold: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """``cfg.folds``-fold cross-validation of ``cfg.variant`` over ``slices`` (folds from :func:`make_folds`).

    Each fold trains a fresh model (seed ``cfg.seed + fold``) on the other folds for ``cfg.epochs`` epochs and
    scores the final model on its held-out slices.

    Args:
        slices: the labelled slices.
        cfg: the run's settings.
        device: where to train.
        progress: tqdm bars on stderr.
        on_fold: called with each finished fold (to write partial results).
        should_stop: checked before each fold; ``True`` ends the run early (a time limit).

    Returns:
        ``{"variant", "folds": [{"fold", "test", "metrics", "rows", "seconds"}], "mean", "sd", "pooled",
        "complete"}``: per-fold means, their mean and sample sd over folds, the mean over all held-out slices,
        and whether every fold ran.
    """
    slices = list(slices)
    images, masks = resize_stack(slices, cfg.size)
    folds = make_folds(len(slices), cfg.folds, cfg.seed)
    results = []
    for k, test_idx in enumerate(folds):
        if should_stop is not None and should_stop():
            break
        t0 = time.perf_counter()
        held_out = set(test_idx)
        train_idx = [i for i in range(len(slices)) if i not in held_out]
        model = train_model(images[train_idx], masks[train_idx], cfg, device, seed=cfg.seed + k,
                            desc=f"{cfg.variant} fold {k + 1}/{len(folds)}", progress=progress)
        test = [slices[i] for i in test_idx]
        rows = score_slices(predict_slices(model, test, cfg.size, device, cfg.amp), test)
        fold = {"fold": k, "test": [s.name for s in test], "metrics": summarize(rows), "rows": rows,
                "seconds": time.perf_counter() - t0}
        results.append(fold)
        if on_fold is not None:
            on_fold(fold)
    summary = summarize_cv(cfg.variant, results)
    summary["complete"] = len(results) == len(folds)
    return summary


def summarize_cv(variant: str, folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample sd over folds of each metric, plus the mean over all held-out slices (``pooled``)."""
    from covidseg.metrics import mean_sd

    keys = list(folds[0]["metrics"]) if folds else []
    mean, sd = {}, {}
    for key in keys:
        mean[key], sd[key] = mean_sd([f["metrics"][key] for f in folds])
    pooled = summarize([r for f in folds for r in f["rows"]]) if folds else {}
    return {"variant": variant, "folds": folds, "mean": mean, "sd": sd, "pooled": pooled}


def train_final(
    slices: Sequence[Slice], cfg: SemisegConfig, device: torch.device, *, progress: bool = True
) -> nn.Module:
    """Train ``cfg.variant`` on every slice (seed ``cfg.seed``) for the shipped model."""
    images, masks = resize_stack(list(slices), cfg.size)
    return train_model(images, masks, cfg, device, seed=cfg.seed, desc=f"{cfg.variant} final", progress=progress)


def save_semiseg_checkpoint(
    path: Path | str, model: nn.Module, cfg: SemisegConfig, *, half: bool = True, **meta: Any
) -> Path:
    """Save with :func:`covidseg.checkpoint.save_checkpoint`; float weights in fp16 when ``half`` (half the size).

    ``load_checkpoint`` copies fp16 weights into its float32 model. The meta holds ``semiseg`` (the settings)
    and ``input_size`` (H, W) that :mod:`covidseg.semiseg.evaluate` resizes slices to.
    """
    from covidseg.checkpoint import save_checkpoint, unwrap_model
    from covidseg.config import Config

    bare = copy.deepcopy(unwrap_model(model)).cpu()
    bare = bare.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    if half:
        bare = bare.half()
    return save_checkpoint(path, bare, Config(), task="semiseg-infection-2d", semiseg=cfg.to_dict(),
                           input_size=list(cfg.size), weights_dtype="float16" if half else "float32", **meta)
