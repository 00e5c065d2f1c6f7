"""The 3D trainer: every 3D variant of the report on patches of CT volumes (the variant is configuration, never a
subclass). Its optimisation step is :func:`covidseg.training.loop.train_step`, the one the 2D slice trainer
(:mod:`covidseg.training.slices`) runs too.

The run folder (:mod:`covidseg.training.runs`) holds the resolved config, the record of the run, the metrics and
the checkpoints ``last.pt`` and ``best.pt``.

Resuming (``covidseg train --resume RUN``) reloads ``last.pt`` and continues from its step. Patches are a pure
function of ``(seed, step, row)`` (:mod:`covidseg.training.sampler`), and model, optimizer, grad-scaler and RNG
states are restored, so a run killed at any moment (even ``kill -9``; checkpoints are atomic) and resumed ends at
the same step, with the same weights on CPU as an uninterrupted run; at most the epoch in progress is redone.

Validation runs whole validation volumes (from the cache) through
:func:`covidseg.inference.sliding_window.predict_volume`, the same Gaussian-blended sliding window ``segment``
uses, with the window set to the training patch, and reports the mean Dice over channels and cases.

:func:`train` reads like the run: :func:`check_trainable` (before any case is read), the cases
(:func:`resolve_split`, :func:`cache_cases`), the model and its optimizer (:func:`build_engine`, a
:class:`~covidseg.training.loop.Engine`), then one loop of
:func:`train_step` with :func:`end_epoch` (validation, ``best.pt``, ``last.pt``, ``metrics.csv``) at every epoch's
last step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from covidseg.config import Config, RuntimeConfig, load_config
from covidseg.errors import ConfigError, InputError, OutputExistsError
from covidseg.runtime import process_rank, resolve_device
from covidseg.targets import TARGET_CHANNELS, make_target
from covidseg.training import distributed as ddp
from covidseg.training.cache import CachedCase, default_cache_root, prepare_cases
from covidseg.training.loop import Engine, engine_state, load_engine_state, make_engine, train_step
from covidseg.training.runs import (
    BEST_FILE,
    CONFIG_FILE,
    LAST_FILE,
    METRICS_FILE,
    RUN_FILE,
    check_same_config,
    code_version,
    cpu_model,
    machine_description,
    run_progress,
    start_run_folder,
    write_metrics,
)
from covidseg.training.sampler import (
    PatchDataset,
    StepBatchSampler,
    make_loader,
    measure_loader,
    model_input,
)

SPLIT_SEED = 0
"""Seed of the case split and of the validation cases carved out of a split without ``val`` (fixed, so that
models trained with other seeds are compared on the same cases)."""
PATCH_FIT_HINT = "or fewer poolings (model.depth, model.slice_poolings)"
"""The other way out of a training patch that does not fit the model's poolings."""


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did."""

    run_dir: Path
    step: int
    total_steps: int
    epochs: int
    best_dice: float
    best_epoch: int
    loader_patches_per_s: float = float("nan")

    @property
    def complete(self) -> bool:
        return self.step >= self.total_steps


# ------------------------------------------------------------------------------------------------ helpers


def steps_per_epoch(config: Config) -> int:
    """Optimizer steps per epoch: ``patches_per_epoch // batch_size`` (at least 1)."""
    return max(1, config.train.patches_per_epoch // config.train.batch_size)


def total_steps(config: Config) -> int:
    """Steps of the whole run."""
    return steps_per_epoch(config) * config.train.epochs


def model_config_for(config: Config) -> Config:
    """``config`` with the model's channels set by the target (1 input; 1, 2 or 3 outputs)."""
    out_channels = len(TARGET_CHANNELS[config.train.target])
    return dataclasses.replace(
        config, model=dataclasses.replace(config.model, in_channels=1, out_channels=out_channels)
    )


def check_trainable(config: Config) -> None:
    """Refuse, before any case is read, what :func:`train` cannot train: an unknown or contradicting variant, a
    2D variant (they train on slices, ``covidseg semiseg train``), counts below 1, a patch that does not fit.

    Raises:
        ConfigError: naming the setting and the fix.
    """
    from covidseg.models.registry import MODELS, resolve_model_config
    from covidseg.models.shapes import check_fits, size_divisor

    model = resolve_model_config(config.model)
    if model.spatial_dims != 3:
        name = model.name
        variant = name if name in MODELS else "unet-fv-paspp-ds-2d"
        three_d = f"model.name={name.removesuffix('-2d')}" if name.endswith("-2d") else "model.spatial_dims=3"
        raise ConfigError(
            f"model.name={name}: a 2D model; 'covidseg train' trains 3D models on CT volumes. Train 2D models on "
            f"CT slices with 'covidseg semiseg train --variant {variant} --data DIR --out RUN', or set {three_d}"
        )
    tcfg = config.train
    if tcfg.batch_size < 1 or tcfg.epochs < 1 or tcfg.patches_per_epoch < 1:
        raise ConfigError("train.batch_size, train.epochs and train.patches_per_epoch must be positive integers")
    # rounded down: a patch that fits the memory planned for the one asked for
    check_fits("train.patch_size", tcfg.patch_size, size_divisor(model), rounding="down", fewer=PATCH_FIT_HINT)


def resolve_split(case_ids: Sequence[str], split: str, val_cases: int) -> dict[str, list[str]]:
    """``train``/``val``/``test`` case lists of ``split``; validation carved from ``train`` when missing."""
    from covidseg.data.splits import make_split

    lists = {k: list(v) for k, v in make_split(list(case_ids), split, seed=SPLIT_SEED).items()}
    lists.setdefault("test", [])
    if not lists.get("val"):
        train_ids = list(lists.get("train", []))
        n_val = min(val_cases, max(len(train_ids) - 1, 0))
        rng = np.random.default_rng(SPLIT_SEED)
        picked = set(rng.choice(len(train_ids), size=n_val, replace=False).tolist()) if n_val else set()
        lists["val"] = [c for i, c in enumerate(train_ids) if i in picked]
        lists["train"] = [c for i, c in enumerate(train_ids) if i not in picked]
    if not lists.get("train"):
        raise InputError(f"split {split!r} of {len(case_ids)} cases leaves no training case; use more cases")
    return lists


def find_dataset(data: Path) -> dict[str, Any]:
    """``case_id -> Case`` of the dataset folder ``data`` (any layout :func:`find_cases` knows)."""
    from covidseg.data.layouts import find_cases

    return {c.case_id: c for c in find_cases(Path(data))}


def cache_cases(
    config: Config, cases: Sequence[Any], info: ddp.DistInfo | None = None, progress: bool = True
) -> list[CachedCase]:
    """Preprocess ``cases`` into the cache (rank 0 first; the other ranks then only read the entries)."""
    info = info or ddp.DistInfo()
    root = default_cache_root(config.runtime.cache_dir)
    args = (root, config.intensity, config.train.target_spacing)
    if info.is_main:
        out = prepare_cases(cases, *args, progress=progress)
    ddp.barrier(info)
    if not info.is_main:
        out = prepare_cases(cases, *args, progress=False)
    return out


def predict_case(model: nn.Module, case: CachedCase, config: Config, device: torch.device,
                 runtime: RuntimeConfig | None = None) -> np.ndarray:
    """Sigmoid probabilities ``(K, D, H, W)`` of a whole cached volume by the sliding window ``segment`` uses.

    The lung-only input is made from the case's ground-truth lung mask (the report's protocol). ``config`` is the
    model's (input, intensity, window = its training patch); ``runtime`` (default ``config.runtime``) says how
    the windows run.
    """
    from covidseg.inference.sliding_window import predict_volume
    from covidseg.models.heads import heads_off

    icfg = dataclasses.replace(config.inference, window=config.train.patch_size)
    image = case.image(mmap=False).astype(np.float32)
    x = model_input(image, case.lung(mmap=False), config.train.input, config.intensity)
    with heads_off(model) as bare, torch.no_grad():
        probs = predict_volume(bare, x, icfg, device=device, runtime=runtime or config.runtime)
    return np.asarray(probs, dtype=np.float32)


def validate(model: nn.Module, cases: Sequence[CachedCase], config: Config, device: torch.device) -> float:
    """Mean Dice over channels and whole validation volumes (threshold ``inference.threshold``)."""
    from covidseg.metrics import binary_metrics

    scores: list[float] = []
    for case in cases:
        probs = predict_case(model, case, config, device)
        target = make_target(case.lung(mmap=False), case.infection(mmap=False), config.train.target) > 0.5
        pred = probs >= config.inference.threshold
        scores.extend(binary_metrics(pred[k], target[k])["dice"] for k in range(target.shape[0]))
    return float(np.mean(scores)) if scores else float("nan")


# ------------------------------------------------------------------------------------------------ state


@dataclasses.dataclass
class RunState:
    """Where the run stands: saved in ``last.pt``, restored on resume."""

    step: int = 0
    best_dice: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def best(self) -> float | None:
        """The best validation Dice so far, ``None`` before the first validation."""
        return None if self.best_dice == -math.inf else self.best_dice


@dataclasses.dataclass
class EpochMeter:
    """Loss, batches and data-wait time of the epoch in progress."""

    loss: float = 0.0
    batches: int = 0
    wait_s: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)


