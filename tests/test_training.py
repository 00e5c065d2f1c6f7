"""Training: cache, seeded sampler, same seed -> same weights, kill -9 + resume, run folder, CLI errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from covidseg.errors import ConfigError, OutputExistsError

pytestmark = pytest.mark.timeout(120) if hasattr(pytest.mark, "timeout") else []


@pytest.fixture(scope="module")
def cohort(make_cohort):
    return make_cohort(6)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cohort, cache_dir, tiny_config):
    from covidseg.training.trainer import train

    out = tmp_path_factory.mktemp("runs") / "ref"
    result = train(out, config=tiny_config(cache_dir), data=cohort, progress=False)
    return out, result


def test_cache_is_built_once_and_read_without_nifti(cohort, cache_dir, monkeypatch, tiny_config):
    from covidseg.data.layouts import find_cases
    from covidseg.training.cache import prepare_case

    cfg = tiny_config(cache_dir)
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


def test_sampler_same_seed_same_patches_any_worker_count(cohort, cache_dir, tiny_config):
    from covidseg.data.layouts import find_cases
    from covidseg.training.cache import prepare_cases
    from covidseg.training.sampler import PatchDataset, StepBatchSampler, make_loader

    cfg = tiny_config(cache_dir)
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


def test_same_seed_same_weights_and_run_folder(tmp_path, reference_run, cohort, cache_dir, tiny_config):
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
    again = train(tmp_path / "same", config=tiny_config(cache_dir), data=cohort, progress=False)
    assert _same(_weights(ref_dir / "last.pt"), _weights(again.run_dir / "last.pt"))
    other = train(tmp_path / "other", config=tiny_config(cache_dir, "train.seed=1"), data=cohort, progress=False)
    assert not _same(_weights(ref_dir / "last.pt"), _weights(other.run_dir / "last.pt"))
    with pytest.raises(OutputExistsError, match="--resume"):
        train(ref_dir, config=tiny_config(cache_dir), data=cohort, progress=False)


KILL_AT_STEP = 3
"""The run below is killed (SIGKILL) in this step: epoch 1 (steps 1-2) is saved, epoch 2 is in progress."""
KILLED_RUN = """
import os, signal, sys
import covidseg.losses as losses

class Killed(losses.DeepSupervisionLoss):
    calls = 0

    def forward(self, *args, **kwargs):
        Killed.calls += 1
        if Killed.calls == {step}:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(*args, **kwargs)

losses.DeepSupervisionLoss = Killed
from covidseg.cli.main import run
run(sys.argv[1:])
"""


def test_kill9_at_a_known_step_then_resume_ends_identically(tmp_path, reference_run, cohort, cache_dir,
                                                            tiny_overrides, tiny_config, monkeypatch):
    """A run killed with SIGKILL in step 3 of 4 resumes from its step-2 checkpoint: it trains exactly the 2 steps
    left, keeps epoch 1's metrics row, and ends with the weights of the uninterrupted run."""
    import covidseg.losses as losses
    from covidseg.checkpoint import load_checkpoint
    from covidseg.training.trainer import run_progress, train

    ref_dir, ref = reference_run
    run = tmp_path / "killed"
    cmd = [sys.executable, "-c", KILLED_RUN.format(step=KILL_AT_STEP), "train", "--data", str(cohort), "--out",
           str(run), "--quiet"]
    for item in [*tiny_overrides, f"runtime.cache_dir={cache_dir}"]:
        cmd += ["--set", item]
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = run_progress(run)
    assert state is not None and state["step"] == KILL_AT_STEP - 1 and not state["complete"]
    epoch_1 = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()[1]

    steps = {"n": 0}

    class Counted(losses.DeepSupervisionLoss):  # type: ignore[misc, valid-type]
        def forward(self, *args, **kwargs):
            steps["n"] += 1
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(losses, "DeepSupervisionLoss", Counted)
    result = train(run, resume=True, progress=False)
    assert steps["n"] == ref.total_steps - (KILL_AT_STEP - 1)  # only the steps the checkpoint did not hold
    assert result.complete and run_progress(run)["step"] == ref.total_steps
    load_checkpoint(run / "best.pt")  # valid best checkpoint
    assert _same(_weights(ref_dir / "last.pt"), _weights(run / "last.pt"))
    lines = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert [ln.split(",")[0] for ln in lines[1:]] == ["1", "2"] and lines[1] == epoch_1  # epoch 1 not redone


