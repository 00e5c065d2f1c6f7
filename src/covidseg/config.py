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

# Hounsfield window of the radiopaedia cases (docs/method.md): [-1250, 250] HU stored as [0, 255].
HU_WINDOW: tuple[float, float] = (-1250.0, 250.0)


@dataclass(slots=True)
class IntensityConfig:
    """How CT intensities are mapped onto the network's [0, 1] scale (docs/method.md)."""

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


@dataclass(slots=True)
class ModelConfig:
    """The network family of docs/method.md; every row of the report's Tables 2 and 3 is a setting of it."""

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


@dataclass(slots=True)
class TrainConfig:
    """Training defaults of the report's Table 1 plus what it left open (documented in docs/training.md).

    Only what decides the trained weights: where and how fast a run computes is :class:`RuntimeConfig`.
    """

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
    seed: int = 0
    val_every: int = 1
    target_spacing: tuple[float, float, float] | None = None
    """Resample to this spacing in mm (D, H, W) before training; ``None`` keeps each scan's own spacing."""
    val_cases: int = 2
    """Cases held out of the training list for validation when the split has no ``val`` list (benchmark folds)."""


@dataclass(slots=True)
class InferenceConfig:
    """Sliding-window settings shared by validation, ``segment`` and the benchmarks: what decides the answer
    (window, overlap, blending, threshold, flips); where and how fast it is computed is :class:`RuntimeConfig`."""

    window: Triple = (8, 128, 128)
    """Window ``(D, H, W)``: by default the report's training patch, on MONAI's grid over the whole volume, so that
    inside the lungs the answer is that of a whole-volume sliding window (docs/performance.md)."""
    overlap: float = 0.25
    gaussian_sigma_scale: float = 0.125
    threshold: float = 0.5
    tta: bool = False
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


