"""The exchange format: what a covidseg ONNX or TorchScript file holds, shared by the writer and the readers.

:mod:`covidseg.export` writes the files (``covidseg export``); :mod:`covidseg.inference.backends` reads and runs
them (``covidseg segment --backend``). Both take the format from here:

- **ONNX** (opset :data:`ONNX_OPSET`), input :data:`INPUT_NAME` ``(B, 1, D, H, W)`` float32 in [0, 1] (the
  normalised, "lung only" input of :mod:`covidseg.intensity`), output :data:`OUTPUT_NAME` ``(B, K, D, H, W)``
  logits; batch and every spatial axis are dynamic (each a multiple of ``size_divisor``). The file's
  ``metadata_props`` hold the variant, the covidseg version, the target and its channel names, ``size_divisor``, the
  export window and the checkpoint's full resolved config (keys in :data:`METADATA_KEYS`), so a runtime needs
  nothing else.
- **TorchScript** (a traced module), the same input and output; the same metadata is stored as the extra file
  :data:`TORCHSCRIPT_EXTRA` (``torch.jit.load(path, _extra_files={"covidseg.json": ""})``).

:func:`build_metadata` writes the metadata of a model, :meth:`ExportInfo.from_metadata` reads it back and
:func:`onnx_bytes` serialises a model to ONNX (in memory: a file, or a session that is never written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidseg import __version__
from covidseg.config import Config, config_from_dict, config_to_dict
from covidseg.errors import ConfigError, InputError, UserError
from covidseg.models.shapes import fit_size, fits, format_size
from covidseg.targets import target_channels

ONNX_OPSET = 17
"""ONNX opset of exported files. The network needs only Conv, ConvTranspose, BatchNormalization (folded), Relu,
Sigmoid, Mul, Add, Concat, ReduceMean, Gemm and MaxPool, all stable since opset 13; 17 is read by every ONNX Runtime
since 1.11 (2022), TensorRT >= 8.5 and OpenVINO >= 2022.3, so hospital runtimes of the last years open the file."""

INPUT_NAME = "ct"
"""Name of the exported graph's input: ``(B, 1, D, H, W)`` float32, the normalised CT in [0, 1]."""
OUTPUT_NAME = "logits"
"""Name of the exported graph's output: ``(B, K, D, H, W)`` float32 logits (apply a sigmoid per channel)."""

METADATA_FORMAT = "covidseg-export"
"""Value of ``covidseg.format`` in an exported file."""
METADATA_FORMAT_VERSION = 1
"""Bumped when the metadata layout changes incompatibly."""
METADATA_KEYS: tuple[str, ...] = (
    "covidseg.format", "covidseg.format_version", "covidseg.version", "covidseg.variant", "covidseg.target",
    "covidseg.channels", "covidseg.spatial_dims", "covidseg.in_channels", "covidseg.out_channels",
    "covidseg.size_divisor", "covidseg.window", "covidseg.config", "covidseg.meta", "covidseg.source",
    "covidseg.source_sha256",
)
"""String metadata stored in every export (ONNX ``metadata_props``; TorchScript ``covidseg.json``). Tuples are
written as comma-separated integers (``"4,16,16"``); ``config`` and ``meta`` are JSON."""
TORCHSCRIPT_EXTRA = "covidseg.json"
"""Name of the TorchScript extra file holding the metadata."""


# --------------------------------------------------------------------------------------------- metadata


