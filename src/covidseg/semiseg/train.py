"""The COVID-SemiSeg protocol: k-fold cross-validation of the 2D models, pretraining, the final model, scoring.

Every model is trained by :func:`covidseg.training.slices.train_model` (the 3D trainer's step on 2D slices;
settings :class:`covidseg.config.SemisegConfig`). Held-out folds are scored at the end of training only (no
checkpoint picking on the test fold), predictions are resized back to each GT's own size and scored with
Inf-Net's metric (:mod:`covidseg.semiseg.metric`).

Settings differing from the report's 3D Table 1, for a short 2D schedule (documented in docs/benchmarks.md):
Adam at 1e-3 with polynomial decay (nnU-Net's ``(1 - t)^0.9``) instead of a constant 1e-4, batch 8 slices of
352x352 (Inf-Net's ``trainsize``) instead of 5 patches of 128x128x8.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from covidseg.config import FLIP_TTA, SemisegConfig, flip_tta_dims
from covidseg.errors import ConfigError
from covidseg.models.heads import set_heads
from covidseg.runtime import autocast_dtype
from covidseg.semiseg.data import Slice, resize_image, resize_stack
from covidseg.semiseg.metric import slice_metrics, summarize
from covidseg.training.slices import tagged_state_path, train_model, train_soup

VARIANTS_2D = ("unet-2d", "unet-fv-se-2d", "unet-fv-paspp-2d", "unet-fv-paspp-ds-2d")
"""The 2D ablation: UNet, +FV (SE), +FV+PASPP, +FV+PASPP+DS (report Table 3, in 2D)."""
INPUT_CONVENTION = (
    "one channel: the 8-bit greyscale slice / 255 (values in [0, 1]), windowed and cropped around the lungs and "
    "oriented as the COVID-SemiSeg jpgs are stored (rotated relative to radiological display), resized "
    "bilinearly to input_size (H, W); the logits are resized back to the slice's size before the sigmoid"
)
"""What a 2D checkpoint's input is (written into its meta for the inference side)."""


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


# --------------------------------------------------------------------------------------------- stages


def pretrain_config(cfg: SemisegConfig) -> SemisegConfig:
    """The settings of the pseudo-label stage: ``cfg`` with its ``pretrain_*`` epochs, learning rate, size and Dice,
    no mix, one scale, one model, no weight average, the report's loss and no self-training (``scales``, ``soup``,
    ``ema_decay``, ``loss`` and ``relabel`` are the labelled stage's)."""
    return dataclasses.replace(cfg, epochs=cfg.pretrain_epochs, learning_rate=cfg.pretrain_lr,
                               size=pretrain_size(cfg), pretrain_size=None, pseudo_per_batch=0,
                               scales=SemisegConfig.scales, ema_decay=SemisegConfig.ema_decay,
                               soup=SemisegConfig.soup, batch_dice=cfg.pretrain_batch_dice,
                               loss=SemisegConfig.loss, relabel=SemisegConfig.relabel)


def pretrain_size(cfg: SemisegConfig) -> tuple[int, int]:
    """(H, W) of the pseudo-label stage: ``cfg.pretrain_size``, or ``cfg.size`` when that is ``None``."""
    return tuple(cfg.pretrain_size) if cfg.pretrain_size else tuple(cfg.size)  # type: ignore[return-value]


Stack = tuple[torch.Tensor, torch.Tensor]
"""``(N, 1, H, W)`` images and masks (:func:`~covidseg.semiseg.data.resize_stack`)."""


def pseudo_stacks(pseudo: Sequence[Slice], cfg: SemisegConfig) -> tuple[Stack, Stack]:
    """The pseudo-labelled slices at :func:`pretrain_size` (for :func:`pretrain`) and at ``cfg.size`` (mixed into
    the labelled stage); one stack for both when the sizes agree."""
    at_size = resize_stack(list(pseudo), cfg.size)
    if pretrain_size(cfg) == tuple(cfg.size):
        return at_size, at_size
    return resize_stack(list(pseudo), pretrain_size(cfg)), at_size


