"""The preprocessed-case cache: every case is read, oriented, normalised and cropped once.

A cached case is a folder ``<root>/<case_id>-<key>/`` holding

* ``image.npy``: the canonical ``(D, H, W)`` CT normalised to [0, 1] over [-1250, 250] HU with
  :func:`covidseg.intensity.normalize` (either storage convention), cropped to the body, **float16**;
* ``lung.npy``: uint8 lung labels (0 background, 1 left, 2 right) on the same grid;
* ``infection.npy``: uint8 infection mask (0/1);
* ``fg_lung.npy``, ``fg_infection.npy``: int32 ``(N, 3)`` voxel coordinates of foreground (at most
  :data:`MAX_FOREGROUND_COORDS`, evenly subsampled), so that the sampler never scans a volume;
* ``meta.json``: spacing (mm, ``(D, H, W)``), the crop box in the canonical grid, the file's own shape (the
  "resolution" of the report's Table 4), the intensity convention found, and the source.

The key hashes the input files' paths, sizes and modification times together with every preprocessing setting
(:class:`~covidseg.config.IntensityConfig`, ``target_spacing``, the body threshold and margins, the cache format
version), so a changed file or setting makes a new entry and a stale one is never read. Entries are written to a
temporary folder and renamed into place, so an interrupted run never leaves a half-written entry that looks
complete. Later epochs read only these ``.npy`` files (memory-mapped), never NIfTI.

The "lung only" input is *not* baked into the cache: it is applied on the fly with
:func:`covidseg.intensity.lung_only` (the same function ``segment`` uses), so one cache serves both inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covidseg.config import IntensityConfig, config_to_dict
from covidseg.errors import InputError

CACHE_VERSION = 1
"""Bumped whenever the stored layout or the preprocessing changes."""
BODY_THRESHOLD_HU = -500.0
"""Voxels above this (HU) count as body when cropping away the air around the patient."""
CROP_MARGIN_VOXELS = (2, 8, 8)
"""Voxels kept around the body's bounding box, ``(D, H, W)``."""
MAX_FOREGROUND_COORDS = 50_000
"""At most this many foreground coordinates are kept per mask for the sampler."""
ENV_CACHE = "COVIDSEG_CACHE"
"""Environment variable naming the cache root."""
LABEL_LEFT, LABEL_RIGHT, LABEL_INFECTION_JOINT = 1, 2, 3
"""Labels of ``Lung_and_Infection_Mask`` (docs/method.md)."""


def default_cache_root(cache_dir: str | None = None) -> Path:
    """``cache_dir``, else ``$COVIDSEG_CACHE``, else ``~/.cache/covidseg/preprocessed``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "covidseg" / "preprocessed"


@dataclasses.dataclass(frozen=True)
class CachedCase:
    """One preprocessed case on disk (see the module docstring for the files)."""

    case_id: str
    folder: Path
    spacing: tuple[float, float, float]
    """Voxel size in mm, ``(D, H, W)`` (after resampling when a target spacing was set)."""
    shape: tuple[int, int, int]
    """Shape of the cropped arrays, ``(D, H, W)``."""
    original_shape: tuple[int, ...]
    """The CT file's own array shape, as nibabel reports it (e.g. ``(512, 512, 301)``)."""
    crop: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    """``(start, stop)`` per axis of the crop in the canonical (resampled) grid."""
    convention: str
    source: str

    def _load(self, name: str, mmap: bool) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", mmap_mode="r" if mmap else None)

    def image(self, mmap: bool = True) -> np.ndarray:
        """Normalised CT, ``(D, H, W)`` float16 in [0, 1]."""
        return self._load("image", mmap)

    def lung(self, mmap: bool = True) -> np.ndarray:
        """Lung labels, ``(D, H, W)`` uint8 (0, 1 left, 2 right)."""
        return self._load("lung", mmap)

    def infection(self, mmap: bool = True) -> np.ndarray:
        """Infection mask, ``(D, H, W)`` uint8 (0/1)."""
        return self._load("infection", mmap)

    def foreground(self, kind: str) -> np.ndarray:
        """``(N, 3)`` int32 voxel coordinates of ``kind`` (``"lung"`` or ``"infection"``) foreground."""
        return np.load(self.folder / f"fg_{kind}.npy")


