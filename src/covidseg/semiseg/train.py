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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from covidseg.errors import ConfigError, UserError
from covidseg.models.heads import set_heads
from covidseg.progress import progress_bar
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
INPUT_CONVENTION = (
    "one channel: the 8-bit greyscale slice / 255 (values in [0, 1]), windowed and cropped around the lungs and "
    "oriented as the COVID-SemiSeg jpgs are stored (rotated relative to radiological display), resized "
    "bilinearly to input_size (H, W); the logits are resized back to the slice's size before the sigmoid"
)
"""What a 2D checkpoint's input is (written into its meta for the inference side)."""
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
    pretrain_epochs: int = 0
    """Epochs on the pseudo-labelled slices alone before training on the labelled ones (0 = no such stage)."""
    pretrain_lr: float = 1e-3
    """Peak learning rate of the pseudo-label stage (same polynomial decay)."""
    pseudo_per_batch: int = 0
    """Pseudo-labelled slices mixed into every batch of the labelled stage (the rest of ``batch_size`` is
    labelled slices); 0 = labelled slices only."""
    flip_tta: bool = False
    """Prediction averages the logits of the slice and of its left-right mirror (the shipped model's setting)."""
    threshold: float = 0.5
    """Probability at or above which a pixel is infection (the binary masks; Inf-Net's mean Dice sweeps it)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) for JSON and checkpoints."""
        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return list(v)
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        return plain(dataclasses.asdict(self))


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


def pretrain_config(cfg: SemisegConfig) -> SemisegConfig:
    """The settings of the pseudo-label stage: ``cfg`` with its ``pretrain_*`` epochs and learning rate, no mix."""
    return dataclasses.replace(cfg, epochs=cfg.pretrain_epochs, learning_rate=cfg.pretrain_lr,
                               pseudo_per_batch=0)


@dataclass
class _Run:
    """Everything a training run needs to continue exactly where it stopped (saved by :func:`_save_run`)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    augment: SliceAugment
    order_gen: torch.Generator
    pseudo_gen: torch.Generator
    step: int = 0
    perm: torch.Tensor | None = None
    """The current epoch's order of the labelled slices."""
    running: float = 0.0
    """Sum of the losses of the current epoch so far."""


