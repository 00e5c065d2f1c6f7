"""Checkpoints: the weights together with the full resolved config, written atomically.

A checkpoint is a ``torch.save`` of a plain dict (loadable with ``weights_only=True``)::

    {"format": "covidseg-checkpoint", "format_version": 1, "covidseg_version": "0.1.0",
     "config": config_to_dict(Config, runtime=False) (the model and its data convention; its model section is
               the model's own resolved ModelConfig; no runtime section: where a run computes is not kept),
     "state_dict": {name: tensor on CPU}, "meta": {"epoch": ..., "best_dice": ..., "target": ...}}

:func:`load_checkpoint` rebuilds the model from the stored config and raises
:class:`~covidseg.errors.InputError` for a missing, unreadable, truncated or foreign file, another format version,
or weights that do not fit the stored variant (naming the variant found and the one expected).

The package ships one checkpoint, the 2D infection model of ``covidseg/weights/semiseg-2d.pt``
(:func:`default_checkpoint`; its model card is ``covidseg/weights/README.md``); ``--checkpoint default`` names it.
A checkpoint written by ``covidseg semiseg train`` says so in its meta (``task`` = :data:`SLICE_TASK`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidseg import __version__
from covidseg.config import KEPT_SECTIONS, Config, config_from_dict, config_to_dict, upgrade_keys
from covidseg.errors import InputError, UserError
from covidseg.io.atomic import atomic_path
from covidseg.models.heads import (
    unwrap_model as unwrap_model,  # re-exported; its home is covidseg.models.heads
)

FORMAT = "covidseg-checkpoint"
"""Format tag stored in every checkpoint."""
FORMAT_VERSION = 1
"""Bumped whenever the layout of the stored dict changes incompatibly."""
DEFAULT_WEIGHTS = "semiseg-2d.pt"
"""File name of the shipped model inside ``covidseg/weights/``."""
DEFAULT_NAME = "default"
"""What ``--checkpoint`` takes for the shipped model."""
SLICE_TASK = "semiseg-infection-2d"
"""``meta["task"]`` of a 2D model trained on COVID-SemiSeg slices (``covidseg semiseg train``): run slice by slice
on 8-bit windowed slices, not in sliding windows on the normalised CT."""


def default_checkpoint() -> Path:
    """Path of the shipped model (found with :mod:`importlib.resources`: from a wheel and from a clone).

    Raises:
        InputError: the package was built without it.
    """
    path = Path(str(resources.files("covidseg") / "weights" / DEFAULT_WEIGHTS))
    if not path.is_file():
        raise InputError(
            f"{path}: the shipped COVID-SemiSeg model is not in this copy of covidseg; train one with "
            "'python benchmarks/semiseg_cv.py --data DIR --out OUT' (or 'covidseg semiseg train') and pass "
            "--checkpoint OUT/.../final.pt"
        )
    return path


def resolve_checkpoint(checkpoint: Path | str | None) -> Path:
    """``None`` or ``"default"`` -> :func:`default_checkpoint`; any other value is the path it names."""
    if checkpoint is None or str(checkpoint) == DEFAULT_NAME:
        return default_checkpoint()
    return Path(checkpoint)


def _plain(value: Any) -> Any:
    """Meta values as types ``torch.load(weights_only=True)`` accepts (numpy scalars -> Python, paths -> str)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (Path, str)):  # str subclasses too (torch.__version__ is a TorchVersion)
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar or 0-d array
        return value.item()
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise TypeError(f"checkpoint meta value {value!r} of type {type(value).__name__} cannot be stored")