def _file_stamp(path: Path | None) -> list[Any] | None:
    if path is None:
        return None
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise InputError(f"{path}: cannot read this file of the dataset; check that it exists") from None
    if path.is_dir():  # a DICOM series: stamp every file in it
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def case_key(case: Any, intensity: IntensityConfig, target_spacing: Sequence[float] | None) -> str:
    """Hex key of a case's files (path, size, mtime) and every preprocessing setting."""
    payload = {
        "version": CACHE_VERSION,
        "ct": _file_stamp(case.ct),
        "lung": _file_stamp(case.lung),
        "infection": _file_stamp(case.infection),
        "lung_and_infection": _file_stamp(case.lung_and_infection),
        "intensity": config_to_dict(intensity),
        "target_spacing": list(target_spacing) if target_spacing else None,
        "body_threshold_hu": BODY_THRESHOLD_HU,
        "crop_margin": list(CROP_MARGIN_VOXELS),
        "max_fg": MAX_FOREGROUND_COORDS,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _labels(case: Any, like: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(lung, infection)`` uint8 canonical masks from whichever mask files the case has."""
    from scipy import ndimage

    from covidseg.data.check import EXPECTED_LABELS
    from covidseg.io.image import read_mask

    # labels outside the dataset's sets are refused (InputError naming the file), never silently dropped
    joint = read_mask(case.lung_and_infection, like=like, labels=EXPECTED_LABELS["lung_and_infection"]) \
        if case.lung_and_infection else None
    if case.infection is not None:
        infection = (read_mask(case.infection, like=like, labels=EXPECTED_LABELS["infection"]) > 0).astype(np.uint8)
    elif joint is not None:
        infection = (joint == LABEL_INFECTION_JOINT).astype(np.uint8)
    else:
        infection = np.zeros(like.array.shape, np.uint8)
    if case.lung is not None:
        lung = read_mask(case.lung, like=like, labels=EXPECTED_LABELS["lung"]).astype(np.uint8)
    elif joint is not None:
        lung = np.where(joint == LABEL_INFECTION_JOINT, 0, joint).astype(np.uint8)
        hole = joint == LABEL_INFECTION_JOINT
        if hole.any() and (lung > 0).any():
            # infection voxels belong to a lung too: give each the label of the nearest lung voxel
            _, idx = ndimage.distance_transform_edt(lung == 0, return_indices=True)
            lung[hole] = lung[tuple(i[hole] for i in idx)]
    else:
        lung = np.zeros(like.array.shape, np.uint8)
    return lung, infection


def _resample(array: np.ndarray, spacing: Sequence[float], target: Sequence[float], order: int) -> np.ndarray:
    from scipy import ndimage

    factors = [s / t for s, t in zip(spacing, target, strict=True)]
    return ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)


def _body_box(image: np.ndarray, labels: Sequence[np.ndarray], threshold: float) -> tuple[tuple[int, int], ...]:
    """Bounding box of the body (``image > threshold``) and every label, with :data:`CROP_MARGIN_VOXELS`."""
    keep = image > threshold
    for lab in labels:
        keep |= lab > 0
    if not keep.any():
        return tuple((0, n) for n in image.shape)
    coords = [np.flatnonzero(keep.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(
        (max(int(c[0]) - m, 0), min(int(c[-1]) + 1 + m, n))
        for c, m, n in zip(coords, CROP_MARGIN_VOXELS, image.shape, strict=True)
    )


def _subsample_coords(mask: np.ndarray) -> np.ndarray:
    coords = np.argwhere(mask).astype(np.int32)
    if len(coords) > MAX_FOREGROUND_COORDS:
        coords = coords[np.linspace(0, len(coords) - 1, MAX_FOREGROUND_COORDS).astype(np.int64)]
    return coords


def _save_npy(folder: Path, name: str, array: np.ndarray) -> None:
    np.save(folder / f"{name}.npy", np.ascontiguousarray(array))


def _load_entry(case_id: str, folder: Path) -> CachedCase:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    return CachedCase(
        case_id=case_id,
        folder=folder,
        spacing=tuple(meta["spacing"]),  # type: ignore[arg-type]
        shape=tuple(meta["shape"]),  # type: ignore[arg-type]
        original_shape=tuple(meta["original_shape"]),
        crop=tuple(tuple(c) for c in meta["crop"]),  # type: ignore[arg-type]
        convention=meta["convention"],
        source=meta["source"],
    )


def prepare_case(
    case: Any,
    root: Path,
    intensity: IntensityConfig,
    target_spacing: Sequence[float] | None = None,
) -> CachedCase:
    """Return the cached entry of ``case``, building it first when missing (the only place NIfTI is read).

    Args:
        case: a :class:`covidseg.data.layouts.Case`.
        root: cache root folder (created).
        intensity: the intensity mapping (part of the key).
        target_spacing: resample to this voxel size in mm ``(D, H, W)`` (linear for the CT, nearest for labels);
            ``None`` keeps the scan's spacing.
    """
    from covidseg.intensity import detect_convention, normalize
    from covidseg.io.image import read_image

    key = case_key(case, intensity, target_spacing)
    folder = Path(root) / f"{case.case_id}-{key}"
    if (folder / "meta.json").is_file():
        return _load_entry(case.case_id, folder)
    ct = read_image(case.ct)
    convention = intensity.convention if intensity.convention != "auto" else detect_convention(ct.array)
    image = normalize(ct.array, intensity, convention=convention).astype(np.float32)
    lung, infection = _labels(case, ct)
    spacing = tuple(float(s) for s in ct.spacing)
    if target_spacing:
        image = _resample(image, spacing, target_spacing, order=1)
        lung = _resample(lung, spacing, target_spacing, order=0)
        infection = _resample(infection, spacing, target_spacing, order=0)
        spacing = tuple(float(s) for s in target_spacing)
    lo, hi = intensity.window_hu
    box = _body_box(image, (lung, infection), (BODY_THRESHOLD_HU - lo) / (hi - lo))
    sl = tuple(slice(a, b) for a, b in box)
    image, lung, infection = image[sl], lung[sl], infection[sl]

    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{case.case_id}-{key}.", dir=root))
    try:
        _save_npy(tmp, "image", image.astype(np.float16))
        _save_npy(tmp, "lung", lung.astype(np.uint8))
        _save_npy(tmp, "infection", infection.astype(np.uint8))
        _save_npy(tmp, "fg_lung", _subsample_coords(lung > 0))
        _save_npy(tmp, "fg_infection", _subsample_coords(infection > 0))
        meta = {
            "case_id": case.case_id,
            "spacing": list(spacing),
            "shape": list(image.shape),
            "original_shape": [int(n) for n in ct.original_shape],
            "crop": [list(b) for b in box],
            "convention": str(convention),
            "source": str(getattr(case, "source", "other")),
            "ct": str(case.ct),
            "cache_version": CACHE_VERSION,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (DDP rank, parallel run) finished the same entry first
            if not (folder / "meta.json").is_file():
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return _load_entry(case.case_id, folder)


def prepare_cases(
    cases: Sequence[Any],
    root: Path,
    intensity: IntensityConfig,
    target_spacing: Sequence[float] | None = None,
    progress: bool = True,
) -> list[CachedCase]:
    """:func:`prepare_case` for every case, with a progress bar while anything is being built."""
    from covidseg.progress import progress_bar

    out = []
    bar = progress_bar(cases, desc="cache", unit="case", disable=not progress, leave=False)
    for case in bar:
        bar.set_postfix_str(case.case_id)
        out.append(prepare_case(case, root, intensity, target_spacing))
    return out
