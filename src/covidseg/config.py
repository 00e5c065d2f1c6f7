"""Typed configuration: dataclasses with the report's defaults, small YAML files holding only what differs.

Axis order: every spatial tuple here is ``(D, H, W)`` = (slices, rows, columns), the order of the tensors
(``(B, C, D, H, W)``) and of the canonical arrays (see :mod:`covidseg.io.image`). The report's "128x128x8 patch"
is therefore ``(8, 128, 128)``.

Unknown keys and values of the wrong type raise :class:`~covidseg.errors.ConfigError` naming the key, the
value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from covidseg.errors import ConfigError

Triple = tuple[int, int, int]

# Hounsfield window of the radiopaedia cases (METHOD.md §2): [-1250, 250] HU stored as [0, 255].
HU_WINDOW: tuple[float, float] = (-1250.0, 250.0)


@dataclass
class IntensityConfig:
    """How CT intensities are mapped onto the network's [0, 1] scale (METHOD.md §2)."""

    convention: Literal["auto", "hu", "windowed"] = "auto"
    """``hu``: Hounsfield units; ``windowed``: already windowed to ``window_hu`` and stored as ``windowed_range``;
    ``auto``: detect per case."""
    window_hu: tuple[float, float] = HU_WINDOW
    """HU window mapped onto [0, 1] (values outside are clipped)."""
    windowed_range: tuple[float, float] = (0.0, 255.0)
    """Stored range of a pre-windowed volume."""
    outside_lung_value: float = 0.0
    """Normalised value written outside the lung mask for the "lung only" input (0 = the window's bottom)."""
    windowed_source_hu: tuple[float, float] = HU_WINDOW
    """HU window a pre-windowed volume was made with (``windowed_range`` maps onto it; radiopaedia: [-1250, 250])."""
    air_hu: float = -500.0
    """Auto-detection: a volume whose minimum is below this (HU) holds air, so it is in Hounsfield units."""
    max_hu: float = 32767.0
    """Auto-detection: values above this are not CT (Hounsfield units stop at about 3071; metal may saturate)."""


@dataclass
class ModelConfig:
    """The network family of METHOD.md §1; every row of the report's Tables 2 and 3 is a setting of it."""

    name: str = "unet-fv-paspp-ds"
    """Variant name from :data:`covidseg.models.registry.MODELS`. The variant decides ``spatial_dims``, ``fv``,
    ``paspp`` and ``deep_supervision``; the other fields apply as given; use ``custom`` to set the switches
    yourself."""
    spatial_dims: Literal[2, 3] = 3
    in_channels: int = 1
    out_channels: int = 1
    base_width: int = 16
    """Channels of the first level; doubled at each level below."""
    depth: int = 4
    """Number of poolings (levels - 1)."""
    slice_poolings: int = 2
    """How many of the poolings also halve the slice axis (anisotropic pooling; 3D only)."""
    fv: Literal["none", "se", "ce"] = "se"
    paspp: bool = True
    deep_supervision: bool = True
    se_reduction: int = 2