# --------------------------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_slices(
    model: nn.Module, slices: Sequence[Slice], size: tuple[int, int], device: torch.device,
    amp: str = "auto", batch: int = 8, flip_tta: str | bool = "off",
) -> list[np.ndarray]:
    """Sigmoid probability maps of ``slices``, each at its own GT size.

    The slice is resized to ``size``, the logits are resized back bilinearly to the slice's size and then passed
    through the sigmoid (Inf-Net's test script upsamples its logits the same way). With ``flip_tta``
    (:func:`~covidseg.config.flip_tta_dims`) the logits are the mean of those of the slice and of its mirrors
    (mirrored back): ``lr`` in the autocast dtype as the left-right mirror always was, ``all`` in float32.

    Returns:
        One ``(H_i, W_i)`` float32 array per slice.
    """
    import torch.nn.functional as F

    set_heads(model, False)
    model.eval()
    out: list[np.ndarray] = []
    for start in range(0, len(slices), batch):
        chunk = slices[start:start + batch]
        x = torch.stack([resize_image(s.image, size) for s in chunk]).to(device)  # (b, 1, h, w)
        logits = _tta_logits(model, x, device, amp, flip_tta)  # (b, 1, h, w)
        for i, s in enumerate(chunk):
            full = F.interpolate(logits[i:i + 1], size=s.shape, mode="bilinear", align_corners=False)
            out.append(torch.sigmoid(full)[0, 0].cpu().numpy())
    return out


def _tta_logits(model: nn.Module, x: torch.Tensor, device: torch.device, amp: str,
                flip_tta: str | bool) -> torch.Tensor:
    """float32 logits of the ``(b, 1, h, w)`` batch ``x`` (on ``device``), its mirrors averaged in (:func:`predict_slices`)."""
    flips = flip_tta_dims(flip_tta)
    dtype = autocast_dtype(amp, device, setting="--amp")
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(x)
        if flips == FLIP_TTA["lr"]:  # (as the committed cross-validations of the left-right mirror ran)
            logits = 0.5 * (logits + model(x.flip(-1)).flip(-1))
        elif flips:
            total = logits.float()
            for dims in flips:
                total = total + model(x.flip(dims)).flip(dims).float()
            logits = total / (1 + len(flips))
    return logits.float()


@torch.no_grad()
def relabel_stack(model: nn.Module, images: torch.Tensor, cfg: SemisegConfig, device: torch.device,
                  batch: int = 16) -> torch.Tensor:
    """New labels of pseudo-labelled slices: ``model``'s probability on ``images`` (``(M, 1, H, W)`` at
    ``cfg.size``; ``cfg.flip_tta`` mirrors averaged in) at or above ``cfg.threshold``, as ``(M, 1, H, W)``
    float32 in {0, 1} on the CPU (the layout of :func:`~covidseg.semiseg.data.resize_stack`'s masks)."""
    set_heads(model, False)
    model.eval()
    out = torch.empty(images.shape, dtype=torch.float32)
    for start in range(0, images.shape[0], batch):
        x = images[start:start + batch].to(device)
        prob = torch.sigmoid(_tta_logits(model, x, device, cfg.amp, cfg.flip_tta))
        out[start:start + batch] = (prob >= cfg.threshold).float().cpu()
    return out


def round_state_path(state_path: Path | None, round_: int) -> Path | None:
    """Round 0 of self-training keeps ``state_path``; round ``r`` > 0 saves to ``NAME.r<r>.state.pt`` beside it."""
    if state_path is None or round_ == 0:
        return state_path
    return tagged_state_path(state_path, f"r{round_}")