def _ints(values: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in values)


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _json_safe(value: Any) -> Any:
    """Meta values as JSON (tensors are dropped: they belong in the checkpoint, not the export's metadata)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items() if not isinstance(v, torch.Tensor)}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_metadata(model: nn.Module, config: Config, meta: Mapping[str, Any], window: Sequence[int],
                   source: Path | None = None) -> dict[str, str]:
    """The string metadata of an export (see :data:`METADATA_KEYS`)."""
    model_cfg = getattr(model, "config", config.model)
    target = str(meta.get("target", config.train.target))
    channels = target_channels(target)
    if len(channels) != model_cfg.out_channels:
        raise InputError(
            f"the checkpoint's target {target!r} has {len(channels)} channel(s) ({', '.join(channels)}) but its model "
            f"has {model_cfg.out_channels}; the checkpoint is inconsistent, use another one"
        )
    config = dataclasses.replace(config, model=dataclasses.replace(model_cfg))
    return {
        "covidseg.format": METADATA_FORMAT,
        "covidseg.format_version": str(METADATA_FORMAT_VERSION),
        "covidseg.version": __version__,
        "covidseg.variant": model_cfg.name,
        "covidseg.target": target,
        "covidseg.channels": ",".join(channels),
        "covidseg.spatial_dims": str(model_cfg.spatial_dims),
        "covidseg.in_channels": str(model_cfg.in_channels),
        "covidseg.out_channels": str(model_cfg.out_channels),
        "covidseg.size_divisor": _ints(model.size_divisor),  # type: ignore[arg-type]
        "covidseg.window": _ints(window),
        "covidseg.config": json.dumps(config_to_dict(config), sort_keys=True),
        "covidseg.meta": json.dumps(_json_safe(dict(meta)), sort_keys=True),
        "covidseg.source": source.name if source is not None else "",
        "covidseg.source_sha256": _sha256(source) if source is not None and source.is_file() else "",
    }


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What an exported file says about itself (parsed from its metadata)."""

    variant: str
    version: str
    target: str
    channels: tuple[str, ...]
    spatial_dims: int
    in_channels: int
    out_channels: int
    size_divisor: tuple[int, ...]
    window: tuple[int, ...]
    config: Config
    meta: dict[str, Any]

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], path: Path | str) -> ExportInfo:
        """Parse :data:`METADATA_KEYS`; raise InputError for a file that ``covidseg export`` did not write."""
        if metadata.get("covidseg.format") != METADATA_FORMAT:
            raise InputError(
                f"{path}: no covidseg metadata (key 'covidseg.format' is {metadata.get('covidseg.format')!r}, "
                f"expected {METADATA_FORMAT!r}); export the model with 'covidseg export CKPT --format onnx -o FILE'"
            )
        version = metadata.get("covidseg.format_version")
        if version != str(METADATA_FORMAT_VERSION):
            raise InputError(
                f"{path}: export metadata version {version} (covidseg {metadata.get('covidseg.version', '?')}), "
                f"expected {METADATA_FORMAT_VERSION} (covidseg {__version__}); export the checkpoint again"
            )
        try:
            config = config_from_dict(json.loads(metadata["covidseg.config"]))
            return cls(
                variant=metadata["covidseg.variant"],
                version=metadata["covidseg.version"],
                target=metadata["covidseg.target"],
                channels=tuple(metadata["covidseg.channels"].split(",")),
                spatial_dims=int(metadata["covidseg.spatial_dims"]),
                in_channels=int(metadata["covidseg.in_channels"]),
                out_channels=int(metadata["covidseg.out_channels"]),
                size_divisor=_parse_ints(metadata["covidseg.size_divisor"]),
                window=_parse_ints(metadata["covidseg.window"]),
                config=config,
                meta=dict(json.loads(metadata.get("covidseg.meta") or "{}")),
            )
        except (KeyError, ValueError, UserError) as exc:
            raise InputError(f"{path}: damaged covidseg export metadata ({exc}); export the checkpoint again") from None


def export_window(window: Sequence[int] | None, model: nn.Module, config: Config) -> tuple[int, ...]:
    """The window of an export: ``window`` (``(D, H, W)``, ``(H, W)`` in 2D), default the config's
    ``inference.window``, checked against the model's size divisor.

    Raises:
        ConfigError: the wrong number of sizes, or sizes that are not multiples of the divisor.
    """
    dims = int(model.spatial_dims)  # type: ignore[arg-type]
    div: tuple[int, ...] = model.size_divisor  # type: ignore[assignment]
    if window is None:
        window = tuple(config.inference.window)[-dims:]
    window = tuple(int(w) for w in window)
    if len(window) != dims:
        want = "D H W" if dims == 3 else "H W"
        raise ConfigError(f"--window {format_size(window, ' ')}: a {dims}D model needs {dims} sizes ({want})")
    if not fits(window, div):
        raise ConfigError(
            f"--window {format_size(window, ' ')}: each size must be a multiple of the model's size divisor "
            f"{format_size(div, ' ')}; use --window {format_size(fit_size(window, div), ' ')}"
        )
    return window


# --------------------------------------------------------------------------------------------- ONNX


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Hide the deprecation and tracer chatter of ``torch.onnx`` (TorchScript exporter) and ``torch.jit``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _dynamic_axes(spatial_dims: int) -> dict[int, str]:
    names = ("depth", "height", "width") if spatial_dims == 3 else ("height", "width")
    return {0: "batch", **{2 + i: n for i, n in enumerate(names)}}


def onnx_bytes(model: nn.Module, example: torch.Tensor, metadata: Mapping[str, str],
               opset: int = ONNX_OPSET) -> bytes:
    """Serialise ``model`` (deep supervision off, eval mode, on the CPU) to ONNX with dynamic axes and metadata.

    Uses the TorchScript-based exporter (``dynamo=False``): 3 s instead of 13 s for the torch.export one here,
    and dynamic sizes come from ``dynamic_axes`` without shape guards.
    """
    import onnx

    axes = _dynamic_axes(example.ndim - 2)
    buffer = io.BytesIO()
    with quiet_exporters(), torch.no_grad():
        torch.onnx.export(model, (example,), buffer,  # type: ignore[arg-type]  # a file-like object is accepted
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name = "covidseg"
    proto.producer_version = __version__
    proto.doc_string = (f"covidseg {metadata.get('covidseg.variant', '')}: input '{INPUT_NAME}' (B, 1, D, H, W) "
                        f"normalised CT in [0, 1]; output '{OUTPUT_NAME}' (B, K, D, H, W) logits, K = "
                        f"{metadata.get('covidseg.channels', '')}")
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()
