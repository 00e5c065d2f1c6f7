"""Loading a model for inference, and the runtimes that run it: PyTorch, TorchScript, ONNX Runtime.

:func:`load_model` opens a checkpoint, an ONNX file or a TorchScript file for a backend and returns one
:class:`LoadedModel`: the module (eval mode, deep supervision off, ``size_divisor`` set), the config it was trained
with, its meta, its source file and what it predicts. Code written for the PyTorch model
(:func:`covidseg.inference.sliding_window.predict_volume`) runs every backend unchanged:

- :class:`OnnxRuntimeModel` wraps an ``onnxruntime.InferenceSession`` as a module that takes and returns torch
  tensors;
- :class:`TorchScriptModel` wraps a TorchScript archive with the attributes of the PyTorch model.

Both read the metadata :func:`covidseg.exchange.build_metadata` wrote (:class:`covidseg.exchange.ExportInfo`);
:mod:`covidseg.export` writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from torch import nn

from covidseg.config import Config
from covidseg.errors import ConfigError, InputError
from covidseg.exchange import (
    INPUT_NAME,
    OUTPUT_NAME,
    TORCHSCRIPT_EXTRA,
    ExportInfo,
    build_metadata,
    export_window,
    onnx_bytes,
    quiet_exporters,
)
from covidseg.models.shapes import fit_size, fits, format_size
from covidseg.runtime import resolve_device
from covidseg.targets import TARGET_CHANNELS, target_of

if TYPE_CHECKING:
    from covidseg.models import UNet

Backend = Literal["torch", "onnxruntime"]
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime")
"""Backends :func:`load_model` runs."""
ORT_INTER_OP_THREADS = 1
"""The graph is a chain of large convolutions: parallelism inside each op (intra-op) is what pays."""


# --------------------------------------------------------------------------------------------- the loaded model


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with what it was trained with and what it predicts.

    Attributes:
        module: the network (eval mode, deep supervision off): a :class:`~covidseg.models.UNet`, a
            :class:`TorchScriptModel` or an :class:`OnnxRuntimeModel`; ``(B, C, D, H, W) -> (B, K, D, H, W)``
            logits.
        config: the full resolved config it was trained with (its ``intensity`` section normalises the input).
        meta: the checkpoint's meta dict (``target``, ``best_dice``...).
        source: the file it was loaded from.
        backend: ``torch`` or ``onnxruntime``.
    """

    module: nn.Module
    config: Config
    meta: dict[str, Any]
    source: Path
    backend: str = "torch"

    @property
    def out_channels(self) -> int:
        """Number of output channels ``K``."""
        return int(self.config.model.out_channels)

    @property
    def target(self) -> str:
        """The training target the checkpoint states (``infection``, ``lung``, ``joint``)."""
        return str(self.meta.get("target", self.config.train.target))

    @property
    def channels(self) -> tuple[str, ...]:
        """Names of the ``K`` output channels, from their number (:data:`covidseg.targets.TARGET_CHANNELS`)."""
        return TARGET_CHANNELS[target_of(self.out_channels)]


def model_device(backend: str, request: str | None, local_rank: int | None = None) -> str:
    """Where a backend's networks run: the CPU for ONNX Runtime (its CPU provider), else the device ``request``
    names (:func:`covidseg.runtime.resolve_device`; a bare ``cuda`` is ``cuda:local_rank``)."""
    if backend == "onnxruntime":
        return "cpu"
    return str(resolve_device(request, local_rank))


# --------------------------------------------------------------------------------------------- runtimes


