"""Evaluate a 2D checkpoint on any folder of the COVID-SemiSeg layout, with Inf-Net's metric (docs/method.md).

``--checkpoint default`` is the model shipped in the package (:func:`covidseg.checkpoint.default_checkpoint`).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from covidseg.checkpoint import default_checkpoint, resolve_checkpoint
from covidseg.config import SLICE_SIZE, flip_tta_name
from covidseg.errors import InputError
from covidseg.models.heads import set_heads
from covidseg.runtime import resolve_device
from covidseg.semiseg.data import load_folder
from covidseg.semiseg.metric import METRIC_KEYS, summarize
from covidseg.semiseg.train import predict_slices, score_slices

TABLE_KEYS = ("mean_dice_infnet", "dice_at_0_5", "iou", "sensitivity", "specificity", "precision")
"""Columns of the printed table."""


def load_semiseg_model(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a 2D checkpoint (``"default"`` = the shipped one); returns the float32 model and its meta."""
    from covidseg.checkpoint import load_checkpoint

    path = resolve_checkpoint(checkpoint)
    model, config, meta = load_checkpoint(path, device=device)
    if config.model.spatial_dims != 2:
        raise InputError(
            f"{path}: a {config.model.spatial_dims}D model ({config.model.name}); 'semiseg evaluate' needs a 2D "
            "model trained on slices (covidseg semiseg train)"
        )
    model = set_heads(model.float().to(device), False).eval()
    meta = dict(meta)
    meta["checkpoint"] = str(path)
    meta["variant"] = config.model.name
    return model, meta


def evaluate_folder(
    checkpoint: str | Path, data: str | Path, device: str = "auto", amp: str = "off"
) -> dict[str, Any]:
    """Predict every slice of ``data`` and score it.

    Args:
        checkpoint: a ``.pt`` file or ``"default"``.
        data: a folder with ``Imgs/`` and ``GT/``.
        device: ``auto``, ``cpu``, ``cuda``...
        amp: autocast for prediction (``off`` by default: the metric sees float32 probabilities).

    Returns:
        ``{"n_images", <METRIC_KEYS means>, "per_image": [...], "checkpoint", "variant", "data", ...}``.
    """
    dev = resolve_device(device)
    slices = load_folder(data)
    model, meta = load_semiseg_model(checkpoint, dev)
    size = tuple(int(s) for s in meta.get("input_size", SLICE_SIZE))
    t0 = time.perf_counter()
    flip_tta = flip_tta_name(meta.get("flip_tta"))
    probs = predict_slices(model, slices, (size[0], size[1]), dev, amp=amp, flip_tta=flip_tta)
    rows = score_slices(probs, slices)
    result: dict[str, Any] = {"n_images": len(rows), **summarize(rows)}
    result.update({
        "per_image": rows,
        "checkpoint": meta["checkpoint"],
        "variant": meta["variant"],
        "input_size": list(size),
        "flip_tta": flip_tta,
        "data": str(Path(data)),
        "device": str(dev),
        "seconds": round(time.perf_counter() - t0, 3),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "metric": "mean_dice_infnet: Inf-Net's EvaluationTool definition (docs/method.md); "
                  "the other metrics at probability >= 0.5",
    })
    return result


def format_table(result: dict[str, Any]) -> str:
    """A short text table of the means."""
    head = " | ".join(f"{k:>16}" for k in ("n_images", *TABLE_KEYS))
    vals = " | ".join([f"{result['n_images']:>16d}", *(f"{result[k]:>16.4f}" for k in TABLE_KEYS)])
    return f"{head}\n{vals}"


def write_json(result: dict[str, Any], path: Path | str) -> None:
    """Atomic JSON write."""
    from covidseg.io.atomic import atomic_write_text

    atomic_write_text(Path(path), json.dumps(result, indent=2) + "\n")


__all__ = ["METRIC_KEYS", "default_checkpoint", "evaluate_folder", "format_table", "load_semiseg_model",
           "write_json"]