def _save_run(path: Path, run: _Run, cfg: SemisegConfig) -> None:
    """Write the run's state atomically (a killed write leaves the previous state intact)."""
    state = {
        "config": cfg.to_dict(), "step": run.step, "perm": run.perm, "running": run.running,
        "model": run.model.state_dict(), "opt": run.opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "order": run.order_gen.get_state(),
                "pseudo": run.pseudo_gen.get_state(), "augment": run.augment.generator.get_state()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_run(path: Path, run: _Run, cfg: SemisegConfig) -> None:
    """Restore a state written by :func:`_save_run` for the same settings."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable training state ({exc}); delete it to start this stage again") \
            from None
    if state.get("config") != cfg.to_dict():
        raise ConfigError(f"{path}: saved by a run with other settings; rerun with the same settings or delete "
                          "the file to start this stage again")
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["opt"])
    run.step, run.perm, run.running = int(state["step"]), state["perm"], float(state["running"])
    torch.set_rng_state(state["rng"]["torch"])
    run.order_gen.set_state(state["rng"]["order"])
    run.pseudo_gen.set_state(state["rng"]["pseudo"])
    run.augment.generator.set_state(state["rng"]["augment"])


def _batch(
    run: _Run, images: torch.Tensor, masks: torch.Tensor, pseudo: tuple[torch.Tensor, torch.Tensor] | None,
    n_labelled: int, n_pseudo: int, steps_per_epoch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next augmented batch: ``n_labelled`` slices in epoch order, plus ``n_pseudo`` drawn at random."""
    n = int(images.shape[0])
    b = run.step % steps_per_epoch
    if b == 0 or run.perm is None:
        run.perm = torch.randperm(n, generator=run.order_gen)
    idx = run.perm[b * n_labelled:(b + 1) * n_labelled]
    x, y = images[idx.to(images.device)], masks[idx.to(masks.device)]
    if pseudo is not None and n_pseudo > 0:
        pidx = torch.randint(int(pseudo[0].shape[0]), (n_pseudo,), generator=run.pseudo_gen)
        x = torch.cat([x, pseudo[0][pidx.to(x.device)]])
        y = torch.cat([y, pseudo[1][pidx.to(y.device)]])
    return run.augment(x, y)  # (B, 1, H, W) each


def _start_run(cfg: SemisegConfig, device: torch.device, seed: int, init: dict[str, torch.Tensor] | None) -> _Run:
    """A fresh run: the model seeded by ``seed`` (or ``init``'s weights) on ``device``, Adam, seeded generators."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    if init is not None:
        model.load_state_dict(init)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return _Run(model=model,
                opt=torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay),
                augment=SliceAugment(cfg.augment, seed=seed + 1), order_gen=torch.Generator().manual_seed(seed + 2),
                pseudo_gen=torch.Generator().manual_seed(seed + 3))


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
        progress: show a tqdm bar on stderr.
        log: called with ``{"epoch", "step", "loss", "lr", "seconds"}`` after every epoch.
        init: a state dict to start from (a pretrained model) instead of fresh weights.
        pseudo: ``(M, 1, H, W)`` images and masks of pseudo-labelled slices; each batch then holds
            ``cfg.pseudo_per_batch`` of them (drawn at random) and ``cfg.batch_size - cfg.pseudo_per_batch``
            labelled slices (one epoch = every labelled slice once).
        state_path: where the run's state is saved every ``save_every_s`` seconds and at the end; when the file
            exists the run continues from it and ends with the same weights as an uninterrupted run.
        save_every_s: seconds between two saves of the state (0 = after every step).

    Returns:
        The trained model in eval mode with deep supervision switched off.
    """
    from covidseg.losses import DeepSupervisionLoss, SegmentationLoss

    seed = cfg.seed if seed is None else seed
    run = _start_run(cfg, device, seed, init)
    model = run.model
    n = int(images.shape[0])
    n_pseudo = min(cfg.pseudo_per_batch, cfg.batch_size - 1) if pseudo is not None else 0
    n_labelled = min(cfg.batch_size - n_pseudo, n)
    steps_per_epoch = max(1, n // n_labelled)
    total = max(1, cfg.epochs * steps_per_epoch)
    images, masks = images.to(device), masks.to(device)
    if pseudo is not None:
        pseudo = (pseudo[0].to(device), pseudo[1].to(device))
    loss_fn = DeepSupervisionLoss(SegmentationLoss(cfg.bce_weight, cfg.dice_weight))
    if state_path is not None and Path(state_path).is_file():
        _load_run(Path(state_path), run, cfg)
    dtype = autocast_dtype(cfg.amp, device, setting="--amp")
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16 and device.type == "cuda")
    bar = progress_bar(total=total, initial=run.step, desc=desc, unit="step", disable=not progress, leave=False)
    model.train()
    start = last_save = time.perf_counter()
    while run.step < total:
        x, y = _batch(run, images, masks, pseudo, n_labelled, n_pseudo, steps_per_epoch)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        lr = cfg.learning_rate * ((1.0 - run.step / total) ** POLY_EXPONENT if cfg.poly_lr else 1.0)
        for group in run.opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        loss = loss_fn(out, y)
        run.opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(run.opt)
        scaler.update()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise UserError(f"{desc}: the loss became {value} at step {run.step}; lower the learning rate")
        run.running += value
        run.step += 1
        bar.update(1)
        epoch_done = run.step % steps_per_epoch == 0
        if epoch_done:
            bar.set_postfix(loss=f"{run.running / steps_per_epoch:.3f}")
            if log is not None:
                log({"epoch": run.step // steps_per_epoch, "step": run.step, "loss": run.running / steps_per_epoch,
                     "lr": lr, "seconds": time.perf_counter() - start})
            run.running = 0.0
        if state_path is not None and (run.step == total or time.perf_counter() - last_save >= save_every_s):
            _save_run(Path(state_path), run, cfg)
            last_save = time.perf_counter()
    bar.close()
    set_heads(model, False)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_slices(
    model: nn.Module, slices: Sequence[Slice], size: tuple[int, int], device: torch.device,
    amp: str = "auto", batch: int = 8, flip_tta: bool = False,
) -> list[np.ndarray]:
    """Sigmoid probability maps of ``slices``, each at its own GT size.

    The slice is resized to ``size``, the logits are resized back bilinearly to the slice's size and then passed
    through the sigmoid (Inf-Net's test script upsamples its logits the same way). With ``flip_tta`` the logits
    are the mean of those of the slice and of its left-right mirror (mirrored back).

    Returns:
        One ``(H_i, W_i)`` float32 array per slice.
    """
    import torch.nn.functional as F

    set_heads(model, False)
    model.eval()
    dtype = autocast_dtype(amp, device, setting="--amp")
    out: list[np.ndarray] = []
    for start in range(0, len(slices), batch):
        chunk = slices[start:start + batch]
        x = torch.stack([resize_image(s.image, size) for s in chunk]).to(device)  # (b, 1, h, w)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
            if flip_tta:
                logits = 0.5 * (logits + model(x.flip(-1)).flip(-1))
        logits = logits.float()  # (b, 1, h, w)
        for i, s in enumerate(chunk):
            full = F.interpolate(logits[i:i + 1], size=s.shape, mode="bilinear", align_corners=False)
            out.append(torch.sigmoid(full)[0, 0].cpu().numpy())
    return out


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
    """
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
        model = train_model(images[train_idx], masks[train_idx], cfg, device, seed=cfg.seed + k,
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
    return train_model(images, masks, cfg, device, seed=cfg.seed, desc=f"{cfg.variant} final", progress=progress,
                       init=init, pseudo=pseudo, state_path=state_path, log=log, save_every_s=save_every_s)


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