@dataclass
class TrainConfig:
    """Training defaults of the report's Table 1 plus what it left open (documented in docs/training.md)."""

    target: Literal["infection", "lung", "joint"] = "infection"
    input: Literal["lung_only", "original"] = "lung_only"
    patch_size: Triple = (8, 128, 128)
    batch_size: int = 5
    learning_rate: float = 1e-4
    epochs: int = 200
    patches_per_epoch: int = 250
    foreground_fraction: float = 0.33
    """Share of patches centred on a foreground voxel (nnU-Net draws a third)."""
    bce_weight: float = 0.5
    dice_weight: float = 1.0
    num_workers: int = 2
    seed: int = 0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Mixed precision: ``auto`` = bf16 on GPUs that have it, fp16 on older GPUs, off on CPU."""
    val_every: int = 1
    target_spacing: tuple[float, float, float] | None = None
    """Resample to this spacing in mm (D, H, W) before training; ``None`` keeps each scan's own spacing."""
    val_cases: int = 2
    """Cases held out of the training list for validation when the split has no ``val`` list (benchmark folds)."""
    cache_dir: str | None = None
    """Folder of the preprocessed-case cache; ``None`` = ``$COVIDSEG_CACHE`` or ``~/.cache/covidseg/preprocessed``."""
    loader_benchmark_batches: int = 4
    """Batches drawn before training to measure and show the loader's own patches/s (0 = skip)."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (slower on GPU); CPU runs are reproducible without it."""
    device: str = "auto"
    """``auto`` (the local rank's GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    sync_batchnorm: bool = True
    """Under DDP on GPUs, synchronise BatchNorm statistics across processes (torch has no CPU SyncBatchNorm)."""


@dataclass
class InferenceConfig:
    """Sliding-window inference settings shared by validation, ``segment`` and the benchmarks."""

    window: Triple = (8, 128, 128)
    """Window ``(D, H, W)``: by default the report's training patch, on MONAI's grid over the whole volume, so that
    inside the lungs the answer is that of a whole-volume sliding window (docs/performance.md)."""
    overlap: float = 0.25
    batch_windows: int = 2
    """Windows per network call. 2 by default: in float32 torch runs 3D convolutions of a batch of 1 with few
    channels through its slow im2col path instead of oneDNN (5x slower on the development CPU); bfloat16 is the
    same speed with 1, 2 (docs/performance.md)."""
    gaussian_sigma_scale: float = 0.125
    threshold: float = 0.5
    tta: bool = False
    device: str = "cpu"
    bf16: Literal["auto", "on", "off"] = "auto"
    """bfloat16 on CPUs with AMX/AVX512-BF16 and on GPUs that have it (``auto``), or forced (``on``/``off``)."""
    threads: int = 0
    """Torch intra-op threads; 0 = all cores."""
    channels_last: bool = True
    """Weights and windows in ``channels_last_3d`` memory format (faster oneDNN convolutions on CPU)."""
    cpu_kernels: Literal["public", "onednn"] = "public"
    """The network's inference form on the CPU (:func:`covidseg.models.deploy.deploy_copy`): ``public`` (folded
    batch norm, dtype, channels-last by torch's public modules) or ``onednn`` (also oneDNN's fused operators and the
    FV gates folded into the fusion convolution); a GPU always runs ``public``."""
    tta_axes: tuple[int, ...] = (0, 1, 2)
    """Spatial axes ``(D, H, W)`` = ``(0, 1, 2)`` whose flips (every combination, as nnU-Net's mirroring) are
    averaged when ``tta`` is on."""
    box_margin_mm: float = 10.0
    """Margin around the lungs' bounding box over which windows run, in mm."""
    overlap_axes: tuple[float, float, float] | None = None
    """Overlap per axis ``(D, H, W)``, replacing ``overlap`` (e.g. less overlap in-plane with large windows)."""


REMOVED_KEYS: dict[str, tuple[object, str]] = {
    "inference.grid": ("volume", "windows always lie on MONAI's grid over the whole volume"),
    "inference.fit_window": (False, "windows always have the size of inference.window"),
}
"""Keys that configs, run folders and checkpoints written by older versions may hold: their old default is ignored,
any other value is a :class:`~covidseg.errors.ConfigError` that says what replaced it."""


@dataclass
class LungConfig:
    """Classical (weight-free) lung extraction, stage 1 of ``segment``."""

    air_threshold_hu: float = -320.0
    closing_radius_mm: float = 10.0
    """Per-slice closing radius that keeps dense sub-pleural consolidation inside the lung."""
    min_lung_volume_ml: float = 100.0
    work_spacing_mm: float = 1.5
    """Extraction runs on block means of about this voxel size (mm) and is refined at full resolution."""
    airway_max_area_mm2: float = 600.0
    """Largest axial cross-section (mm^2) of the trachea / a main bronchus followed from the top slice."""
    airway_max_offset_mm: float = 30.0
    """Largest distance (mm) of the trachea's centre from the midline of the air inside the body."""
    max_split_erosions: int = 10
    remove_basal_gas: bool = True
    """Remove pure-air regions at the lung bases (stomach and bowel gas) before picking the lungs."""
    gas_hu: float = -950.0
    """Below this (HU) a region is pure air rather than lung parenchyma (about -850 HU)."""
    min_gas_ml: float = 5.0
    """Smallest gas region removed (mL)."""
    opening_voxels: int = 1
    """3D opening (in work voxels) that breaks thin partial-volume bridges (diaphragm, bronchial walls)."""
    bilateral_share: float = 0.2
    """A component with more than this share of its voxels on each side of the midline holds both lungs."""
    min_z_overlap: float = 0.5
    """Share of slices a second component must share with the first to count as the other lung."""
    """Erosions tried to separate two touching lungs."""
    fill_concavities: bool = True
    """Fill convex-hull concavities of each lung slice, except the one facing the heart (sub-pleural lesions)."""
    max_concavity_fraction: float = 0.25
    """Largest concavity filled, as a share of the lung slice's area (the diaphragm's dome is larger)."""
    max_hole_fraction: float = 0.1
    """Largest 2D hole filled, as a share of the lung slice's area, unless it is enclosed in 3D too (a larger one
    open in 3D is the diaphragm's dome inside the basal crescent)."""
    max_medial_cosine: float = 0.7
    """A concavity opening towards the mediastinum (cosine with the medial direction above this) is not filled."""


@dataclass
class Config:
    """All settings of a run; ``covidseg`` writes the resolved one into every run folder."""

    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    lungs: LungConfig = field(default_factory=LungConfig)


# --------------------------------------------------------------------------------------------- conversion

_BOOL_SPELLINGS: tuple[tuple[str, str], ...] = (("on", "off"), ("true", "false"), ("yes", "no"))
"""Words a YAML boolean may stand for in a Literal of strings (``--set inference.bf16=off``)."""


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to the type ``hint``, or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key '{key}': invalid value {value!r}")
    if origin is Literal:
        if isinstance(value, bool):
            # YAML reads bare on/off, yes/no, true/false as booleans: map back to the spelling the Literal has
            for yes, no in _BOOL_SPELLINGS:
                word = yes if value else no
                if word in args:
                    return word
        else:
            for choice in args:
                if value == choice or str(value) == str(choice):
                    return choice
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, args))}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list like [8, 128, 128], got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_convert(v, a, key) for v, a in zip(value, args, strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected text, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}': unsupported type {hint!r}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str, base: Any | None = None) -> Any:
    obj = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in REMOVED_KEYS:
            _check_removed(full, value)
            continue
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(sorted(names))}")
        hint = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give it as a mapping, got {value!r}")
            setattr(obj, key, _from_dict(type(current), value, f"{full}.", current))
        else:
            setattr(obj, key, _convert(value, hint, full))
    return obj


def _check_removed(key: str, value: Any) -> None:
    default, now = REMOVED_KEYS[key]
    if value != default and str(value).lower() != str(default).lower():
        raise ConfigError(f"config key '{key}' ({value!r}) was removed: {now}; delete it from the config")


def config_from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Build a :class:`Config` from a nested mapping, strictly (unknown keys and wrong types are errors)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    return _from_dict(Config, data, "", dataclasses.replace(base) if base else None)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=5", "model.fv=ce"]`` into a nested mapping (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(path: Path | None = None, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    """Defaults, then the YAML file ``path`` (only what differs), then ``--set key=value`` overrides."""
    config = dataclasses.replace(base) if base else Config()
    config = _deep_copy(config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found; give an existing YAML file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
        config = config_from_dict(data, config)
    if overrides:
        config = config_from_dict(parse_overrides(overrides), config)
    return config


def _deep_copy(config: Config) -> Config:
    return config_from_dict(config_to_dict(config), Config())


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from covidseg.io.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(config), sort_keys=False))