def test_resume_of_a_complete_run_trains_nothing(reference_run, tmp_path, monkeypatch):
    import shutil

    import covidseg.losses as losses
    from covidseg.training.trainer import train

    ref_dir, ref = reference_run
    run = tmp_path / "copy"
    shutil.copytree(ref_dir, run)

    def no_step(*args, **kwargs):
        raise AssertionError("a complete run trained again")

    monkeypatch.setattr(losses.DeepSupervisionLoss, "forward", no_step)
    result = train(run, resume=True, progress=False)
    assert result.step == ref.total_steps and _same(_weights(ref_dir / "last.pt"), _weights(run / "last.pt"))


def test_cli_errors_are_one_line(tmp_path, reference_run):
    ref_dir, _ = reference_run
    env = {**os.environ}
    res = subprocess.run([sys.executable, "-m", "covidseg", "train", "--resume", str(tmp_path / "nothing")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "not a run folder" in res.stderr
    res = subprocess.run([sys.executable, "-m", "covidseg", "train", "--data", str(tmp_path), "--out",
                          str(ref_dir)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and "--resume" in res.stderr and "Traceback" not in res.stderr


def test_bad_patch_size_names_a_fix(tmp_path, cohort, cache_dir, tiny_config):
    from covidseg.training.trainer import train

    with pytest.raises(ConfigError, match=r"train.patch_size 3x30x32 \(D x H x W\) does not fit 2 poolings of the "
                                          r"slice axis and 4 of the row axis; use multiples of 4 and 16 \(e.g. "
                                          r"4x16x32\) or fewer poolings"):
        train(tmp_path / "bad", config=tiny_config(cache_dir, "train.patch_size=[3,30,32]"), data=cohort,
              progress=False)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("variant", ["unet-2d", "unet-fv-paspp-ds-2d"])
def test_train_refuses_2d_variants_up_front_with_exit_2(tmp_path, cohort, variant, capsys, monkeypatch):
    """`covidseg train --set model.name=*-2d` used to die with an internal error after caching."""
    import covidseg.training.trainer as trainer
    from covidseg.cli.main import run as cli

    def no_cache(*args, **kwargs):
        raise AssertionError("cases were cached before the 2D variant was refused")

    monkeypatch.setattr(trainer, "cache_cases", no_cache)
    with pytest.raises(SystemExit) as exc:
        cli(["train", "--data", str(cohort), "--out", str(tmp_path / "run"), "--set", f"model.name={variant}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert f"covidseg semiseg train --variant {variant}" in err and "a 2D model" in err
    assert not (tmp_path / "run").exists()


def test_one_home_for_the_optimisation_step():
    """Only training/loop.py builds an optimizer or a grad scaler and calls backward(); both trainers step with
    its train_step (a second training loop would show up here)."""
    import re
    from pathlib import Path

    import covidseg.training.loop as loop
    import covidseg.training.slices as slices
    import covidseg.training.trainer as trainer

    package = Path(loop.__file__).resolve().parents[1]
    pattern = re.compile(r"\.backward\(|torch\.optim\.[A-Z]|GradScaler\(")
    homes = {p.relative_to(package).as_posix() for p in package.rglob("*.py")
             if pattern.search(p.read_text(encoding="utf-8"))}
    assert homes == {"training/loop.py"}
    assert trainer.train_step is loop.train_step and slices.train_step is loop.train_step