@dataclass(slots=True)
class LungConfig:
    """Classical (weight-free) lung extraction, stage 1 of ``segment`` (``covidseg.inference.lungs``)."""

    air_threshold_hu: float = -320.0
    """Air (lung, gas) is below this (HU)."""
    border_threshold_hu: float = -200.0
    """The lungs' outer border at full resolution: voxels of the border band below this (HU) are lung."""
    closing_radius_mm: float = 10.0
    """Per-slice closing radius that keeps dense sub-pleural consolidation inside the lung."""
    min_lung_volume_ml: float = 100.0
    """Smallest air region (mL) taken for a lung."""
    min_lung_part_ml: float = 5.0
    """Smallest piece of lung (mL) that the scan's first or last slice cuts off a lung and that is joined to it."""
    lung_gap_mm: float = 20.0
    """A lung-like region of a lung's size this close (mm) to a lung is a piece of it (a base cut off by a band of
    consolidation)."""
    work_spacing_mm: float = 1.5
    """Extraction runs on block means of about this voxel size (mm) and is refined at full resolution."""
    padding_floor_hu: float = -1024.0
    """Values below this (HU) count as air: the padding outside the scanner's field of view (-2048, -3024 HU)."""
    body_threshold_hu: float = -500.0
    """The body is tissue denser than this (HU); foam mattresses and vacuum bags are lighter."""
    body_spacing_mm: float = 3.0
    """In-plane pixel (mm) of the grid the body mask is found on."""
    body_opening_mm: float = 6.0
    """In-plane opening (mm) that takes the couch's shells, covers and blankets off the body."""
    airway_max_area_mm2: float = 600.0
    """Largest axial cross-section (mm^2) of the trachea / a main bronchus followed from the top slice."""
    airway_max_offset_mm: float = 30.0
    """Largest distance (mm) of the trachea's centre from the midline of the air inside the body."""
    airway_hu: float = -900.0
    """The airway tree is grown from the trachea through air darker than this (HU; lung is about -850 HU)."""
    airway_depth_mm: float = 120.0
    """How far below the tracked trachea (mm) the airway tree is grown (the main and lobar bronchi lie within)."""
    airway_max_ml: float = 200.0
    """A grown airway tree larger than this (mL) has leaked into the lung and is grown again, darker."""
    max_split_erosions: int = 10
    """Erosions tried to separate two touching lungs."""
    remove_basal_gas: bool = True
    """Remove pure-air regions at the lung bases (stomach and bowel gas) before picking the lungs."""
    gas_hu: float = -950.0
    """Below this (HU) a region is pure air rather than lung parenchyma (about -850 HU)."""
    min_gas_ml: float = 5.0
    """Smallest gas region removed (mL)."""
    gas_max_air_around: float = 0.5
    """A pure-air region at the bases with more than this share of air a few millimetres around it (per slice) lies in
    the lung (an emphysematous bulla), not in bowel or stomach: it is not removed as gas."""
    gas_median_hu: float = -960.0
    """An air region whose median (HU, on the work grid) is below this is gas (bowel, stomach, a couch's air), not
    lung: aerated lung is about -850 HU, -900 to -930 HU in severe emphysema."""
    opening_voxels: int = 1
    """3D opening (in work voxels) that breaks thin partial-volume bridges (diaphragm, bronchial walls)."""
    bilateral_share: float = 0.2
    """A component with more than this share of its voxels on each side of the midline holds both lungs."""
    min_z_overlap: float = 0.5
    """Share of slices a second component must share with the first to count as the other lung."""
    fill_concavities: bool = True
    """Fill convex-hull concavities of each lung slice, except the one facing the heart (sub-pleural lesions)."""
    concavities_beyond_hull: bool = True
    """A concavity may reach beyond the slice's convex hull to where the lung lies both above and below (within
    ``enclosure_mm``): a consolidation flattened along a convex chest wall lies partly outside the hull of the
    aerated lung its slice keeps."""
    split_concavities: bool = True
    """A concavity that is not filled as a whole (one opening medially, the heart's notch, too large) may still hold
    a part with lung both above and below it, judged on its own: a large lesion against the chest wall that
    reaches the hilum's or the heart's concavity in its slice and merges with it."""
    wall_closing_mm: float = 40.0
    """Radius (mm) of the ball of the 3D closing that puts back a large lesion bulging from the chest wall into its
    lung (:func:`~covidseg.inference.lung_fill.wall_bulges`); 0: off. A ball this large fits in the diaphragm's
    dome, a pleural effusion's layer and the heart, and cannot reach into the tip of a lesion of about its radius."""
    min_wall_opening: float = 0.3
    """Share of a region the 3D closing adds that must face tissue beyond the lung slice's convex hull (the chest
    wall) for it to be lung; the hilum and the heart's notch face tissue within the hull."""
    max_concavity_fraction: float = 0.25
    """Largest concavity filled, as a share of the lung slice's area (the diaphragm's dome is larger)."""
    max_hole_fraction: float = 0.1
    """Largest 2D hole filled, as a share of the lung slice's area, unless it is enclosed in 3D too (a larger one
    open in 3D is the diaphragm's dome inside the basal crescent)."""
    max_medial_cosine: float = 0.7
    """A concavity opening towards the mediastinum (cosine with the medial direction above this) is not filled."""
    enclosure_mm: float = 60.0
    """How far above and below (mm) a hole or bite of the lung is looked at: with lung on both sides it is a lesion
    inside the lung (filled at any size), with lung above only it is the diaphragm's dome."""
    cut_min_area_mm2: float = 200.0
    """Lung cross-section (mm^2) in the first or last slice from which the chest counts as cut at the base or apex."""
    min_full_lungs_ml: float = 1000.0
    """Below this total (mL) the lungs found are reported as a part of the chest or a sliver."""