def check_exported_input(shape: Sequence[int], info: ExportInfo, name: str) -> None:
    """Raise :class:`InputError` naming a valid size when ``shape`` ``(B, C, *S)`` does not fit the model."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 + info.spatial_dims or shape[1] != info.in_channels:
        axes = "(B, C, D, H, W)" if info.spatial_dims == 3 else "(B, C, H, W)"
        raise InputError(f"{name}: input of shape {shape}; expected {axes} with C = {info.in_channels}")
    spatial, div = shape[2:], info.size_divisor
    if not fits(spatial, div):
        raise InputError(
            f"{name}: input size {format_size(spatial)} does not fit model '{info.variant}' (each axis must be "
            f"a multiple of {format_size(div)}); use {format_size(fit_size(spatial, div))} (pad or crop)"
        )


class _ExportedModel(nn.Module):
    """Common face of exported models: the attributes inference reads from a :class:`~covidseg.models.UNet`."""

    def __init__(self, info: ExportInfo, name: str) -> None:
        super().__init__()
        self.info = info
        self.name = name
        self.config = info.config.model
        self.spatial_dims = info.spatial_dims
        self.deep_supervision = False

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Per-axis divisor of valid input sizes: ``(D, H, W)`` in 3D, ``(H, W)`` in 2D."""
        return self.info.size_divisor

    def set_deep_supervision(self, enabled: bool) -> _ExportedModel:
        """No-op: an exported model has only its final head (``enabled=True`` is a ConfigError)."""
        if enabled:
            raise ConfigError(f"{self.name}: an exported model has no deep-supervision heads; train from a checkpoint")
        return self

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Same contract as :meth:`covidseg.models.UNet.check_input_shape`."""
        check_exported_input(shape, self.info, self.name)


class OnnxRuntimeModel(_ExportedModel):
    """An ONNX file written by :func:`covidseg.export.export_model`, run by ONNX Runtime behind a torch-module face.

    ``model(x)`` takes a torch tensor ``(B, C, D, H, W)`` (or ``(B, C, H, W)`` for a 2D model; any device and
    floating dtype) and returns float32 logits ``(B, K, D, H, W)`` on ``x``'s device, so code written for the
    PyTorch model (``predict_volume``) runs it unchanged. ``eval()``, ``to()`` and ``set_deep_supervision(False)``
    are accepted and change nothing (the session owns its own memory).

    Args:
        source: path of the ``.onnx`` file, or its bytes.
        threads: ONNX Runtime intra-op threads; 0 lets ONNX Runtime use every physical core.
        providers: execution providers, CPU by default (``["CUDAExecutionProvider", "CPUExecutionProvider"]``
            with the onnxruntime-gpu package).

    Raises:
        InputError: a missing or unreadable file, or one without covidseg metadata.
    """

    def __init__(self, source: Path | str | bytes, threads: int = 0, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        name = "<onnx bytes>" if isinstance(source, bytes) else str(source)
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise InputError(f"{source}: ONNX file not found; write one with 'covidseg export CKPT --format onnx -o FILE'")
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(0, int(threads))
        options.inter_op_num_threads = ORT_INTER_OP_THREADS
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: the default prints warnings about unused initialisers
        providers = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise ConfigError(
                f"ONNX Runtime provider(s) {', '.join(missing)} not available (available: "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use the CPU"
            )
        try:
            session = ort.InferenceSession(source if isinstance(source, bytes) else str(source),
                                           sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... classes
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise InputError(f"{name}: not a readable ONNX model ({first}); export the checkpoint again") from None
        info = ExportInfo.from_metadata(session.get_modelmeta().custom_metadata_map, name)
        super().__init__(info, name)
        self.session = session
        self.threads = int(threads)
        self.providers = tuple(session.get_providers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the segmentation.

        Args:
            x: ``(B, C_in, D, H, W)`` (3D) or ``(B, C_in, H, W)`` (2D); each spatial axis a multiple of
                :attr:`size_divisor`.

        Returns:
            ``(B, K, D, H, W)`` float32 logits on ``x``'s device.
        """
        self.check_input_shape(tuple(x.shape))
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(logits).to(x.device)


