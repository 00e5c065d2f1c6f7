"""Exporting a trained network (ONNX, TorchScript) and running it through ONNX Runtime.

:func:`export_model` turns a checkpoint into a self-describing file for hospital pipelines and other runtimes:

- **ONNX** (opset :data:`ONNX_OPSET`), input ``ct`` ``(B, 1, D, H, W)`` float32 in [0, 1] (the normalised,
  "lung only" input of :mod:`covidseg.intensity`), output ``logits`` ``(B, K, D, H, W)``; batch and every spatial
  axis are dynamic (each a multiple of ``size_divisor``). The file's ``metadata_props`` hold the variant, the covidseg
  version, the target and its channel names, ``size_divisor``, the export window and the checkpoint's full resolved
  config (keys in :data:`METADATA_KEYS`), so ``covidseg segment --backend onnxruntime`` needs nothing else.
- **TorchScript** (a traced module), the same input and output; the same metadata is stored as the extra file
  ``covidseg.json`` (``torch.jit.load(path, _extra_files={"covidseg.json": ""})``).

Deep supervision is always switched off: an exported model has only its final head. Every export is verified by
running the written file once at the window size and once at another size and batch, against the PyTorch model.

:class:`OnnxRuntimeModel` wraps an ``onnxruntime.InferenceSession`` as a module that takes and returns torch
tensors, so :func:`covidseg.inference.sliding_window.predict_volume` uses it unchanged; :func:`load_model` opens a
checkpoint, an ONNX file or a TorchScript file for a given backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from torch import nn

from covidseg import __version__
from covidseg.config import Config, config_from_dict, config_to_dict
from covidseg.errors import ConfigError, InputError, OutputExistsError, UserError
from covidseg.io.atomic import atomic_path, atomic_write_bytes

if TYPE_CHECKING:
    from covidseg.models import UNet

ExportFormat = Literal["onnx", "torchscript"]
Backend = Literal["torch", "onnxruntime"]

FORMATS: tuple[str, ...] = ("onnx", "torchscript")
"""Formats :func:`export_model` writes."""
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime")
"""Backends :func:`load_model` runs."""

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

VERIFY_RTOL = 1e-3
"""Largest logit difference accepted by the verification, relative to ``max(1, max |logit|)``: float32 kernels
of two runtimes differ by ~1e-6 relative; a wrong graph differs by O(1)."""
ORT_INTER_OP_THREADS = 1
"""The graph is a chain of large convolutions: parallelism inside each op (intra-op) is what pays."""


# --------------------------------------------------------------------------------------------- metadata


def target_channels(target: str) -> tuple[str, ...]:
    """Channel names of a training target (``infection``, ``lung``, ``joint``)."""
    from covidseg.training.sampler import TARGET_CHANNELS

    if target not in TARGET_CHANNELS:
        raise ConfigError(f"target {target!r}: expected one of {', '.join(TARGET_CHANNELS)}")
    return TARGET_CHANNELS[target]


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


# --------------------------------------------------------------------------------------------- wrappers


def check_exported_input(shape: Sequence[int], info: ExportInfo, name: str) -> None:
    """Raise :class:`InputError` naming a valid size when ``shape`` ``(B, C, *S)`` does not fit the model."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 + info.spatial_dims or shape[1] != info.in_channels:
        axes = "(B, C, D, H, W)" if info.spatial_dims == 3 else "(B, C, H, W)"
        raise InputError(f"{name}: input of shape {shape}; expected {axes} with C = {info.in_channels}")
    spatial, div = shape[2:], info.size_divisor
    if any(s % d or s < d for s, d in zip(spatial, div, strict=True)):
        fit = tuple(max(d, -(-s // d) * d) for s, d in zip(spatial, div, strict=True))
        raise InputError(
            f"{name}: input size {'x'.join(map(str, spatial))} does not fit model '{info.variant}' (each axis must be "
            f"a multiple of {'x'.join(map(str, div))}); use {'x'.join(map(str, fit))} (pad or crop)"
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
    """An ONNX file written by :func:`export_model`, run by ONNX Runtime behind a torch-module face.

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
    """A TorchScript file written by :func:`export_model`, with the attributes of the PyTorch model.

    Args:
        path: the ``.pt``/``.ts`` TorchScript archive.
        device: where the module runs.
    """

    def __init__(self, path: Path | str, device: str | torch.device = "cpu") -> None:
        extra = {TORCHSCRIPT_EXTRA: ""}
        try:
            with _quiet_exporters():
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


# --------------------------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
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
    with _quiet_exporters(), torch.no_grad():
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


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What :func:`export_model` wrote and how the verification went."""

    path: Path
    format: str
    variant: str
    target: str
    window: tuple[int, ...]
    opset: int | None
    size_bytes: int
    seconds: float
    checked_shapes: tuple[tuple[int, ...], ...]
    max_abs_diff: float
    """Largest |logit| difference between the written file and the PyTorch model over the checked shapes."""


def _resolve_window(window: Sequence[int] | None, model: nn.Module, config: Config) -> tuple[int, ...]:
    dims = int(model.spatial_dims)  # type: ignore[arg-type]
    div: tuple[int, ...] = model.size_divisor  # type: ignore[assignment]
    if window is None:
        window = tuple(config.inference.window)[-dims:]
    window = tuple(int(w) for w in window)
    if len(window) != dims:
        want = "D H W" if dims == 3 else "H W"
        raise ConfigError(f"--window {' '.join(map(str, window))}: a {dims}D model needs {dims} sizes ({want})")
    if any(w < d or w % d for w, d in zip(window, div, strict=True)):
        fit = tuple(max(d, -(-w // d) * d) for w, d in zip(window, div, strict=True))
        raise ConfigError(
            f"--window {' '.join(map(str, window))}: each size must be a multiple of the model's size divisor "
            f"{' '.join(map(str, div))}; use --window {' '.join(map(str, fit))}"
        )
    return window


def _run_exported(path: Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    runner: nn.Module = OnnxRuntimeModel(path, threads=0) if fmt == "onnx" else TorchScriptModel(path)
    with torch.no_grad():
        return runner(x)


def export_model(checkpoint: Path | str, fmt: str, out: Path | str, window: Sequence[int] | None = None,
                 force: bool = False, opset: int = ONNX_OPSET, seed: int = 0) -> ExportReport:
    """Export a checkpoint to ONNX or TorchScript, atomically, and verify the written file.

    Args:
        checkpoint: a ``.pt`` file written by ``covidseg train``.
        fmt: ``onnx`` or ``torchscript``.
        out: destination file (its folder is created).
        window: spatial size ``(D, H, W)`` (``(H, W)`` for 2D) of the tracing example and the window recorded in
            the metadata; default the checkpoint's ``inference.window``. Other sizes work too (dynamic axes).
        force: replace an existing ``out``.
        opset: ONNX opset (ignored for TorchScript).
        seed: seed of the random verification inputs.

    Returns:
        An :class:`ExportReport`.

    Raises:
        InputError: bad checkpoint; ``out`` is the checkpoint itself.
        OutputExistsError: ``out`` exists and ``force`` is false.
        ConfigError: unknown format or a window that does not fit the model.
        RuntimeError: the written file disagrees with the PyTorch model (a bug; the file is removed).
    """
    from covidseg.checkpoint import load_checkpoint

    start = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise InputError(f"{out}: the output is the checkpoint itself; inputs are never overwritten, pick another -o")
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give a file name such as model.{'onnx' if fmt == 'onnx' else 'ts'}")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it or choose another -o")
    loaded, config, meta = load_checkpoint(checkpoint, "cpu")
    model = cast("UNet", loaded)
    model.set_deep_supervision(False)
    model.eval()
    win = _resolve_window(window, model, config)
    metadata = build_metadata(model, config, meta, win, source=checkpoint)
    in_ch = model.config.in_channels
    generator = torch.Generator().manual_seed(seed)
    example = torch.rand((1, in_ch, *win), generator=generator)

    if fmt == "onnx":
        atomic_write_bytes(out, onnx_bytes(model, example, metadata, opset))
    else:
        with atomic_path(out) as tmp, _quiet_exporters(), torch.no_grad():
            traced = torch.jit.trace(model, (example,), check_trace=False)
            torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(metadata)})

    # verify: the window itself, and a batch of 2 at another size (every axis one divisor larger) for dynamic axes
    other = tuple(w + d for w, d in zip(win, model.size_divisor, strict=True))
    shapes = ((1, in_ch, *win), (2, in_ch, *other))
    worst = 0.0
    for shape in shapes:
        x = torch.rand(shape, generator=generator)
        with torch.no_grad():
            expected = model(x)
        got = _run_exported(out, fmt, x)
        if got.shape != expected.shape:
            out.unlink(missing_ok=True)
            raise RuntimeError(f"export check failed: output {tuple(got.shape)} for input {shape}, expected "
                               f"{tuple(expected.shape)}; the exported file was removed")
        diff = float((got - expected).abs().max())
        worst = max(worst, diff)
        if not diff <= VERIFY_RTOL * max(1.0, float(expected.abs().max())):
            out.unlink(missing_ok=True)
            raise RuntimeError(f"export check failed: max |logit difference| {diff:.3g} at input {shape}; "
                               "the exported file was removed")
    return ExportReport(
        path=out, format=fmt, variant=model.config.name, target=metadata["covidseg.target"], window=win,
        opset=opset if fmt == "onnx" else None, size_bytes=out.stat().st_size,
        seconds=time.perf_counter() - start, checked_shapes=shapes, max_abs_diff=worst,
    )


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
               threads: int = 0) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Open a model for inference with the given backend; same return shape as :func:`load_checkpoint`.

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
        ``(model, config, meta)``: the model in eval mode with deep supervision off, the full resolved config it
        was trained with, and the checkpoint's meta dict (``target``, ``best_dice``...).

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
            return ts.eval(), ts.info.config, {**ts.info.meta, "target": ts.info.target}
        loaded, config, meta = load_checkpoint(path, device)
        cast("UNet", loaded).set_deep_supervision(False)
        return loaded.eval(), config, meta
    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda"
                 else ["CPUExecutionProvider"])
    if _is_onnx(path):
        runner = OnnxRuntimeModel(path, threads=threads, providers=providers)
        return runner.eval(), runner.info.config, {**runner.info.meta, "target": runner.info.target}
    if _is_torchscript(path):
        raise InputError(f"{path}: a TorchScript file runs with --backend torch; for onnxruntime export to ONNX")
    loaded, config, meta = load_checkpoint(path, "cpu")
    model = cast("UNet", loaded)
    model.set_deep_supervision(False)
    model.eval()
    win = _resolve_window(None, model, config)
    metadata = build_metadata(model, config, meta, win, source=path)
    example = torch.rand((1, model.config.in_channels, *win), generator=torch.Generator().manual_seed(0))
    runner = OnnxRuntimeModel(onnx_bytes(model, example, metadata), threads=threads, providers=providers)
    runner.name = f"{path} (exported in memory)"
    return runner.eval(), config, meta


def load_backend(path_or_ckpt: Path | str, backend: str = "torch", device: str | torch.device = "cpu",
                 threads: int = 0) -> nn.Module:
    """The model of :func:`load_model` alone (eval mode, deep supervision off, ``size_divisor`` set)."""
    return load_model(path_or_ckpt, backend, device, threads)[0]


def read_export_info(path: Path | str) -> ExportInfo:
    """The metadata of an ONNX or TorchScript file written by :func:`export_model`, without building a session."""
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
