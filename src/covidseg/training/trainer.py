"""One training loop for every variant of the report (the variant is configuration, never a subclass).

A run folder holds everything needed to reproduce and to continue the run::

    RUN/config.yaml    the resolved Config (defaults + --config + --set)
    RUN/run.json       covidseg version, git commit, seed, data folder, split and its case lists, machine, command
    RUN/metrics.csv    one row per epoch: loss, validation Dice, patches/s, data-wait share, time
    RUN/last.pt        weights + optimizer + RNG + step (written atomically at the end of every epoch)
    RUN/best.pt        weights of the epoch with the best validation Dice (the report keeps this one)

Resuming (``covidseg train --resume RUN``) reloads ``last.pt`` and continues from its step. Patches are a pure
function of ``(seed, step, row)`` (:mod:`covidseg.training.sampler`), and model, optimizer, grad-scaler and RNG
states are restored, so a run killed at any moment (even ``kill -9``; checkpoints are atomic) and resumed ends at
the same step, with the same weights on CPU as an uninterrupted run; at most the epoch in progress is redone.

Validation runs whole validation volumes (from the cache) through
:func:`covidseg.inference.sliding_window.predict_volume`, the same Gaussian-blended sliding window ``segment``
uses, with the window set to the training patch, and reports the mean Dice over channels and cases.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from covidseg import __version__
from covidseg.config import Config, load_config, save_config
from covidseg.errors import ConfigError, InputError, OutputExistsError
from covidseg.io.atomic import atomic_write_text
from covidseg.runtime import autocast_dtype, process_rank, resolve_device
from covidseg.targets import TARGET_CHANNELS, make_target
from covidseg.training import distributed as ddp
from covidseg.training.cache import CachedCase, default_cache_root, prepare_cases
from covidseg.training.sampler import (
    PatchDataset,
    StepBatchSampler,
    make_loader,
    measure_loader,
    model_input,
)

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.csv"
LAST_FILE = "last.pt"
BEST_FILE = "best.pt"
SPLIT_SEED = 0
"""Seed of the case split and of the validation cases carved out of a split without ``val`` (fixed, so that
models trained with other seeds are compared on the same cases)."""
METRIC_COLUMNS = (
    "epoch", "step", "train_loss", "val_dice", "best_dice", "lr", "epoch_time_s", "train_patches_per_s",
    "data_wait_share",
)
"""Columns of ``metrics.csv``."""


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


def code_version() -> dict[str, str | None]:
    """covidseg version and the git commit of the source tree (``None`` outside a git checkout)."""
    commit = None
    with contextlib.suppress(Exception):
        here = Path(__file__).resolve().parent
        res = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=5, check=False,
        )
        if res.returncode == 0:
            commit = res.stdout.strip() or None
    return {"covidseg": __version__, "git": commit, "torch": torch.__version__}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s, as ``lscpu`` shows it), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def machine_description(device: torch.device | str = "cpu") -> str:
    """One line naming the CPU/GPU, core count and OS."""
    import os

    text = f"{cpu_model()}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        text = f"{torch.cuda.get_device_name(torch.device(device))}; {text}"
    return text


def model_config_for(config: Config) -> Config:
    """``config`` with the model's channels set by the target (1 input; 1, 2 or 3 outputs)."""
    out_channels = len(TARGET_CHANNELS[config.train.target])
    return dataclasses.replace(
        config, model=dataclasses.replace(config.model, in_channels=1, out_channels=out_channels)
    )


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
    root = default_cache_root(config.train.cache_dir)
    args = (root, config.intensity, config.train.target_spacing)
    if info.is_main:
        out = prepare_cases(cases, *args, progress=progress)
    ddp.barrier(info)
    if not info.is_main:
        out = prepare_cases(cases, *args, progress=False)
    return out


def _set_heads(model: nn.Module, enabled: bool) -> None:
    heads = getattr(model, "ds_heads", None)
    if isinstance(heads, nn.ModuleList) and len(heads):
        model.set_deep_supervision(enabled)  # type: ignore[operator]


def predict_case(model: nn.Module, case: CachedCase, config: Config, device: torch.device) -> np.ndarray:
    """Sigmoid probabilities ``(K, D, H, W)`` of a whole cached volume by the sliding window ``segment`` uses.

    The lung-only input is made from the case's ground-truth lung mask (the report's protocol).
    """
    from covidseg.checkpoint import unwrap_model
    from covidseg.inference.sliding_window import predict_volume

    bare = unwrap_model(model)
    was_training = bare.training
    had_heads = bool(getattr(bare, "deep_supervision", False))
    _set_heads(bare, False)
    bare.eval()
    icfg = dataclasses.replace(config.inference, window=config.train.patch_size, device=str(device))
    try:
        image = case.image(mmap=False).astype(np.float32)
        x = model_input(image, case.lung(mmap=False), config.train.input, config.intensity)
        with torch.no_grad():
            probs = predict_volume(bare, x, icfg, device=device)
    finally:
        if had_heads:
            _set_heads(bare, True)
        bare.train(was_training)
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


