"""The run folder: its file names, the record of where a run came from, its metrics, its progress.

A run folder holds everything needed to reproduce and to continue a run::

    RUN/config.yaml    the resolved Config (defaults + --config + --set)
    RUN/run.json       covidseg version, git commit, seed, data folder, split and its case lists, machine, command
    RUN/metrics.csv    one row per epoch: loss, validation Dice, patches/s, data-wait share, time
    RUN/last.pt        weights + optimizer + RNG + step (written atomically at the end of every epoch)
    RUN/best.pt        weights of the epoch with the best validation Dice (the report keeps this one)

``config.yaml`` is written last when a run starts: a folder holding it is a run that ``--resume`` can continue.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from covidseg import __version__
from covidseg.config import Config, config_to_dict, load_config, save_config
from covidseg.errors import ConfigError
from covidseg.io.atomic import atomic_write_text

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.csv"
LAST_FILE = "last.pt"
BEST_FILE = "best.pt"
METRIC_COLUMNS = (
    "epoch", "step", "train_loss", "val_dice", "best_dice", "lr", "epoch_time_s", "train_patches_per_s",
    "data_wait_share",
)
"""Columns of ``metrics.csv``."""


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
    text = f"{cpu_model()}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        text = f"{torch.cuda.get_device_name(torch.device(device))}; {text}"
    return text


def start_run_folder(
    out: Path, config: Config, data: Path, split: str, cases: dict[str, list[str]], world_size: int,
    device: torch.device, command: str | None,
) -> None:
    """Write ``run.json`` and then ``config.yaml`` into the new run folder ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "version": code_version(),
        "seed": config.train.seed,
        "data": str(data.resolve()),
        "split": split,
        "cases": cases,
        "world_size": world_size,
        "device": str(device),
        "machine": machine_description(device),
        "command": command or " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_text(out / RUN_FILE, json.dumps(record, indent=1))
    # config.yaml last: a folder holding it is a run that --resume can continue (a kill between the two writes
    # leaves only run.json, and a new run with the same --out is still allowed)
    save_config(config, out / CONFIG_FILE)


def write_metrics(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``metrics.csv`` of the epoch rows (atomically; numbers with 6 significant digits)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def run_progress(run_dir: Path) -> dict[str, Any] | None:
    """``{"step", "total_steps", "complete", "best_dice"}`` of a run folder's ``last.pt``; ``None`` if absent."""
    from covidseg.checkpoint import read_checkpoint

    last = Path(run_dir) / LAST_FILE
    if not last.is_file():
        return None
    meta = read_checkpoint(last).get("meta") or {}
    step, total = int(meta.get("step", 0)), int(meta.get("total_steps", -1))
    return {"step": step, "total_steps": total, "complete": step >= total > 0, "best_dice": meta.get("best_dice")}


def check_same_config(run_dir: Path, config: Config) -> None:
    """Raise :class:`ConfigError` when ``run_dir/config.yaml`` trains another model than ``config`` would.

    Only what the checkpoint keeps is compared (:data:`~covidseg.config.KEPT_SECTIONS`): a run is the same run
    on another device, with other workers or another cache folder.
    """
    saved = config_to_dict(load_config(run_dir / CONFIG_FILE), runtime=False)
    wanted = config_to_dict(config, runtime=False)
    if saved != wanted:
        diff = sorted(f"{s}.{k}" for s in saved for k in saved[s] if saved[s][k] != wanted.get(s, {}).get(k))
        raise ConfigError(
            f"{run_dir}: holds a run with other settings ({', '.join(diff[:6])}); use another --out or the "
            "settings that run was started with"
        )


__all__ = [
    "BEST_FILE", "CONFIG_FILE", "LAST_FILE", "METRICS_FILE", "METRIC_COLUMNS", "RUN_FILE", "check_same_config",
    "code_version", "cpu_model", "machine_description", "run_progress", "start_run_folder", "write_metrics",
]
