"""Fixtures shared by the training tests: tiny phantom cohorts and the overrides of a run that takes seconds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from covidseg.config import Config, load_config

TINY_TRAIN = (
    "model.base_width=4",
    "train.patch_size=[4,32,32]",
    "train.batch_size=2",
    "train.patches_per_epoch=4",
    "train.epochs=2",
    "inference.window=[4,32,32]",
    "runtime.num_workers=0",
    "runtime.loader_benchmark_batches=1",
    "runtime.batch_windows=8",
)
"""Overrides that make a training run take seconds on 2 CPU cores (2 epochs of 2 steps of 2 patches)."""
COHORT_SCALE = 0.15
"""Phantom size of the tiny cohorts (about 77 x 77 x 36 voxels)."""


@pytest.fixture(scope="session")
def tiny_overrides() -> tuple[str, ...]:
    """:data:`TINY_TRAIN`: ``--set`` items of a run that takes seconds."""
    return TINY_TRAIN


@pytest.fixture(scope="session")
def make_cohort(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_cohort(cases=6, scale=0.15)``: a mixed phantom cohort (seed 0) in the Zenodo layout, written once per
    session for each ``(cases, scale)``. Tests only read it (copy it to change it)."""
    made: dict[tuple[int, float], Path] = {}

    def make(cases: int = 6, scale: float = COHORT_SCALE) -> Path:
        from covidseg.phantom import write_cohort

        key = (cases, scale)
        if key not in made:
            root = tmp_path_factory.mktemp(f"cohort{cases}") / "data"
            write_cohort(root, cases, seed=0, style="mixed", scale=scale, progress=False)
            made[key] = root
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_config(tiny_overrides: tuple[str, ...]) -> Callable[..., Config]:
    """``tiny_config(cache_dir, *extra)``: the tiny run's config with its cache in ``cache_dir``, then ``extra``."""

    def make(cache_dir: Path, *extra: str) -> Config:
        return load_config(None, [*tiny_overrides, f"runtime.cache_dir={cache_dir}", *extra])

    return make


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3D infection checkpoint (base width 4, random weights, head bias 0.3 so that some voxels pass the
    threshold and the infection masks are not empty)."""
    import torch

    from covidseg.checkpoint import save_checkpoint
    from covidseg.config import ModelConfig
    from covidseg.models import create_model

    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(base_width=4))
    model = create_model(cfg.model)
    with torch.no_grad():
        model.head.bias.fill_(0.3)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", model, cfg, target="infection")


@pytest.fixture(scope="module")
def phantom_sitk(tmp_path_factory: pytest.TempPathFactory):
    """A small phantom CT as a SimpleITK image (file grid and geometry of its NIfTI)."""
    import nibabel as nib
    import SimpleITK as sitk

    from covidseg.phantom import make_phantom

    ph = make_phantom("coronacases", seed=1, scale=0.15)
    path = tmp_path_factory.mktemp("phantom") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ph.stored_ct(), ph.affine), str(path))
    return sitk.ReadImage(str(path))