def save_checkpoint(path: Path | str, model: nn.Module, config: Config, **meta: Any) -> Path:
    """Write ``model``'s weights, ``config`` and ``meta`` (epoch, step, best_dice, target...) atomically.

    The stored model section is the model's own resolved config (``model.config``), so the file always rebuilds
    the network it was saved from; the ``runtime`` section is not stored.

    Args:
        path: destination ``.pt`` file (its folder is created).
        model: a :class:`~covidseg.models.UNet` (possibly wrapped by DDP or ``torch.compile``).
        config: the run's full config.
        **meta: plain values (numbers, strings, lists, dicts, tensors).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    bare = unwrap_model(model)
    model_config = getattr(bare, "config", None)
    if model_config is not None:
        config = dataclasses.replace(config, model=dataclasses.replace(model_config))
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "covidseg_version": __version__,
        "config": config_to_dict(config, runtime=False),
        "state_dict": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "meta": _plain(meta),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _guess_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Describe the switches a state_dict was trained with (for error messages)."""
    head = state_dict.get("head.weight")
    dims = f"{head.ndim - 2}D" if isinstance(head, torch.Tensor) else "unknown dims"
    fc2 = state_dict.get("fv.0.channel.fc2.weight")
    fv = "none" if fc2 is None else ("ce" if fc2.shape[0] == 1 else "se")
    paspp = any(k.startswith("paspp.") for k in state_dict)
    ds = any(k.startswith("ds_heads.") for k in state_dict)
    width = f", base_width {head.shape[1]}" if isinstance(head, torch.Tensor) else ""
    return f"{dims}, fv={fv}, paspp={str(paspp).lower()}, deep_supervision={str(ds).lower()}{width}"


def read_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict, validated (format tag and version). Raises InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found; give the .pt file written by 'covidseg train'")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # the unpickler raises anything from IndexError to UnpicklingError on garbage
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path}: not a readable covidseg checkpoint (corrupt or truncated: {first[:200]}); "
            "use another checkpoint or train again"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = sorted(payload)[:6] if isinstance(payload, dict) else type(payload).__name__
        raise InputError(
            f"{path}: not a covidseg checkpoint (expected format tag {FORMAT!r}, found {found}); "
            "give a file written by 'covidseg train'"
        )
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            f"{path}: checkpoint format version {version} (written by covidseg "
            f"{payload.get('covidseg_version', '?')}), expected {FORMAT_VERSION} (covidseg {__version__}); "
            "use the covidseg version that wrote it or train again"
        )
    for key in ("config", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise InputError(f"{path}: checkpoint has no {key!r} section; the file is damaged, train again")
    return payload


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild the model stored in ``path``.

    Args:
        path: a file written by :func:`save_checkpoint`.
        device: where the weights go.

    Returns:
        ``(model, config, meta)``: the model in eval mode with its heads as built (inference paths call
        ``model.set_deep_supervision(False)``), the stored config (its ``runtime`` section at the defaults: a
        checkpoint keeps none, and the runtime keys of older checkpoints are dropped) and the stored meta dict.

    Raises:
        InputError: missing, corrupt, truncated or foreign file; another format version; a config this version
            cannot read; weights that do not fit the stored variant.
    """
    from covidseg.models import create_model

    path = Path(path)
    payload = read_checkpoint(path, device)
    try:
        kept = {k: v for k, v in upgrade_keys(payload["config"]).items() if k in KEPT_SECTIONS}
        config = config_from_dict(kept)
        model = create_model(config.model)
    except UserError as exc:
        raise InputError(f"{path}: the stored config cannot be used ({exc}); train again with this version") from None
    state_dict = payload["state_dict"]
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        m = config.model
        expected = (f"{m.name}: {m.spatial_dims}D, fv={m.fv}, paspp={str(m.paspp).lower()}, "
                    f"deep_supervision={str(m.deep_supervision).lower()}, base_width {m.base_width}")
        raise InputError(
            f"{path}: the weights do not fit the stored model variant (expected {expected}; the weights look like "
            f"{_guess_variant(state_dict)}; {detail}); the file is inconsistent, use another checkpoint"
        ) from None
    model.to(device).eval()
    meta = payload.get("meta") or {}
    return model, config, dict(meta)