@dataclass(slots=True)
class RuntimeConfig:
    """Where and how a run computes: device, precision, threads, memory layout, loader workers, cache.

    The one home of these settings for training, validation and ``segment``. Checkpoints do not keep them
    (:data:`KEPT_SECTIONS`): they change speed and memory, not the model or its data convention (bfloat16 and
    GPU kernels change the last bits of an answer, docs/performance.md).
    """

    device: str = "auto"
    """``auto``: the local rank's GPU when there is one, else the CPU; or ``cpu``, ``cuda``, ``cuda:N``. Under
    torchrun a bare ``cuda`` means ``cuda:LOCAL_RANK``."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Mixed precision of training steps: ``auto`` = bf16 on GPUs that have it, fp16 (with a grad scaler) on older
    GPUs, float32 on CPUs; ``bf16`` also on CPUs; ``fp16`` needs a CUDA GPU."""
    bf16: Literal["auto", "on", "off"] = "auto"
    """bfloat16 at inference (``segment``, validation): ``auto`` = on CPUs with AMX/AVX512-BF16 and on GPUs that
    have it; ``on``/``off`` force it."""
    threads: int = 0
    """Torch intra-op threads at inference (and ONNX Runtime's); 0 = all cores."""
    channels_last: bool = True
    """Inference weights and windows in ``channels_last_3d`` memory format (faster oneDNN convolutions on CPU)."""
    batch_windows: int = 2
    """Windows per network call at inference. 2 by default: in float32 torch runs 3D convolutions of a batch of 1
    with few channels through its slow im2col path instead of oneDNN (5x slower on the development CPU); bfloat16
    is the same speed with 1, 2 (docs/performance.md)."""
    cpu_kernels: Literal["public", "onednn"] = "public"
    """The network's inference form on the CPU (:func:`covidseg.models.deploy.deploy_copy`): ``public`` (folded
    batch norm, dtype, channels-last by torch's public modules) or ``onednn`` (also oneDNN's fused operators and the
    FV gates folded into the fusion convolution); a GPU always runs ``public``."""
    num_workers: int = 2
    """Patch-sampling worker processes of training (0 = patches are drawn in the training process)."""
    cache_dir: str | None = None
    """Folder of the preprocessed-case cache; ``None`` = ``$COVIDSEG_CACHE`` or ``~/.cache/covidseg/preprocessed``."""
    loader_benchmark_batches: int = 4
    """Batches drawn before training to measure and show the loader's own patches/s (0 = skip)."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (slower on GPU); CPU runs are reproducible without it."""
    sync_batchnorm: bool = True
    """Under DDP on GPUs, synchronise BatchNorm statistics across processes (torch has no CPU SyncBatchNorm)."""


