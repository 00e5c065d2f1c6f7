"""Exporting a trained network to ONNX or TorchScript, verified against the PyTorch model.

:func:`export_model` turns a checkpoint into a self-describing file for hospital pipelines and other runtimes, in
the exchange format of :mod:`covidseg.exchange` (ONNX opset :data:`~covidseg.exchange.ONNX_OPSET` with dynamic batch
and spatial axes, or a traced TorchScript module; the checkpoint's variant, target, channels, size divisor, window
and full config as metadata), written atomically. Deep supervision is always switched off: an exported model has
only its final head. Every export is verified by running the written file (through
:mod:`covidseg.inference.backends`, as ``covidseg segment --backend`` runs it) once at the window size and once at
another size and batch, against the PyTorch model; a file that disagrees is removed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import nn

from covidseg.errors import ConfigError, InputError, OutputExistsError
from covidseg.exchange import (
    ONNX_OPSET,
    TORCHSCRIPT_EXTRA,
    build_metadata,
    export_window,
    onnx_bytes,
    quiet_exporters,
)
from covidseg.inference.backends import OnnxRuntimeModel, TorchScriptModel
from covidseg.io.atomic import atomic_path, atomic_write_bytes

if TYPE_CHECKING:
    from covidseg.models import UNet

ExportFormat = Literal["onnx", "torchscript"]

FORMATS: tuple[str, ...] = ("onnx", "torchscript")
"""Formats :func:`export_model` writes."""
VERIFY_RTOL = 1e-3
"""Largest logit difference accepted by the verification, relative to ``max(1, max |logit|)``: float32 kernels
of two runtimes differ by ~1e-6 relative; a wrong graph differs by O(1)."""


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
    win = export_window(window, model, config)
    metadata = build_metadata(model, config, meta, win, source=checkpoint)
    in_ch = model.config.in_channels
    generator = torch.Generator().manual_seed(seed)
    example = torch.rand((1, in_ch, *win), generator=generator)

    if fmt == "onnx":
        atomic_write_bytes(out, onnx_bytes(model, example, metadata, opset))
    else:
        with atomic_path(out) as tmp, quiet_exporters(), torch.no_grad():
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
