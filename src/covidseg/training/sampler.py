"""Patch sampling: a seeded, index-addressed patch stream read from the cache in worker processes.

Every patch is a pure function of ``(seed, global index)``: patch ``j`` of step ``s`` has index ``s * B + j``
(``B`` = the global batch) and draws everything (case, foreground or not, position) from
``numpy.random.default_rng([seed, index])``. Hence the same seed gives the same patches whatever the number of
worker processes, a resumed run continues the stream exactly where the checkpoint left it, and DDP ranks share one
stream: rank ``r`` of ``W`` takes rows ``j`` with ``j % W == r`` of every global batch
(:class:`StepBatchSampler`).

Foreground share (the report does not say; nnU-Net's habit): the last ``round(foreground_fraction * B)`` rows of
every global batch are centred on a random foreground voxel of the target (infection for ``infection``, the lungs
for ``lung`` and ``joint``), the rest anywhere in the (body-cropped) volume. The chosen voxel lies at a random
position inside the patch. Patches reaching past the volume are padded with 0 (the window's bottom, air) and
background labels. No augmentation: the report mentions none.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from covidseg.config import IntensityConfig
from covidseg.errors import ConfigError
from covidseg.targets import make_target
from covidseg.training.cache import CachedCase

PAD_IMAGE_VALUE = 0.0
"""Normalised intensity of padding (the window's bottom, -1250 HU: air)."""

def num_foreground_rows(batch_size: int, foreground_fraction: float) -> int:
    """How many rows of a global batch are centred on foreground."""
    if not 0.0 <= foreground_fraction <= 1.0:
        raise ConfigError(f"train.foreground_fraction: expected a share in [0, 1], got {foreground_fraction}")
    return int(round(foreground_fraction * batch_size))


def model_input(image: np.ndarray, lung: np.ndarray, mode: str, intensity: IntensityConfig) -> np.ndarray:
    """The network's input channel from a normalised CT: ``lung_only`` masks it with the lungs, else unchanged."""
    image = np.asarray(image, dtype=np.float32)
    if mode == "original":
        return image
    if mode == "lung_only":
        from covidseg.intensity import lung_only

        return np.asarray(lung_only(image, lung > 0, intensity), dtype=np.float32)
    raise ConfigError(f"train.input: expected 'lung_only' or 'original', got {mode!r}")


def crop_padded(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """``array[start : start + size]`` with out-of-range parts filled with ``fill`` (copies, any dtype)."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape, strict=True):
        a, b = max(s, 0), min(s + n, dim)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


class PatchDataset(Dataset):
    """Patch ``index`` of the seeded stream -> ``(image (1, d, h, w), target (K, d, h, w))`` float32 tensors.

    Args:
        cases: cached training cases.
        patch_size: ``(d, h, w)`` voxels.
        batch_size: the global batch ``B`` (decides which rows are foreground-centred).
        foreground_fraction: share of foreground-centred rows per batch.
        target: ``infection``, ``lung`` or ``joint``.
        input_mode: ``lung_only`` or ``original``.
        intensity: intensity settings (``outside_lung_value``).
        seed: the run's seed.
    """

    def __init__(
        self,
        cases: Sequence[CachedCase],
        patch_size: Sequence[int],
        batch_size: int,
        foreground_fraction: float,
        target: str,
        input_mode: str,
        intensity: IntensityConfig,
        seed: int,
    ) -> None:
        if not cases:
            raise ConfigError("no training cases: the split left the training list empty; use more cases")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.n_fg = num_foreground_rows(batch_size, foreground_fraction)
        self.target = target
        self.input_mode = input_mode
        self.intensity = intensity
        self.seed = int(seed)
        self.fg_kind = "infection" if target == "infection" else "lung"
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._fg: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return 2**62  # an endless stream addressed by index; the batch sampler decides which part is read

    def _case(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if i not in self._arrays:  # opened lazily in each worker process (memory-mapped, nothing read yet)
            c = self.cases[i]
            self._arrays[i] = (c.image(), c.lung(), c.infection())
            self._fg[i] = c.foreground(self.fg_kind)
        return self._arrays[i]

    def draw(self, index: int) -> tuple[int, tuple[int, int, int]]:
        """The case number and patch start (voxels, may be negative) of patch ``index``."""
        rng = np.random.default_rng([self.seed, int(index)])
        ci = int(rng.integers(len(self.cases)))
        image, _, _ = self._case(ci)
        fg = self._fg[ci]
        want_fg = (index % self.batch_size) >= self.batch_size - self.n_fg
        if want_fg and len(fg):
            centre = fg[int(rng.integers(len(fg)))]
        else:
            centre = np.array([rng.integers(n) for n in image.shape])
        offset = np.array([rng.integers(p) for p in self.patch_size])
        start = tuple(int(c - o) for c, o in zip(centre, offset, strict=True))
        return ci, start  # type: ignore[return-value]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ci, start = self.draw(index)
        image, lung, infection = self._case(ci)
        img = crop_padded(image, start, self.patch_size, PAD_IMAGE_VALUE).astype(np.float32)
        lun = crop_padded(lung, start, self.patch_size, 0)
        inf = crop_padded(infection, start, self.patch_size, 0)
        x = model_input(img, lun, self.input_mode, self.intensity)[None]  # (1, d, h, w)
        y = make_target(lun, inf, self.target)  # (K, d, h, w)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


class StepBatchSampler(Sampler[list[int]]):
    """Index lists of steps ``start_step .. end_step - 1`` for one DDP rank (all rows when ``world_size`` is 1).

    Args:
        start_step: first global step (a resumed run starts where its checkpoint stopped).
        end_step: one past the last step.
        batch_size: global batch ``B``.
        rank: this process's rank.
        world_size: number of processes; each must get at least one row (``B >= world_size``).
    """

    def __init__(self, start_step: int, end_step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < world_size:
            raise ConfigError(
                f"train.batch_size {batch_size} is smaller than the {world_size} processes; each process needs "
                f"at least one patch per step: use train.batch_size >= {world_size}"
            )
        self.start_step, self.end_step = int(start_step), int(end_step)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.rows = [j for j in range(self.batch_size) if j % self.world_size == self.rank]

    def __len__(self) -> int:
        return max(self.end_step - self.start_step, 0)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            yield [step * self.batch_size + j for j in self.rows]


def make_loader(
    dataset: PatchDataset, sampler: StepBatchSampler, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader reading ``sampler``'s steps with ``num_workers`` worker processes (0 = in this process)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = 4
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory, **kwargs
    )


def measure_loader(dataset: PatchDataset, batches: int, num_workers: int) -> float:
    """The loader's own throughput in patches/s over ``batches`` batches (after a first warm-up batch).

    Reads a part of the stream far beyond any training step so it never disturbs training (patches are
    index-addressed, nothing is consumed).
    """
    if batches <= 0:
        return float("nan")
    far = 2**40 // max(dataset.batch_size, 1)
    sampler = StepBatchSampler(far, far + batches + 1, dataset.batch_size)
    loader = make_loader(dataset, sampler, num_workers)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for x, _ in it:
        n += int(x.shape[0])
    dt = time.perf_counter() - t0
    return n / dt if dt > 0 else float("nan")