def train_labelled(
    images: torch.Tensor, masks: torch.Tensor, cfg: SemisegConfig, device: torch.device, *,
    seed: int | None = None, desc: str = "train", pseudo: tuple[torch.Tensor, torch.Tensor] | None = None,
    state_path: Path | None = None, log: Callable[[dict[str, Any]], None] | None = None, **kwargs: Any,
) -> nn.Module:
    """The labelled stage (:func:`~covidseg.training.slices.train_soup`), then ``cfg.relabel`` rounds of
    self-training: the last model relabels the pseudo-labelled slices (:func:`relabel_stack`) and the stage runs
    again from the same ``init`` and seed on them. Round ``r`` keeps its resumable state at
    :func:`round_state_path`; a rerun relabels again from the finished rounds' states (deterministic on one
    machine). Log records of round ``r`` > 0 carry ``"relabel": r``.

    Raises:
        ConfigError: ``cfg.relabel`` < 0, or > 0 without pseudo-labelled slices mixed into the batches.
    """
    if cfg.relabel < 0:
        raise ConfigError(f"relabel {cfg.relabel}: expected 0 (the given pseudo labels) or more rounds")
    if cfg.relabel and (pseudo is None or cfg.pseudo_per_batch < 1):
        raise ConfigError(f"relabel {cfg.relabel}: self-training relabels the pseudo-labelled slices; give them "
                          "(--pseudo) and mix them into the batches (--pseudo-per-batch >= 1)")
    model = train_soup(images, masks, dataclasses.replace(cfg, relabel=0), device, seed=seed, desc=desc,
                       pseudo=pseudo, state_path=state_path, log=log, **kwargs)
    for r in range(1, cfg.relabel + 1):
        assert pseudo is not None
        pseudo = (pseudo[0], relabel_stack(model, pseudo[0], cfg, device))
        round_log = None if log is None else (lambda rec, r=r: log({"relabel": r, **rec}))
        model = train_soup(images, masks, dataclasses.replace(cfg, relabel=r), device, seed=seed,
                           desc=f"{desc} relabel {r}", pseudo=pseudo, state_path=round_state_path(state_path, r),
                           log=round_log, **kwargs)
    return model


def score_slices(probs: Sequence[np.ndarray], slices: Sequence[Slice]) -> list[dict[str, Any]]:
    """One row of metrics per slice (``name`` + :data:`~covidseg.semiseg.metric.METRIC_KEYS`)."""
    return [{"name": s.name, **slice_metrics(p, s.mask)} for p, s in zip(probs, slices, strict=True)]


# --------------------------------------------------------------------------------------------- protocols