def build_engine(config: Config, device: torch.device) -> Engine:
    """The model (seeded with ``train.seed``), Adam, the grad scaler and the deep-supervision loss on ``device``."""
    from covidseg.models import create_model

    tcfg = config.train
    torch.manual_seed(tcfg.seed)
    model = create_model(config.model)
    return make_engine(model, device, spatial_dims=config.model.spatial_dims, learning_rate=tcfg.learning_rate,
                       amp=config.runtime.amp, bce_weight=tcfg.bce_weight, dice_weight=tcfg.dice_weight)


def distribute(engine: Engine, config: Config, info: ddp.DistInfo) -> None:
    """Wrap the model for DDP when torchrun started several processes (SyncBatchNorm on GPUs); train mode."""
    if info.enabled:
        device = engine.device
        if device.type == "cuda" and config.runtime.sync_batchnorm:
            engine.model = nn.SyncBatchNorm.convert_sync_batchnorm(engine.model)
        engine.net = nn.parallel.DistributedDataParallel(
            engine.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    engine.net.train()


def restore(path: Path, engine: Engine) -> RunState:
    """Model, optimizer, grad scaler and RNG states of ``last.pt``; the step, best Dice and history it saved."""
    from covidseg.checkpoint import read_checkpoint

    payload = read_checkpoint(path, device="cpu")
    meta = payload.get("meta") or {}
    saved = meta.get("train_state") or {}
    engine.model.load_state_dict(payload["state_dict"])
    load_engine_state(engine, saved)
    return RunState(
        step=int(meta["step"]),
        best_dice=float(meta["best_dice"]) if meta.get("best_dice") is not None else -math.inf,
        best_epoch=int(meta.get("best_epoch", 0)),
        history=list(meta.get("history") or []),
    )


def save_last(path: Path, engine: Engine, config: Config, state: RunState, epoch: int, n_steps: int) -> None:
    """``last.pt``: weights, the run state and what :func:`restore` needs (atomically)."""
    from covidseg.checkpoint import save_checkpoint

    tcfg = config.train
    save_checkpoint(
        path, engine.model, config, epoch=epoch, step=state.step, total_steps=n_steps, best_dice=state.best,
        best_epoch=state.best_epoch, target=tcfg.target, input=tcfg.input, seed=tcfg.seed, history=state.history,
        train_state=engine_state(engine),
    )


# ------------------------------------------------------------------------------------------------ steps


def _mean_loss(meter: EpochMeter, device: torch.device, info: ddp.DistInfo) -> float:
    """The epoch's mean training loss, averaged over the DDP ranks."""
    loss = meter.loss / max(meter.batches, 1)
    if info.enabled:
        t = torch.tensor([loss], device=device)
        torch.distributed.all_reduce(t)
        loss = float(t.item()) / info.world_size
    return loss


def _validate_and_keep_best(out: Path, engine: Engine, config: Config, state: RunState, epoch: int,
                            val_cases: Sequence[CachedCase], last_step: bool) -> float:
    """Validate when due; write ``best.pt`` when the Dice improves (or at the end, without validation cases)."""
    from covidseg.checkpoint import save_checkpoint

    tcfg = config.train
    kept = {"target": tcfg.target, "input": tcfg.input, "seed": tcfg.seed}
    val_dice = float("nan")
    if val_cases and (epoch % max(tcfg.val_every, 1) == 0 or last_step):
        val_dice = validate(engine.model, val_cases, config, engine.device)
        if val_dice > state.best_dice:
            state.best_dice, state.best_epoch = val_dice, epoch
            save_checkpoint(out / BEST_FILE, engine.model, config, epoch=epoch, step=state.step,
                            best_dice=state.best_dice, val_dice=val_dice, **kept)
    if not val_cases and last_step:  # no validation cases: keep the last weights as "best"
        save_checkpoint(out / BEST_FILE, engine.model, config, epoch=epoch, step=state.step, best_dice=None, **kept)
    return val_dice


def end_epoch(out: Path, engine: Engine, config: Config, state: RunState, meter: EpochMeter,
              val_cases: Sequence[CachedCase], info: ddp.DistInfo) -> float:
    """At an epoch's last step: validate, keep the best, append the metrics row, write ``last.pt`` and
    ``metrics.csv`` (rank 0). Returns the validation Dice (NaN when not validated, and on other ranks)."""
    per_epoch, n_steps = steps_per_epoch(config), total_steps(config)
    epoch = math.ceil(state.step / per_epoch)
    loss = _mean_loss(meter, engine.device, info)
    elapsed = time.perf_counter() - meter.start
    if not info.is_main:
        return float("nan")
    val_dice = _validate_and_keep_best(out, engine, config, state, epoch, val_cases, state.step == n_steps)
    state.history.append({
        "epoch": epoch, "step": state.step, "train_loss": loss, "val_dice": val_dice,
        "best_dice": state.best_dice if state.best_dice > -math.inf else float("nan"),
        "lr": engine.optimizer.param_groups[0]["lr"], "epoch_time_s": elapsed,
        "train_patches_per_s": meter.batches * config.train.batch_size / elapsed if elapsed > 0 else 0.0,
        "data_wait_share": meter.wait_s / elapsed if elapsed > 0 else 0.0,
    })
    save_last(out / LAST_FILE, engine, config, state, epoch, n_steps)
    write_metrics(out / METRICS_FILE, state.history)
    return val_dice


# ------------------------------------------------------------------------------------------------ train


def _run_inputs(out: Path, config: Config | None, data: Path | str | None, split: str | None,
                resume: bool) -> tuple[Config, Path, str]:
    """Config, data folder and split of a new run, or those a resumed run recorded."""
    run_file = out / RUN_FILE
    if resume:
        if not (out / CONFIG_FILE).is_file() or not run_file.is_file():
            raise InputError(f"{out}: not a run folder (no {CONFIG_FILE} / {RUN_FILE}); give the folder of a "
                             "'covidseg train' run to --resume, or start a new run with --out")
        config = load_config(out / CONFIG_FILE)
        record = json.loads(run_file.read_text(encoding="utf-8"))
        data = data or record["data"]
        split = split or record["split"]
    else:
        if (out / CONFIG_FILE).exists() or (out / LAST_FILE).exists():
            raise OutputExistsError(f"{out}: already holds a run; continue it with --resume {out} or give a new --out")
        if config is None:
            config = Config()
    if data is None:
        raise InputError("no dataset folder given; use --data DIR")
    return config, Path(data), split or "report"


def train(
    out: Path | str,
    config: Config | None = None,
    data: Path | str | None = None,
    split: str | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> TrainResult:
    """Train one model into the run folder ``out`` (or continue it with ``resume=True``).

    Args:
        out: run folder. New runs need it empty or absent; resumed runs take config, data and split from it.
        config: the resolved config (new runs; ignored when resuming: a resumed run keeps its own).
        data: dataset folder (Zenodo, Kaggle or nnU-Net layout); optional when resuming.
        split: ``report``, ``benchmark-fold-K``, ``few-shot`` ...; default ``report``.
        resume: continue the run in ``out`` from its ``last.pt`` (from step 0 if it never finished an epoch).
        progress: show the progress bar (rank 0 only).
        command: the command line to record in ``run.json``.

    Returns:
        A :class:`TrainResult` (on every rank).

    Raises:
        OutputExistsError: ``out`` already holds a run and ``resume`` is false.
        InputError / ConfigError: bad dataset, split or settings (a 2D variant: they train with
            ``covidseg semiseg train``).
    """
    out = Path(out)
    config, data_dir, split_name = _run_inputs(out, config, data, split, resume)
    config = model_config_for(config)
    check_trainable(config)  # a bad model.name, a 2D variant or a patch that does not fit fails now, not after caching
    info = process_rank()
    device = resolve_device(config.runtime.device, info.local_rank, setting="runtime.device", bind=True)
    ddp.init_distributed(device, info)
    try:
        return _train(out, config, data_dir, split_name, resume, progress and info.is_main, command, info, device)
    finally:
        ddp.cleanup(info)


def _train(
    out: Path, config: Config, data: Path, split: str, resume: bool, progress: bool, command: str | None,
    info: ddp.DistInfo, device: torch.device,
) -> TrainResult:
    from covidseg.progress import progress_bar

    tcfg, rt = config.train, config.runtime
    if rt.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dataset_cases = find_dataset(data)
    lists = resolve_split(sorted(dataset_cases), split, tcfg.val_cases)
    by_id = {c.case_id: c for c in cache_cases(config, [dataset_cases[c] for c in lists["train"] + lists["val"]],
                                                info, progress)}
    train_cases, val_cases = [by_id[c] for c in lists["train"]], [by_id[c] for c in lists["val"]]

    engine = build_engine(config, device)
    n_steps, per_epoch = total_steps(config), steps_per_epoch(config)
    if resume and (out / LAST_FILE).is_file():
        state = restore(out / LAST_FILE, engine)
    else:
        state = RunState()
        if info.is_main:
            start_run_folder(out, config, data, split, lists, info.world_size, device, command)
    distribute(engine, config, info)

    dataset = PatchDataset(train_cases, tcfg.patch_size, tcfg.batch_size, tcfg.foreground_fraction, tcfg.target,
                           tcfg.input, config.intensity, tcfg.seed)
    loader_rate = float("nan")
    if info.is_main and state.step < n_steps and rt.loader_benchmark_batches > 0:
        loader_rate = measure_loader(dataset, rt.loader_benchmark_batches, rt.num_workers)
        if progress:
            print(f"loader: {loader_rate:.1f} patches/s with {rt.num_workers} worker(s) (patch "
                  f"{'x'.join(map(str, tcfg.patch_size))}, {len(train_cases)} training cases)", file=sys.stderr,
                  flush=True)

    bar = progress_bar(total=n_steps, initial=state.step, unit="step", disable=not progress,
                       desc=f"{config.model.name} epoch {min(state.step // per_epoch + 1, tcfg.epochs)}/{tcfg.epochs}")
    postfix: dict[str, str] = {}
    if state.history:
        postfix["val_dice"] = f"{state.history[-1].get('val_dice', float('nan')):.4f}"
    sampler = StepBatchSampler(state.step, n_steps, tcfg.batch_size, info.rank, info.world_size)
    loader = make_loader(dataset, sampler, rt.num_workers, pin_memory=device.type == "cuda")
    meter, t_wait = EpochMeter(), time.perf_counter()
    for x, y in loader:
        meter.wait_s += time.perf_counter() - t_wait
        meter.loss += train_step(engine, x, y)
        meter.batches += 1
        state.step += 1
        postfix["loss"] = f"{meter.loss / meter.batches:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if state.step % per_epoch == 0 or state.step == n_steps:
            val_dice = end_epoch(out, engine, config, state, meter, val_cases, info)
            if not math.isnan(val_dice):
                postfix["val_dice"] = f"{val_dice:.4f}"
            epoch = math.ceil(state.step / per_epoch)
            bar.set_description(f"{config.model.name} epoch {min(epoch + 1, tcfg.epochs)}/{tcfg.epochs}")
            ddp.barrier(info)
            meter = EpochMeter()
        t_wait = time.perf_counter()
    bar.close()
    return TrainResult(
        run_dir=out, step=state.step, total_steps=n_steps, epochs=tcfg.epochs,
        best_dice=state.best_dice if state.best_dice > -math.inf else float("nan"), best_epoch=state.best_epoch,
        loader_patches_per_s=loader_rate,
    )


def ensure_trained(run_dir: Path, config: Config, data: Path, split: str = "report", progress: bool = True,
                   command: str | None = None) -> bool:
    """Train ``run_dir`` unless it holds a complete run of ``config``; resume it when it was interrupted.

    Returns:
        True when steps were trained now, False when the complete run was reused.

    Raises:
        ConfigError: ``run_dir`` holds a run of other settings (runtime settings aside).
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        train(run_dir, config=config, data=data, split=split, progress=progress, command=command)
        return True
    check_same_config(run_dir, model_config_for(config))
    state = run_progress(run_dir)
    if state is not None and state["complete"]:
        return False
    train(run_dir, data=data, split=split, resume=True, progress=progress, command=command)
    return True


__all__ = [
    "BEST_FILE", "CONFIG_FILE", "LAST_FILE", "METRICS_FILE", "RUN_FILE", "Engine", "RunState", "TrainResult",
    "cache_cases", "check_trainable", "code_version", "cpu_model", "ensure_trained", "find_dataset",
    "machine_description", "model_config_for", "predict_case", "resolve_split", "run_progress", "steps_per_epoch",
    "total_steps", "train", "validate",
]