class TorchScriptModel(_ExportedModel):
    """A TorchScript file written by :func:`covidseg.export.export_model`, with the attributes of the PyTorch model.

    Args:
        path: the ``.pt``/``.ts`` TorchScript archive.
        device: where the module runs.
    """

    def __init__(self, path: Path | str, device: str | torch.device = "cpu") -> None:
        extra = {TORCHSCRIPT_EXTRA: ""}
        try:
            with quiet_exporters():
                module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as exc:  # torch.jit raises RuntimeError and friends on foreign files
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise InputError(f"{path}: not a readable TorchScript model ({first}); export the checkpoint again") from None
        raw = extra[TORCHSCRIPT_EXTRA]
        text = raw.decode() if isinstance(raw, bytes) else raw
        metadata = json.loads(text) if text else {}
        super().__init__(ExportInfo.from_metadata(metadata, path), str(path))
        self.module = module.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, D, H, W)`` -> ``(B, K, D, H, W)`` logits (see :meth:`OnnxRuntimeModel.forward`)."""
        self.check_input_shape(tuple(x.shape))
        return self.module(x)


# --------------------------------------------------------------------------------------------- loading


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with a ``code/`` folder; ``torch.save`` checkpoints have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def load_model(path: Path | str, backend: str = "torch", device: str | torch.device = "cpu",
               threads: int = 0) -> LoadedModel:
    """Open a model for inference with the given backend.

    ============  =====================================  =========================================================
    backend       path                                   what runs
    ============  =====================================  =========================================================
    torch         checkpoint ``.pt`` (``covidseg train``) the PyTorch :class:`~covidseg.models.UNet`
    torch         TorchScript file (``covidseg export``)  :class:`TorchScriptModel`
    onnxruntime   ``.onnx`` file (``covidseg export``)    :class:`OnnxRuntimeModel` (CPU provider; CUDA provider
                                                          when ``device`` is ``cuda`` and onnxruntime-gpu is there)
    onnxruntime   checkpoint ``.pt``                      exported to ONNX in memory, then as above
    ============  =====================================  =========================================================

    Args:
        path: the model file.
        backend: ``torch`` or ``onnxruntime``.
        device: device of the PyTorch model (``cpu``, ``cuda``, ``cuda:N``).
        threads: ONNX Runtime intra-op threads (0 = all cores); ignored by the torch backend.

    Returns:
        A :class:`LoadedModel`: the module in eval mode with deep supervision off, the full resolved config it was
        trained with, and the checkpoint's meta dict (``target``, ``best_dice``...).

    Raises:
        InputError: missing, foreign or damaged file; a file the backend cannot run.
        ConfigError: unknown backend.
    """
    from covidseg.checkpoint import load_checkpoint

    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if not path.is_file():
        raise InputError(f"{path}: model file not found; give a checkpoint (.pt), an .onnx or a TorchScript export")
    device = torch.device(device)
    if backend == "torch":
        if _is_onnx(path):
            raise InputError(f"{path}: an ONNX file runs with --backend onnxruntime, not torch")
        if _is_torchscript(path):
            ts = TorchScriptModel(path, device)
            return LoadedModel(ts.eval(), ts.info.config, {**ts.info.meta, "target": ts.info.target}, path, backend)
        loaded, config, meta = load_checkpoint(path, device)
        cast("UNet", loaded).set_deep_supervision(False)
        return LoadedModel(loaded.eval(), config, meta, path, backend)
    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda"
                 else ["CPUExecutionProvider"])
    if _is_onnx(path):
        runner = OnnxRuntimeModel(path, threads=threads, providers=providers)
        return LoadedModel(runner.eval(), runner.info.config, {**runner.info.meta, "target": runner.info.target},
                           path, backend)
    if _is_torchscript(path):
        raise InputError(f"{path}: a TorchScript file runs with --backend torch; for onnxruntime export to ONNX")
    loaded, config, meta = load_checkpoint(path, "cpu")
    model = cast("UNet", loaded)
    model.set_deep_supervision(False)
    model.eval()
    win = export_window(None, model, config)
    metadata = build_metadata(model, config, meta, win, source=path)
    example = torch.rand((1, model.config.in_channels, *win), generator=torch.Generator().manual_seed(0))
    runner = OnnxRuntimeModel(onnx_bytes(model, example, metadata), threads=threads, providers=providers)
    runner.name = f"{path} (exported in memory)"
    return LoadedModel(runner.eval(), config, meta, path, backend)


def read_export_info(path: Path | str) -> ExportInfo:
    """The metadata of an ONNX or TorchScript file written by :func:`covidseg.export.export_model`, without building a session."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if _is_onnx(path):
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and friends
            raise InputError(f"{path}: not a readable ONNX file ({type(exc).__name__}); export again") from None
        return ExportInfo.from_metadata({p.key: p.value for p in proto.metadata_props}, path)
    return TorchScriptModel(path).info