def pretrain(
    pseudo: tuple[torch.Tensor, torch.Tensor], cfg: SemisegConfig, device: torch.device, *,
    progress: bool = True, log: Callable[[dict[str, Any]], None] | None = None,
    state_path: Path | None = None, save_every_s: float = 300.0,
) -> dict[str, torch.Tensor]:
    """Train on the pseudo-labelled slices alone (:func:`pretrain_config`); returns the weights (float32, CPU).

    The pseudo-labelled slices are never scored, so one pretrained model can start every fold of a
    cross-validation without any held-out labelled slice having been seen in this stage.

    Args:
        pseudo: ``(M, 1, H, W)`` images and masks at :func:`pretrain_size`.

    Raises:
        ConfigError: ``pseudo`` is not at that size.
    """
    size = pretrain_size(cfg)
    if tuple(pseudo[0].shape[-2:]) != size:
        raise ConfigError(f"pseudo-labelled slices at {tuple(pseudo[0].shape[-2:])} px; the pseudo-label stage "
                          f"trains at {size} (resize them with resize_stack(slices, {size}))")
    model = train_model(pseudo[0], pseudo[1], pretrain_config(cfg), device, seed=cfg.seed + 100,
                        desc=f"{cfg.variant} pretrain", progress=progress, log=log, state_path=state_path,
                        save_every_s=save_every_s)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def cross_validate(
    slices: Sequence[Slice],
    cfg: SemisegConfig,
    device: torch.device,
    *,
    progress: bool = True,
    on_fold: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    init: dict[str, torch.Tensor] | None = None,
    pseudo: tuple[torch.Tensor, torch.Tensor] | None = None,
    work_dir: Path | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    save_every_s: float = 300.0,
) -> dict[str, Any]:
    """``cfg.folds``-fold cross-validation of ``cfg.variant`` over ``slices`` (folds from :func:`make_folds`).

    Each fold trains a model (seed ``cfg.seed + fold``; from ``init`` when given, else fresh) on the other folds
    for ``cfg.epochs`` epochs, with ``pseudo`` slices mixed into its batches when given (they are never held out
    nor scored), and scores the final model on its held-out slices.

    Args:
        slices: the labelled slices.
        cfg: the run's settings.
        device: where to train.
        progress: tqdm bars on stderr.
        on_fold: called with each finished fold (to write partial results).
        should_stop: checked before each fold; ``True`` ends the run early (a time limit).
        init: weights every fold starts from (e.g. :func:`pretrain`'s).
        pseudo: ``(M, 1, H, W)`` pseudo-labelled images and masks at ``cfg.size``.
        work_dir: when given, each finished fold is kept as ``fold<k>.json`` and each running fold's state as
            ``fold<k>.state.pt``; a rerun skips the finished folds and continues the running one.
        log: passed to :func:`train_model` (per-epoch records, with ``"fold"`` added).
        save_every_s: seconds between two saves of a fold's state.

    Returns:
        ``{"variant", "folds": [{"fold", "test", "metrics", "rows", "seconds"}], "mean", "sd", "pooled",
        "complete"}``: per-fold means, their mean and sample sd over folds, the mean over all held-out slices,
        and whether every fold ran.
    """
    import json

    slices = list(slices)
    images, masks = resize_stack(slices, cfg.size)
    folds = make_folds(len(slices), cfg.folds, cfg.seed)
    results = []
    for k, test_idx in enumerate(folds):
        done = work_dir / f"fold{k}.json" if work_dir is not None else None
        if done is not None and done.is_file():
            results.append(json.loads(done.read_text()))
            continue
        if should_stop is not None and should_stop():
            break
        t0 = time.perf_counter()
        held_out = set(test_idx)
        train_idx = [i for i in range(len(slices)) if i not in held_out]
        fold_log = None if log is None else (lambda rec, k=k: log({"fold": k, **rec}))
        model = train_labelled(images[train_idx], masks[train_idx], cfg, device, seed=cfg.seed + k,
                               desc=f"{cfg.variant} fold {k + 1}/{len(folds)}", progress=progress, init=init,
                               pseudo=pseudo, log=fold_log, save_every_s=save_every_s,
                               state_path=None if work_dir is None else work_dir / f"fold{k}.state.pt")
        test = [slices[i] for i in test_idx]
        rows = score_slices(predict_slices(model, test, cfg.size, device, cfg.amp, flip_tta=cfg.flip_tta), test)
        fold = {"fold": k, "test": [s.name for s in test], "metrics": summarize(rows), "rows": rows,
                "seconds": time.perf_counter() - t0}
        if done is not None:
            from covidseg.io.atomic import atomic_write_text

            atomic_write_text(done, json.dumps(fold, indent=2) + "\n")
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
    slices: Sequence[Slice], cfg: SemisegConfig, device: torch.device, *, progress: bool = True,
    init: dict[str, torch.Tensor] | None = None, pseudo: tuple[torch.Tensor, torch.Tensor] | None = None,
    state_path: Path | None = None, log: Callable[[dict[str, Any]], None] | None = None,
    save_every_s: float = 300.0,
) -> nn.Module:
    """Train ``cfg.variant`` on every slice (seed ``cfg.seed``) for the shipped model (arguments of :func:`train_model`)."""
    images, masks = resize_stack(list(slices), cfg.size)
    return train_labelled(images, masks, cfg, device, seed=cfg.seed, desc=f"{cfg.variant} final",
                          progress=progress, init=init, pseudo=pseudo, state_path=state_path, log=log,
                          save_every_s=save_every_s)


def save_semiseg_checkpoint(
    path: Path | str, model: nn.Module, cfg: SemisegConfig, *, half: bool = True, **meta: Any
) -> Path:
    """Save with :func:`covidseg.checkpoint.save_checkpoint`; float weights in fp16 when ``half`` (half the size).

    ``load_checkpoint`` copies fp16 weights into its float32 model. The meta holds ``semiseg`` (the settings)
    and ``input_size`` (H, W) that :mod:`covidseg.semiseg.evaluate` resizes slices to.
    """
    from covidseg.checkpoint import SLICE_TASK, save_checkpoint, unwrap_model
    from covidseg.config import Config

    bare = copy.deepcopy(unwrap_model(model)).cpu()
    bare = bare.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    if half:
        bare = bare.half()
    return save_checkpoint(path, bare, Config(), task=SLICE_TASK, semiseg=cfg.to_dict(),
                           input_size=list(cfg.size), weights_dtype="float16" if half else "float32",
                           input=INPUT_CONVENTION, threshold=cfg.threshold, flip_tta=cfg.flip_tta, **meta)