def _write_metrics(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _optimizer_state(raw: dict[str, Any]) -> dict[str, Any]:
    """Undo the checkpoint's string keys of ``optimizer.state_dict()['state']``."""
    return {"state": {int(k): v for k, v in raw["state"].items()}, "param_groups": raw["param_groups"]}


def run_progress(run_dir: Path) -> dict[str, Any] | None:
    """``{"step", "total_steps", "complete", "best_dice"}`` of a run folder's ``last.pt``; ``None`` if absent."""
    from covidseg.checkpoint import read_checkpoint

    last = Path(run_dir) / LAST_FILE
    if not last.is_file():
        return None
    meta = read_checkpoint(last).get("meta") or {}
    step, total = int(meta.get("step", 0)), int(meta.get("total_steps", -1))
    return {"step": step, "total_steps": total, "complete": step >= total > 0, "best_dice": meta.get("best_dice")}


# ------------------------------------------------------------------------------------------------ train


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
        InputError / ConfigError: bad dataset, split or settings.
    """
    out = Path(out)
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
    split = split or "report"
    config = model_config_for(config)
    from covidseg.models.registry import resolve_model_config

    resolve_model_config(config.model)  # a bad model.name or a contradicting switch fails now, not after caching
    tcfg = config.train
    if tcfg.batch_size < 1 or tcfg.epochs < 1 or tcfg.patches_per_epoch < 1:
        raise ConfigError("train.batch_size, train.epochs and train.patches_per_epoch must be positive integers")

    info = process_rank()
    device = resolve_device(tcfg.device, info.local_rank, setting="train.device", bind=True)
    ddp.init_distributed(device, info)
    try:
        return _train(out, config, Path(data), split, resume, progress and info.is_main, command, info, device)
    finally:
        ddp.cleanup(info)


def _train(
    out: Path, config: Config, data: Path, split: str, resume: bool, progress: bool, command: str | None,
    info: ddp.DistInfo, device: torch.device,
) -> TrainResult:
    from tqdm import tqdm

    from covidseg.checkpoint import read_checkpoint, save_checkpoint
    from covidseg.losses import DeepSupervisionLoss, SegmentationLoss
    from covidseg.models import create_model

    tcfg = config.train
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dataset_cases = find_dataset(data)
    lists = resolve_split(sorted(dataset_cases), split, tcfg.val_cases)
    needed = lists["train"] + lists["val"]
    cached = cache_cases(config, [dataset_cases[c] for c in needed], info, progress)
    by_id = {c.case_id: c for c in cached}
    train_cases = [by_id[c] for c in lists["train"]]
    val_cases = [by_id[c] for c in lists["val"]]

    torch.manual_seed(tcfg.seed)
    model = create_model(config.model)
    div = model.size_divisor
    if any(p % d for p, d in zip(tcfg.patch_size, div, strict=True)):
        fit = "x".join(str(max(d, p // d * d)) for p, d in zip(tcfg.patch_size, div, strict=True))
        raise ConfigError(
            f"train.patch_size {'x'.join(map(str, tcfg.patch_size))} (D x H x W) does not fit the poolings of "
            f"model '{config.model.name}' (multiples of {'x'.join(map(str, div))}); use e.g. {fit} or lower "
            "model.depth / model.slice_poolings"
        )
    model.to(device)
    channels_last = device.type == "cuda" and config.model.spatial_dims == 3
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.learning_rate)
    amp_dtype = autocast_dtype(tcfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16 and device.type == "cuda")
    criterion = DeepSupervisionLoss(SegmentationLoss(tcfg.bce_weight, tcfg.dice_weight))

    n_steps, per_epoch = total_steps(config), steps_per_epoch(config)
    step, best_dice, best_epoch = 0, -math.inf, 0
    history: list[dict[str, Any]] = []
    last_path, best_path = out / LAST_FILE, out / BEST_FILE
    if resume and last_path.is_file():
        payload = read_checkpoint(last_path, device="cpu")
        meta = payload.get("meta") or {}
        state = meta.get("train_state") or {}
        model.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(_optimizer_state(state["optimizer"]))
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        step = int(meta["step"])
        best_dice = float(meta["best_dice"]) if meta.get("best_dice") is not None else -math.inf
        best_epoch = int(meta.get("best_epoch", 0))
        history = list(meta.get("history") or [])
    elif info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "version": code_version(),
            "seed": tcfg.seed,
            "data": str(data.resolve()),
            "split": split,
            "cases": lists,
            "world_size": info.world_size,
            "device": str(device),
            "machine": machine_description(device),
            "command": command or " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic_write_text(out / RUN_FILE, json.dumps(record, indent=1))
        # config.yaml last: a folder holding it is a run that --resume can continue (a kill between the two
        # writes leaves only run.json, and a new run with the same --out is still allowed)
        save_config(config, out / CONFIG_FILE)

    train_model: nn.Module = model
    if info.enabled:
        if device.type == "cuda" and tcfg.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    train_model.train()

    dataset = PatchDataset(
        train_cases, tcfg.patch_size, tcfg.batch_size, tcfg.foreground_fraction, tcfg.target, tcfg.input,
        config.intensity, tcfg.seed,
    )
    sampler = StepBatchSampler(step, n_steps, tcfg.batch_size, info.rank, info.world_size)
    loader_rate = float("nan")
    if info.is_main and step < n_steps and tcfg.loader_benchmark_batches > 0:
        loader_rate = measure_loader(dataset, tcfg.loader_benchmark_batches, tcfg.num_workers)
        if progress:
            tqdm.write(
                f"loader: {loader_rate:.1f} patches/s with {tcfg.num_workers} worker(s) "
                f"(patch {'x'.join(map(str, tcfg.patch_size))}, {len(train_cases)} training cases)",
                file=sys.stderr,
            )

    def save_last(epoch: int) -> None:
        meta = {
            "epoch": epoch, "step": step, "total_steps": n_steps, "best_dice": None if best_dice == -math.inf
            else best_dice, "best_epoch": best_epoch, "target": tcfg.target, "input": tcfg.input, "seed": tcfg.seed,
            "history": history,
            "train_state": {
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "torch_rng": torch.get_rng_state(),
            },
        }
        save_checkpoint(last_path, model, config, **meta)

    bar = tqdm(total=n_steps, initial=step, unit="step", disable=not progress, dynamic_ncols=True,
               desc=f"{config.model.name} epoch {min(step // per_epoch + 1, tcfg.epochs)}/{tcfg.epochs}")
    postfix: dict[str, str] = {}
    if history:
        postfix["val_dice"] = f"{history[-1].get('val_dice', float('nan')):.4f}"
    loader = make_loader(dataset, sampler, tcfg.num_workers, pin_memory=device.type == "cuda")
    epoch_loss, epoch_batches, wait, t_epoch = 0.0, 0, 0.0, time.perf_counter()
    t_wait = time.perf_counter()
    for x, y in loader:
        wait += time.perf_counter() - t_wait
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = train_model(x)
        loss = criterion(outputs, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        epoch_loss += float(loss.detach())
        epoch_batches += 1
        postfix["loss"] = f"{epoch_loss / epoch_batches:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if step % per_epoch == 0 or step == n_steps:
            epoch = math.ceil(step / per_epoch)
            loss_mean = epoch_loss / max(epoch_batches, 1)
            if info.enabled:
                t = torch.tensor([loss_mean], device=device)
                torch.distributed.all_reduce(t)
                loss_mean = float(t.item()) / info.world_size
            elapsed = time.perf_counter() - t_epoch
            if info.is_main:
                val_dice = float("nan")
                if val_cases and (epoch % max(tcfg.val_every, 1) == 0 or step == n_steps):
                    val_dice = validate(model, val_cases, config, device)
                    if val_dice > best_dice:
                        best_dice, best_epoch = val_dice, epoch
                        save_checkpoint(best_path, model, config, epoch=epoch, step=step, best_dice=best_dice,
                                        val_dice=val_dice, target=tcfg.target, input=tcfg.input, seed=tcfg.seed)
                if not val_cases and step == n_steps:  # no validation cases: keep the last weights as "best"
                    save_checkpoint(best_path, model, config, epoch=epoch, step=step, best_dice=None,
                                    target=tcfg.target, input=tcfg.input, seed=tcfg.seed)
                history.append({
                    "epoch": epoch, "step": step, "train_loss": loss_mean, "val_dice": val_dice,
                    "best_dice": best_dice if best_dice > -math.inf else float("nan"),
                    "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": elapsed,
                    "train_patches_per_s": epoch_batches * tcfg.batch_size / elapsed if elapsed > 0 else 0.0,
                    "data_wait_share": wait / elapsed if elapsed > 0 else 0.0,
                })
                save_last(epoch)
                _write_metrics(out / METRICS_FILE, history)
                if not math.isnan(val_dice):
                    postfix["val_dice"] = f"{val_dice:.4f}"
                bar.set_description(f"{config.model.name} epoch {min(epoch + 1, tcfg.epochs)}/{tcfg.epochs}")
            ddp.barrier(info)
            epoch_loss, epoch_batches, wait, t_epoch = 0.0, 0, 0.0, time.perf_counter()
        t_wait = time.perf_counter()
    bar.close()
    return TrainResult(
        run_dir=out, step=step, total_steps=n_steps, epochs=tcfg.epochs,
        best_dice=best_dice if best_dice > -math.inf else float("nan"), best_epoch=best_epoch,
        loader_patches_per_s=loader_rate,
    )


__all__ = [
    "TrainResult", "cache_cases", "code_version", "find_dataset", "machine_description", "predict_case",
    "resolve_split", "run_progress", "steps_per_epoch", "total_steps", "train", "validate",
]