@dataclass(slots=True)
class Config:
    """All settings of a run; ``covidseg`` writes the resolved one into every run folder.

    ``intensity``, ``model``, ``train``, ``inference`` and ``lungs`` describe the model and its data convention
    and are kept in checkpoints; ``runtime`` says where and how it runs and is not.
    """

    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    lungs: LungConfig = field(default_factory=LungConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


KEPT_SECTIONS = ("intensity", "model", "train", "inference", "lungs")
"""Sections a checkpoint keeps: the model and the data convention (``runtime`` is the running machine's)."""


# --------------------------------------------------------------------------------------------- 2D slices

SLICE_VARIANT = "unet-fv-paspp-ds-2d"
"""The report's final model, 2D twin: the default variant of the 2D slice training."""
SLICE_SIZE = (352, 352)
"""Slices are resized to 352x352 (H, W) pixels for training and prediction by default, Inf-Net's ``trainsize``."""


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the 2D slice augmentations (defaults after nnU-Net's 2D settings, milder)."""

    flip_h: float = 0.5
    """Probability of a left-right mirror."""
    flip_v: float = 0.5
    """Probability of an anterior-posterior mirror (nnU-Net mirrors every axis)."""
    p_affine: float = 0.8
    """Probability of a rotation + scaling."""
    rotate_deg: float = 20.0
    """Rotation drawn uniformly in [-rotate_deg, rotate_deg] degrees."""
    scale: tuple[float, float] = (0.8, 1.25)
    """Zoom factor drawn log-uniformly in this range (> 1 enlarges the content)."""
    p_intensity: float = 0.5
    """Probability of each intensity change (brightness, contrast, gamma), drawn independently."""
    brightness: float = 0.1
    """Additive shift drawn in [-brightness, brightness] (image scale [0, 1])."""
    contrast: tuple[float, float] = (0.75, 1.25)
    """Multiplicative contrast around the image mean."""
    gamma: tuple[float, float] = (0.7, 1.5)
    """Gamma exponent drawn log-uniformly in this range (applied on [0, 1])."""
    p_noise: float = 0.0
    """Probability of white Gaussian noise (a noisier scan: lower dose, sharper kernel); 0 = off, and nothing is
    drawn for it (the other draws stay those of a run without it)."""
    noise_std: tuple[float, float] = (0.0, 0.05)
    """Its standard deviation, drawn uniformly (image scale: 0.05 is about 68 HU in the window of the real-CT
    slices, 1,355 HU wide)."""
    p_kernel: float = 0.0
    """Probability of another reconstruction kernel, ``image + amount * (image - blur(image, sigma))``: sharper
    (``amount > 0``, edges and noise boosted, as a lung kernel) or softer (``amount < 0``); applied after the noise,
    so that the noise is shaped by it as a kernel shapes it. 0 = off, nothing drawn."""
    kernel_amount: tuple[float, float] = (-0.6, 3.0)
    """``amount``, drawn uniformly."""
    kernel_sigma: tuple[float, float] = (0.5, 1.0)
    """The Gaussian's sigma in pixels of the training size, drawn uniformly."""


FLIP_TTA: dict[str, tuple[tuple[int, ...], ...]] = {"off": (), "lr": ((-1,),), "all": ((-1,), (-2,), (-2, -1))}
"""The mirrored copies a slice model's test-time augmentation averages with the slice itself, as tensor dims of a
``(B, C, H, W)`` batch: ``lr`` the image's left-right mirror (its columns reversed; in the training slices' layout
the patient's anterior-posterior axis, docs/slices.md), ``all`` also its top-bottom mirror (its rows reversed: the
patient's left-right axis) and both, as nnU-Net mirrors along every axis it trained with mirroring."""


def flip_tta_name(value: object) -> str:
    """The :data:`FLIP_TTA` name of a ``flip_tta`` setting (see :func:`flip_tta_dims`)."""
    dims = flip_tta_dims(value)
    return next(name for name, d in FLIP_TTA.items() if d == dims)


def flip_tta_dims(value: object) -> tuple[tuple[int, ...], ...]:
    """The flips of a ``flip_tta`` setting: a :data:`FLIP_TTA` name, or a bool as older runs and checkpoints wrote
    it (``True`` = ``lr``, ``False`` / ``None`` = ``off``).

    Raises:
        ConfigError: any other value.
    """
    if value is None or value is False:
        return ()
    if value is True:
        return FLIP_TTA["lr"]
    if isinstance(value, str) and value in FLIP_TTA:
        return FLIP_TTA[value]
    raise ConfigError(f"flip_tta {value!r}: expected one of {', '.join(FLIP_TTA)}")


@dataclass
class SemisegConfig:
    """Settings of a 2D slice training run (``covidseg semiseg train``, ``benchmarks/semiseg_cv.py``), written into
    every run folder and 2D checkpoint (``meta["semiseg"]``). The 3D :class:`Config` does not apply to it."""

    variant: str = SLICE_VARIANT
    """A 2D variant of :data:`covidseg.models.registry.MODELS` (``*-2d``)."""
    size: tuple[int, int] = SLICE_SIZE
    """Training and prediction size (H, W) in pixels; each a multiple of 2^depth."""
    base_width: int = 16
    depth: int = 4
    epochs: int = 150
    """One epoch = ``n_train // batch_size`` batches (every slice seen about once)."""
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    poly_lr: bool = True
    """Polynomial decay ``lr * (1 - step / steps)^0.9``; off = constant learning rate (the report's)."""
    bce_weight: float = 0.5
    dice_weight: float = 1.0
    batch_dice: bool = True
    """The soft Dice of the loss over the whole batch (the report's loss, nnU-Net's ``batch_dice``) or, ``False``, one
    Dice per slice averaged over the batch (MONAI's ``DiceLoss(batch=False)``), as Inf-Net's mean Dice scores a
    model. The labelled stage's; :attr:`pretrain_batch_dice` is the pseudo-label stage's."""
    loss: Literal["bce-dice", "structure"] = "bce-dice"
    """The labelled stage's loss per head: ``bce-dice`` the report's ``bce_weight * BCE + dice_weight * Dice``,
    ``structure`` Inf-Net's border-weighted BCE + IoU per slice (:class:`covidseg.losses.StructureLoss`; the two
    weights and :attr:`batch_dice` do not apply). The pseudo-label stage always trains with ``bce-dice``."""
    folds: int = 5
    seed: int = 0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Mixed precision, :func:`covidseg.runtime.autocast_dtype`: ``auto`` = bf16 on CUDA GPUs that have it, fp16 on
    older ones, off on the CPU."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pretrain_epochs: int = 0
    """Epochs on the pseudo-labelled slices alone before training on the labelled ones (0 = no such stage)."""
    pretrain_lr: float = 1e-3
    """Peak learning rate of the pseudo-label stage (same polynomial decay)."""
    pretrain_batch_dice: bool = True
    """:attr:`batch_dice` of the pseudo-label stage."""
    pretrain_size: tuple[int, int] | None = None
    """Size (H, W) of the pseudo-label stage when it differs from ``size``: that long stage at a lower resolution
    (cheaper per step), the labelled stage and prediction at ``size`` (progressive resizing; the network is fully
    convolutional). ``None`` = ``size``."""
    pseudo_per_batch: int = 0
    """Pseudo-labelled slices mixed into every batch of the labelled stage (the rest of ``batch_size`` is
    labelled slices); 0 = labelled slices only."""
    flip_tta: str = "off"
    """Test-time mirroring of prediction (:data:`FLIP_TTA`): ``off``, ``lr`` (the slice and its left-right mirror)
    or ``all`` (also the top-bottom mirror and both: every mirroring the training's flips draw; the shipped
    model's setting). A prediction setting: a training state resumes under another one."""
    threshold: float = 0.5
    """Probability at or above which a pixel is infection (the binary masks; Inf-Net's mean Dice sweeps it)."""
    scales: tuple[float, ...] = (1.0,)
    """Multi-scale training of the labelled stage (Inf-Net's ``size_rates`` 0.75 / 1 / 1.25): each augmented batch
    is resized by one of these factors, drawn at random (sides rounded to multiples of 2^depth); prediction stays
    at ``size``. ``(1.0,)`` = every batch at ``size``."""
    soup: int = 1
    """The labelled stage trains this many models from the same start (member ``j`` with seed ``seed + 1000 j``)
    and averages their weights and batch-norm buffers into one model (a uniform "model soup", Wortsman et al.,
    ICML 2022): one network at prediction, ``soup`` times the training. 1 = one model."""
    ema_decay: float = 0.0
    """The labelled stage ends with an exponential moving average of its weights and batch-norm buffers, updated
    after every step with this decay (``torch.optim.swa_utils``); 0 = the last step's weights."""

    relabel: int = 0
    """Rounds of self-training of the labelled stage: after it, its model relabels the pseudo-labelled slices (its
    probability, :attr:`flip_tta` mirrors averaged in, at or above :attr:`threshold`) and the stage is trained
    again from the same start, with the same seed, on those labels instead of the given ones; 0 = the given labels
    only. A state saved during round ``r`` holds ``relabel = r`` (round 0 is a run without self-training)."""

    PREDICTION_KEYS: typing.ClassVar[tuple[str, ...]] = ("flip_tta", "threshold")
    """Settings of prediction only: a training state saved under other values of them still resumes."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) for JSON and checkpoints."""
        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return list(v)
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        return plain(dataclasses.asdict(self))


# --------------------------------------------------------------------------------------------- old keys

LEGACY_KEYS: dict[str, str] = {
    "train.device": "runtime.device",
    "inference.device": "runtime.device",
    "train.amp": "runtime.amp",
    "inference.bf16": "runtime.bf16",
    "inference.threads": "runtime.threads",
    "inference.channels_last": "runtime.channels_last",
    "inference.batch_windows": "runtime.batch_windows",
    "train.num_workers": "runtime.num_workers",
    "train.cache_dir": "runtime.cache_dir",
    "train.loader_benchmark_batches": "runtime.loader_benchmark_batches",
    "train.deterministic": "runtime.deterministic",
    "train.sync_batchnorm": "runtime.sync_batchnorm",
}
"""Keys of the old layout (runtime settings inside ``train`` and ``inference``) -> their home now. Old YAML files, ``--set`` items,
run folders' ``config.yaml`` and checkpoints keep loading through :func:`upgrade_keys`."""

LEGACY_DEFAULTS: dict[str, Any] = {"train.device": "auto", "inference.device": "cpu"}
"""Old defaults of the two keys that became ``runtime.device`` (every old resolved config holds both)."""


def upgrade_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a nested config mapping) with the keys of :data:`LEGACY_KEYS` moved to their new home.

    A new key given in the same mapping wins over an old one. Where two old keys share one new key
    (``train.device`` and ``inference.device``), the first whose value differs from its old default wins
    (``train.device`` first), else the first given: so an old resolved config, which holds both at their defaults,
    gets the new default, and ``--set inference.device=cpu`` alone still means the CPU.
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    moved: dict[str, list[tuple[str, Any]]] = {}
    for old, new in LEGACY_KEYS.items():
        section, key = old.split(".")
        node = out.get(section)
        if isinstance(node, dict) and key in node:
            moved.setdefault(new, []).append((old, node.pop(key)))
    for new, values in moved.items():
        section, key = new.split(".")
        node = out.setdefault(section, {})
        if not isinstance(node, dict) or key in node:
            continue  # a malformed section is reported by the strict reader; a new key wins
        changed = [v for old, v in values if old not in LEGACY_DEFAULTS or v != LEGACY_DEFAULTS[old]]
        node[key] = (changed or [values[0][1]])[0]
    return out


# --------------------------------------------------------------------------------------------- conversion

_BOOL_SPELLINGS: tuple[tuple[str, str], ...] = (("on", "off"), ("true", "false"), ("yes", "no"))
"""Words a YAML boolean may stand for in a Literal of strings (``--set runtime.bf16=off``)."""


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
    """Build a :class:`Config` from a nested mapping, strictly (unknown keys and wrong types are errors); old
    keys are read at their new place (:func:`upgrade_keys`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    return _from_dict(Config, upgrade_keys(data), "", dataclasses.replace(base) if base else None)


def config_to_dict(config: Any, runtime: bool = True) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON; ``runtime=False`` keeps only :data:`KEPT_SECTIONS`
    (what a checkpoint stores, what tells two models apart)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    out = plain(dataclasses.asdict(config))
    if not runtime and isinstance(config, Config):
        out = {k: v for k, v in out.items() if k in KEPT_SECTIONS}
    return out


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


PRESET_DIR = "configs"
"""Folder of the packaged presets inside the ``covidseg`` package (``covidseg/configs/NAME.yaml``)."""


def preset_names() -> list[str]:
    """Names of the packaged presets (``report``, ``demo``, ``2d``...), which ``--config NAME`` takes."""
    from importlib.resources import files

    folder = files("covidseg").joinpath(PRESET_DIR)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _config_text(source: Path | str) -> tuple[str, str]:
    """``(YAML text, name for messages)`` of a config file, or else of the preset named ``source``."""
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    name = str(source)
    if name in preset_names():
        from importlib.resources import files

        return files("covidseg").joinpath(PRESET_DIR, f"{name}.yaml").read_text(encoding="utf-8"), f"preset {name!r}"
    raise ConfigError(f"{source}: config file not found and not a preset; give an existing YAML file or a preset "
                      f"name ({', '.join(preset_names())})")


def load_config(
    path: Path | str | None = None, overrides: list[str] | None = None, base: Config | None = None
) -> Config:
    """Defaults, then a YAML file or packaged preset ``path`` (only what differs), then ``--set key=value`` items.

    Args:
        path: a YAML file, or the name of a preset in ``covidseg/configs`` (:func:`preset_names`); a file of that
            name wins.
        overrides: ``section.key=value`` items, applied last.
        base: start from this config instead of the defaults.
    """
    config = _deep_copy(base) if base else Config()
    if path is not None:
        text, where = _config_text(path)
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
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
