"""Sliding-window inference with Gaussian importance blending, restricted to a box (the lungs).

The windows, their positions and the Gaussian weights are those of MONAI's ``sliding_window_inference``
(``mode="gaussian"``, ``sigma_scale=0.125``; Isensee et al., nnU-Net, Nature Methods 2021), so that over the
whole volume the result equals MONAI's (``tests/test_sliding_window.py`` compares them). What is added for speed
(measured in ``docs/performance.md``):

- windows only over ``box`` (the lungs' bounding box plus a margin) and, when a ``mask`` is given, only the
  windows that contain at least one mask voxel (the others would only predict voxels outside the mask);
- a covidseg network runs as its inference form (:func:`inference_form`: batch norm folded, weights in
  ``channels_last_3d`` and, where bfloat16 is used, in bfloat16; on the CPU the form ``runtime.cpu_kernels``
  names), windows batched and fed in the same dtype and memory format under :func:`torch.inference_mode`; other
  modules (TorchScript) run under autocast;
- bfloat16 on CPUs with native bfloat16 (AVX512-BF16 / AMX) and on GPUs that have it
  (:func:`covidseg.runtime.bf16_enabled`);
- accumulators allocated once, over the box only.

Optional flip test-time augmentation averages the sigmoid outputs over every combination of flips of
``cfg.tta_axes`` (nnU-Net's mirroring).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from covidseg.config import InferenceConfig, RuntimeConfig
from covidseg.errors import ConfigError
from covidseg.models.deploy import deploy_copy
from covidseg.models.shapes import fit_size, fits, format_size
from covidseg.models.unet import UNet
from covidseg.runtime import bf16_enabled, resolve_device, torch_threads

Box = tuple[slice, slice, slice]

MIN_IMPORTANCE = 1e-3
"""Smallest Gaussian weight of a window voxel (MONAI's floor), so that window borders still count a little."""


# ------------------------------------------------------------------------------------------------ helpers


def scan_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window start indices along one axis, exactly as MONAI's ``dense_patch_slices``.

    The step is ``int(window * (1 - overlap))`` (at least 1); the last window is shifted back to end at
    ``size``. ``size`` must be ``>= window``.
    """
    if window >= size:
        return [0]
    step = max(int(window * (1.0 - overlap)), 1)
    starts = []
    for i in range(int(math.ceil(size / step))):
        start = i * step
        starts.append(min(start, size - window))
        if start + window >= size:
            break
    return starts


def gaussian_importance(window: Sequence[int], sigma_scale: float) -> np.ndarray:
    """Gaussian importance map of one window, as MONAI's ``compute_importance_map(mode="gaussian")``.

    The separable product of ``exp(-x**2 / (2 sigma**2))`` with ``x`` measured from the window's centre
    ``(n - 1) / 2`` and ``sigma = sigma_scale * n`` per axis, floored at :data:`MIN_IMPORTANCE` so that
    every voxel of a window gets some weight (MONAI 1.6; nnU-Net uses the same sigma of 1/8 of the window).

    Args:
        window: ``(D, H, W)`` window size in voxels (an axis of size 1 gets weight 1).
        sigma_scale: sigma as a fraction of the window size (0.125 in MONAI and nnU-Net).

    Returns:
        ``(D, H, W)`` float32 weights in ``[MIN_IMPORTANCE, 1]``.
    """
    weights = np.ones((), dtype=np.float32)
    for n in window:
        x = np.arange(n, dtype=np.float32) - (n - 1) / 2.0
        sigma = np.float32(n * sigma_scale)
        g = np.exp(x**2 / (-2 * sigma**2)).astype(np.float32)
        weights = weights[..., None] * g
    floor = max(float(weights.min()), MIN_IMPORTANCE)
    return np.maximum(weights, np.float32(floor)).astype(np.float32)


def full_box(shape: Sequence[int]) -> Box:
    """The box covering a whole ``(D, H, W)`` volume."""
    return (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))


def mask_box(mask: np.ndarray, margin: Sequence[int] = (0, 0, 0)) -> Box | None:
    """Bounding box of the non-zero voxels of ``mask`` grown by ``margin`` voxels per axis (clipped to the
    volume); ``None`` when the mask is empty."""
    if not mask.any():
        return None
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        lo = max(int(hit[0]) - int(margin[axis]), 0)
        hi = min(int(hit[-1]) + 1 + int(margin[axis]), mask.shape[axis])
        out.append(slice(lo, hi))
    return (out[0], out[1], out[2])


def _normalise_box(box: Box | None, shape: Sequence[int]) -> tuple[slice, ...]:
    if box is None:
        return full_box(shape)
    if len(box) != 3:
        raise ConfigError(f"sliding-window box {box!r}: expected 3 slices (D, H, W)")
    out = []
    for sl, n in zip(box, shape, strict=True):
        start, stop, step = sl.indices(n)
        if step != 1 or stop <= start:
            raise ConfigError(f"sliding-window box {box!r}: each slice must be non-empty with step 1 (axis size {n})")
        out.append(slice(start, stop))
    return tuple(out)


def _flip_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of the flip axes (the empty one first), as tensor dims of ``(B, K, D, H, W)``."""
    dims = [2 + int(a) for a in axes]
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


def _batches(items: list[tuple[int, int, int]], size: int) -> Iterator[list[tuple[int, int, int]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ------------------------------------------------------------------------------------------------ predict


def predict_volume(
    model: nn.Module,
    volume: np.ndarray,
    cfg: InferenceConfig,
    box: Box | None = None,
    device: str | torch.device | None = None,
    mask: np.ndarray | None = None,
    progress: bool = False,
    runtime: RuntimeConfig | None = None,
) -> np.ndarray:
    """Sigmoid probabilities of ``model`` over ``volume`` by Gaussian-blended sliding windows.

    Args:
        model: a covidseg U-Net (3D or 2D) or any module mapping ``(B, C, *window)`` to ``(B, K, *window)``
            logits; deep supervision is switched off for the call and the model's train/eval state and heads are
            restored afterwards.
        volume: ``(D, H, W)`` or ``(C, D, H, W)`` network input (normalised to [0, 1]).
        cfg: window ``(D, H, W)``, overlap, Gaussian sigma scale, TTA.
        box: three slices ``(D, H, W)``; windows cover only this box and the result is 0 outside it.
            ``None`` = the whole volume.
        device: overrides ``runtime.device``.
        mask: optional ``(D, H, W)`` boolean mask (the lungs); windows without any mask voxel are skipped, so
            the result is only meaningful on the mask (it is exact there: every window covering a mask voxel
            contains it). Voxels covered by no computed window get probability 0.
        progress: show a tqdm bar over the batches (stderr).
        runtime: device, bfloat16, threads, memory layout, windows per call (default :class:`RuntimeConfig`).

    Returns:
        ``(K, D, H, W)`` float32 probabilities in [0, 1]: the sigmoid of the Gaussian-blended logits (logits are
        blended, as MONAI and nnU-Net do; with TTA the flipped passes' logits are averaged first).

    Raises:
        ConfigError: a window that does not fit the model's poolings, a bad box.
        UserError: a CUDA device that is not there.
    """
    rt = runtime if runtime is not None else RuntimeConfig()
    dev = resolve_device(device if device is not None else rt.device)
    with torch_threads(rt.threads):
        return _predict_volume(model, volume, cfg, box, dev, mask, progress, rt)


def _predict_volume(model: nn.Module, volume: np.ndarray, cfg: InferenceConfig, box: Box | None,
                    dev: torch.device, mask: np.ndarray | None, progress: bool, rt: RuntimeConfig) -> np.ndarray:
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4:
        raise ConfigError(f"predict_volume: volume of shape {vol.shape}; expected (D, H, W) or (C, D, H, W)")
    shape = vol.shape[1:]
    spatial_dims = int(getattr(model, "spatial_dims", 3))
    window = [int(w) for w in cfg.window]
    if spatial_dims == 2:
        window[0] = 1
    _check_window(model, window, spatial_dims)

    want = _normalise_box(box, shape)
    overlaps = tuple(cfg.overlap_axes) if cfg.overlap_axes is not None else (cfg.overlap,) * 3

    # pad (symmetrically with zeros, as MONAI) only where the volume itself is smaller than a window
    pad = [max(w - n, 0) for w, n in zip(window, shape, strict=True)]
    before = [q // 2 for q in pad]
    if any(pad):
        vol = np.pad(vol, [(0, 0)] + [(b, q - b) for b, q in zip(before, pad, strict=True)])
    padded = vol.shape[1:]
    want_p = [slice(b.start + o, b.stop + o) for b, o in zip(want, before, strict=True)]
    region_mask: np.ndarray | None = None
    if mask is not None:
        region_mask = np.zeros(padded, dtype=bool)
        region_mask[want_p[0], want_p[1], want_p[2]] = np.asarray(mask, dtype=bool)[want]
    # MONAI's positions on the whole volume, kept where they meet the box: inside it the result equals the
    # whole-volume result
    starts = [[s0 for s0 in scan_starts(n, w, ov) if s0 < b.stop and s0 + w > b.start]
              for n, w, b, ov in zip(padded, window, want_p, overlaps, strict=True)]
    positions = [(d, h, w) for d, h, w in itertools.product(*starts)]
    if region_mask is not None:
        positions = [p for p in positions
                     if region_mask[p[0] : p[0] + window[0], p[1] : p[1] + window[1], p[2] : p[2] + window[2]].any()]
    sized = [(p, tuple(window)) for p in positions]
    del region_mask
    if sized:
        lo = [min(p[a] for p, _ in sized) for a in range(3)]
        hi = [max(p[a] + size[a] for p, size in sized) for a in range(3)]
    else:
        lo, hi = [0, 0, 0], list(window)
    region = [slice(a, b) for a, b in zip(lo, hi, strict=True)]
    sub = vol[:, region[0], region[1], region[2]]
    sized = [((d - lo[0], h - lo[1], w - lo[2]), size) for (d, h, w), size in sized]

    inner = _unwrap(model)
    was_training = inner.training
    ds_before = getattr(inner, "deep_supervision", None)
    set_ds = getattr(inner, "set_deep_supervision", None)
    if callable(set_ds):
        set_ds(False)
    inner.eval()
    try:
        probs = _run_windows(inner, sub, sized, cfg, dev, spatial_dims, progress, rt)
    finally:
        if ds_before is not None and callable(set_ds):
            set_ds(bool(ds_before))
        inner.train(was_training)

    out = np.zeros((probs.shape[0], *shape), dtype=np.float32)
    # the box asked for (in the unpadded volume) where the windows' region covers it; windows reach beyond the box
    # but the result stays inside it
    inter = [slice(max(w.start, r.start), min(w.stop, r.stop)) for w, r in zip(want_p, region, strict=True)]
    if all(i.stop > i.start for i in inter):
        dst = tuple(slice(i.start - o, i.stop - o) for i, o in zip(inter, before, strict=True))
        src = tuple(slice(i.start - r.start, i.stop - r.start) for i, r in zip(inter, region, strict=True))
        out[(slice(None), *dst)] = probs[(slice(None), *src)]
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    from covidseg.checkpoint import unwrap_model

    return unwrap_model(model)


def _check_window(model: nn.Module, window: Sequence[int], spatial_dims: int) -> None:
    divisor = getattr(_unwrap(model), "size_divisor", None)
    if divisor is None:
        return
    div = (1, *divisor) if spatial_dims == 2 else tuple(divisor)
    if not fits(window, div):
        raise ConfigError(
            f"inference.window {format_size(window)} does not fit the model's poolings (each axis a "
            f"multiple of {format_size(div)}); use --set inference.window={format_size(fit_size(window, div))}"
        )


def inference_form(model: nn.Module, rt: RuntimeConfig, device: torch.device, dtype: torch.dtype,
                   memory_format: torch.memory_format) -> nn.Module:
    """The copy of a covidseg network that :func:`predict_volume` runs (:func:`covidseg.models.deploy.deploy_copy`)
    in ``dtype`` and ``memory_format``: on the CPU the form ``rt.cpu_kernels`` names, on a GPU the public form (the
    oneDNN form is CPU-only)."""
    kernels = rt.cpu_kernels if device.type == "cpu" else "public"
    return deploy_copy(model, dtype, memory_format == torch.channels_last_3d, kernels)


def _run_windows(
    model: nn.Module,
    sub: np.ndarray,
    sized: list[tuple[tuple[int, int, int], tuple[int, ...]]],
    cfg: InferenceConfig,
    dev: torch.device,
    spatial_dims: int,
    progress: bool,
    rt: RuntimeConfig,
) -> np.ndarray:
    """Blend the windows ``sized`` (``(start, size)`` each, ``(D, H, W)``) over ``sub`` (``(C, D, H, W)``);
    returns ``(K, D, H, W)``. Consecutive windows of one size are batched (up to ``rt.batch_windows``)."""
    importance_of: dict[tuple[int, ...], torch.Tensor] = {}
    weight_sum = torch.zeros(sub.shape[1:], dtype=torch.float32, device=dev)
    acc: torch.Tensor | None = None
    source = torch.from_numpy(np.ascontiguousarray(sub))
    native = not hasattr(model, "session")  # an ONNX Runtime model computes float32 in its own layout
    use_bf16 = native and bf16_enabled(rt.bf16, dev)
    memory_format = (torch.channels_last_3d if (native and rt.channels_last and spatial_dims == 3)
                     else torch.contiguous_format)
    input_dtype = torch.float32
    autocast: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if isinstance(model, UNet):  # its inference form: batch norm folded, weights in the compute dtype and layout
        input_dtype = torch.bfloat16 if use_bf16 else torch.float32
        model = inference_form(model, rt, dev, input_dtype, memory_format)
    elif use_bf16:  # any other module (a TorchScript export): bf16 by autocast
        autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    flips = _flip_sets(cfg.tta_axes if spatial_dims == 3 else [a for a in cfg.tta_axes if a != 0]) if cfg.tta \
        else [()]
    batches: list[list[tuple[tuple[int, int, int], tuple[int, ...]]]] = []
    for item in sized:
        if batches and batches[-1][0][1] == item[1] and len(batches[-1]) < max(int(rt.batch_windows), 1):
            batches[-1].append(item)
        else:
            batches.append([item])
    iterator: Iterator[list[tuple[tuple[int, int, int], tuple[int, ...]]]] | list[
        list[tuple[tuple[int, int, int], tuple[int, ...]]]] = batches
    if progress:
        from covidseg.progress import progress_bar

        iterator = progress_bar(batches, desc="windows", unit="batch", leave=False)
    with torch.inference_mode(), autocast:
        for batch in iterator:
            wd, wh, ww = batch[0][1]
            if batch[0][1] not in importance_of:
                importance_of[batch[0][1]] = torch.from_numpy(
                    gaussian_importance(batch[0][1], cfg.gaussian_sigma_scale)).to(dev)
            importance = importance_of[batch[0][1]]
            x = torch.stack([source[:, d : d + wd, h : h + wh, w : w + ww] for (d, h, w), _ in batch]).to(
                dev, input_dtype)
            if spatial_dims == 2:
                x = x[:, :, 0]  # (B, C, H, W)
            else:
                x = x.contiguous(memory_format=memory_format)  # (B, C, D, H, W)
            logit = None
            for dims in flips:
                xi = torch.flip(x, [d - (1 if spatial_dims == 2 else 0) for d in dims]) if dims else x
                logits = model(xi)
                if isinstance(logits, (list, tuple)):
                    logits = logits[0]
                p = logits.float()
                if dims:
                    p = torch.flip(p, [d - (1 if spatial_dims == 2 else 0) for d in dims])
                logit = p if logit is None else logit + p
            assert logit is not None
            if len(flips) > 1:
                logit = logit / len(flips)
            if spatial_dims == 2:
                logit = logit[:, :, None]  # (B, K, 1, H, W)
            if acc is None:
                acc = torch.zeros((logit.shape[1], *sub.shape[1:]), dtype=torch.float32, device=dev)
            logit.mul_(importance)  # (B, K, wd, wh, ww)
            for i, ((d, h, w), _) in enumerate(batch):
                acc[:, d : d + wd, h : h + wh, w : w + ww] += logit[i]
                weight_sum[d : d + wd, h : h + wh, w : w + ww] += importance
        if acc is None:  # no window at all (empty mask): nothing predicted
            k = int(getattr(getattr(model, "config", None), "out_channels", 1))
            return np.zeros((k, *sub.shape[1:]), dtype=np.float32)
        # dense operations over the region: boolean indexing of a CT-sized region is several times slower
        uncovered = weight_sum == 0  # only under skipped (mask-free) windows: nothing predicted there
        acc.div_(weight_sum.masked_fill_(uncovered, 1.0))
        torch.sigmoid_(acc)
        acc.masked_fill_(uncovered, 0.0)
    return acc.cpu().numpy()
