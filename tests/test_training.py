"""Training: cache, seeded sampler, same seed -> same weights, kill -9 + resume, run folder, CLI errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from covidseg.config import load_config
from covidseg.errors import OutputExistsError

pytestmark = pytest.mark.timeout(120) if hasattr(pytest.mark, "timeout") else []

TINY = [
    "model.base_width=4",
    "train.patch_size=[4,32,32]",
    "train.batch_size=2",
    "train.patches_per_epoch=4",
    "train.epochs=2",
    "train.num_workers=0",
    "train.loader_benchmark_batches=1",
    "inference.window=[4,32,32]",
    "inference.batch_windows=8",
]
"""Overrides that make a run take seconds on 2 CPU cores."""


def write_tiny_cohort(root: Path, cases: int = 6, seed: int = 0) -> Path:
    """A phantom cohort in the Zenodo layout at scale 0.15."""
    from covidseg.phantom import write_cohort

    write_cohort(root, cases, seed=seed, style="mixed", scale=0.15, progress=False)
    return root



@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return write_tiny_cohort(root / "data", cases=6)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _config(cache_dir, *extra):
    return load_config(None, [*TINY, f"train.cache_dir={cache_dir}", *extra])


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cohort, cache_dir):
    from covidseg.training.trainer import train

    out = tmp_path_factory.mktemp("runs") / "ref"
    result = train(out, config=_config(cache_dir), data=cohort, progress=False)
    return out, result


def test_cache_is_built_once_and_read_without_nifti(cohort, cache_dir, monkeypatch):
    from covidseg.data.layouts import find_cases
    from covidseg.training.cache import prepare_case

    cfg = _config(cache_dir)
    case = find_cases(cohort)[0]
    entry = prepare_case(case, cache_dir, cfg.intensity)
    assert entry.image().dtype == np.float16 and entry.lung().dtype == np.uint8
    assert 0.0 <= float(entry.image().min()) and float(entry.image().max()) <= 1.0
    assert entry.image().shape == entry.lung().shape == entry.infection().shape == entry.shape
    import covidseg.io.image as image_io

    def boom(*a, **k):
        raise AssertionError("NIfTI read although the case is cached")

    monkeypatch.setattr(image_io, "read_image", boom)
    assert prepare_case(case, cache_dir, cfg.intensity).folder == entry.folder
    other = prepare_case.__globals__["case_key"](case, cfg.intensity, (2.0, 1.0, 1.0))
    assert other not in entry.folder.name  # another preprocessing setting gives another entry


def test_sampler_same_seed_same_patches_any_worker_count(cohort, cache_dir):
    from covidseg.data.layouts import find_cases
    from covidseg.training.cache import prepare_cases
    from covidseg.training.sampler import PatchDataset, StepBatchSampler, make_loader

    cfg = _config(cache_dir)
    cases = prepare_cases(find_cases(cohort), cache_dir, cfg.intensity, progress=False)
    cases = [c for c in cases if len(c.foreground("infection"))][:3]  # foreground rows need infection to centre on
    assert cases, "the phantom cohort has no infection"

    def batches(seed, workers):
        ds = PatchDataset(cases, (4, 32, 32), 4, 0.5, "infection", "lung_only", cfg.intensity, seed)
        return [(x.clone(), y.clone()) for x, y in make_loader(ds, StepBatchSampler(0, 3, 4), workers)]

    a, b, c = batches(0, 0), batches(0, 2), batches(1, 0)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c, strict=True))
    x, y = a[0]
    assert x.shape == (4, 1, 4, 32, 32) and y.shape == (4, 1, 4, 32, 32)
    assert all(float(y[j].sum()) > 0 for j in (2, 3))  # the last half of every batch is centred on infection
    # DDP sharding: two ranks together read exactly the rows of the one-process batch
    r0 = list(StepBatchSampler(5, 6, 5, rank=0, world_size=2))[0]
    r1 = list(StepBatchSampler(5, 6, 5, rank=1, world_size=2))[0]
    assert sorted(r0 + r1) == list(StepBatchSampler(5, 6, 5))[0] == list(range(25, 30))


def test_same_seed_same_weights_and_run_folder(tmp_path, reference_run, cohort, cache_dir):
    from covidseg.checkpoint import load_checkpoint
    from covidseg.training.trainer import train

    ref_dir, ref = reference_run
    assert ref.step == ref.total_steps == 4
    for name in ("config.yaml", "run.json", "metrics.csv", "last.pt", "best.pt"):
        assert (ref_dir / name).is_file(), name
    rows = (ref_dir / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("epoch,step,train_loss,val_dice") and len(rows) == 3
    model, config, meta = load_checkpoint(ref_dir / "best.pt")
    assert meta["best_dice"] is not None and config.model.base_width == 4
    again = train(tmp_path / "same", config=_config(cache_dir), data=cohort, progress=False)
    assert _same(_weights(ref_dir / "last.pt"), _weights(again.run_dir / "last.pt"))
    other = train(tmp_path / "other", config=_config(cache_dir, "train.seed=1"), data=cohort, progress=False)
    assert not _same(_weights(ref_dir / "last.pt"), _weights(other.run_dir / "last.pt"))
    with pytest.raises(OutputExistsError, match="--resume"):
        train(ref_dir, config=_config(cache_dir), data=cohort, progress=False)


def test_kill9_mid_epoch_then_resume_ends_identically(tmp_path, reference_run, cohort, cache_dir):
    """A run killed with SIGKILL during epoch 2 and resumed ends at the same step with the same weights."""
    ref_dir, ref = reference_run
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "covidseg", "train", "--data", str(cohort), "--out", str(run), "--quiet"]
    for item in [*TINY, f"train.cache_dir={cache_dir}"]:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while not (run / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)  # epoch 1 is saved; epoch 2 is in progress (or just starting)
    proc.wait(timeout=30)
    assert (run / "config.yaml").is_file()
    res = subprocess.run([sys.executable, "-m", "covidseg", "train", "--resume", str(run), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    from covidseg.checkpoint import load_checkpoint
    from covidseg.training.trainer import run_progress

    state = run_progress(run)
    assert state["complete"] and state["step"] == ref.total_steps
    load_checkpoint(run / "best.pt")  # valid best checkpoint
    assert _same(_weights(ref_dir / "last.pt"), _weights(run / "last.pt"))
    lines = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert [ln.split(",")[0] for ln in lines[1:]] == ["1", "2"]  # no duplicated epoch rows


def test_cli_errors_are_one_line(tmp_path, reference_run):
    ref_dir, _ = reference_run
    env = {**os.environ}
    res = subprocess.run([sys.executable, "-m", "covidseg", "train", "--resume", str(tmp_path / "nothing")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "not a run folder" in res.stderr
    res = subprocess.run([sys.executable, "-m", "covidseg", "train", "--data", str(tmp_path), "--out",
                          str(ref_dir)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and "--resume" in res.stderr and "Traceback" not in res.stderr


def test_bad_patch_size_names_a_fix(tmp_path, cohort, cache_dir):
    from covidseg.errors import ConfigError
    from covidseg.training.trainer import train

    with pytest.raises(ConfigError, match="does not fit the poolings"):
        train(tmp_path / "bad", config=_config(cache_dir, "train.patch_size=[3,30,32]"), data=cohort,
              progress=False)
