"""`covidseg demo` end to end in its quick setting (3 tiny phantoms, 2 training steps, width 4), reuse, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from covidseg.cli.main import run as cli
from covidseg.config import config_to_dict, load_config
from covidseg.demo import (
    DEMO_FILE,
    QUICK_OVERRIDES,
    DemoCohort,
    DemoResult,
    check_out_dir,
    demo_config,
    demo_record,
    run_demo,
    summary_text,
)
from covidseg.errors import InputError, OutputExistsError

QUICK = DemoCohort.quick()
QUICK_CONFIG = demo_config(None, QUICK_OVERRIDES)


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    return int(exc.value.code or 0)


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, list[str]]:
    out = tmp_path_factory.mktemp("demo") / "covidseg-demo"
    messages: list[str] = []
    result = run_demo(out, QUICK, demo_config(out, QUICK_OVERRIDES), progress=False, log=messages.append)
    return result, messages


def test_quick_settings_are_tiny() -> None:
    from covidseg.training.trainer import total_steps

    assert (QUICK.cases, total_steps(QUICK_CONFIG), QUICK_CONFIG.model.base_width) == (3, 2, 4)
    cfg = demo_config(Path("x"))
    assert cfg.model.name == "unet-fv-paspp-ds"  # the demo trains the report's final model
    assert cfg.model.deep_supervision and cfg.model.paspp and cfg.model.fv == "se"
    assert cfg.inference.window == cfg.train.patch_size and QUICK_CONFIG.inference.window == QUICK_CONFIG.train.patch_size
    assert cfg.runtime.cache_dir == str((Path("x") / "cache").resolve())


def test_demo_preset_is_what_the_demo_always_trained() -> None:
    """The demo preset gives the run config the demo's own settings class used to build (same weights, same
    table): the report's defaults with these changes."""
    cfg = demo_config(None)
    changed = {"model.base_width": 8, "model.depth": 3, "train.patch_size": [16, 64, 64], "train.batch_size": 4,
               "train.learning_rate": 1e-3, "train.epochs": 10, "train.patches_per_epoch": 160,
               "train.foreground_fraction": 0.5, "inference.window": [16, 64, 64], "runtime.num_workers": 0,
               "runtime.loader_benchmark_batches": 0}
    got, default = config_to_dict(cfg), config_to_dict(load_config())
    differ = {f"{s}.{k}": v for s in got for k, v in got[s].items() if default[s][k] != v}
    assert differ == changed


def test_first_run_writes_every_output(first: tuple[DemoResult, list[str]]) -> None:
    result, messages = first
    out = result.out
    assert result.trained
    assert [m[:5] for m in messages if m.startswith("[")] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    for name in ("run/best.pt", "run/last.pt", "run/metrics.csv", "run/config.yaml", "evaluation.csv",
                 "evaluation.json", DEMO_FILE):
        assert (out / name).is_file(), name
    for name in ("lungs.nii.gz", "infection.nii.gz", "report.json", "report.csv", "overview.png"):
        assert (result.segment_dir / name).is_file(), name
    assert result.segment_dir.parent == out / "segment"
    # the segmented case is held out: not trained on, not used for validation
    run = json.loads((out / "run" / "run.json").read_text(encoding="utf-8"))
    assert result.segmented_case in run["cases"]["test"]
    assert result.segmented_case not in run["cases"]["train"] + run["cases"]["val"]
    # evaluation: one row per held-out case, then the mean; fractions in [0, 1]
    rows = list(csv.DictReader((out / "evaluation.csv").open()))
    assert [r["case"] for r in rows] == [*run["cases"]["test"], "mean"]
    for r in rows:
        for key in ("dice", "iou", "sensitivity", "precision"):
            assert 0.0 <= float(r[key]) <= 1.0
    record = json.loads((out / DEMO_FILE).read_text(encoding="utf-8"))
    assert record["status"] == "done" and record["trained_now"] is True
    assert record["cohort"] == QUICK.to_dict() and record["config"]["model"]["base_width"] == 4
    report = json.loads((result.segment_dir / "report.json").read_text(encoding="utf-8"))
    assert report["model"]["name"] == "unet-fv-paspp-ds"
    assert report["lungs"]["both"]["percent"] == pytest.approx(result.report["lungs"]["both"]["percent"])
    # the classical lungs find the phantom's lungs even in this tiny setting
    assert result.pipeline_metrics["lung_dice"] > 0.8


def test_summary_says_phantom_and_where(first: tuple[DemoResult, list[str]]) -> None:
    result, _ = first
    text = summary_text(result)
    assert "not a patient" in text
    assert str(result.segment_dir / "overview.png") in text
    assert "left" in text and "right" in text and "mean" in text


def test_second_run_reuses_the_checkpoint(first: tuple[DemoResult, list[str]], monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    result, _ = first
    best = result.out / "run" / "best.pt"
    stamp = best.stat().st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second demo run trained again")

    import covidseg.phantom
    import covidseg.training.trainer

    monkeypatch.setattr(covidseg.training.trainer, "train", no_training)
    monkeypatch.setattr(covidseg.phantom, "write_cohort", no_training)
    assert _cli(["demo", "--out", str(result.out), "--quick", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "reusing the trained checkpoint" in captured.err
    assert "reused checkpoint" in captured.out and "not a patient" in captured.out
    assert best.stat().st_mtime_ns == stamp
    assert json.loads((result.out / DEMO_FILE).read_text(encoding="utf-8"))["trained_now"] is False


def test_out_is_a_file_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    assert _cli(["demo", "--out", str(target), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and "is a file" in err
    assert target.read_text(encoding="utf-8") == "not a folder"  # inputs are never overwritten


def test_refuses_foreign_folder_and_other_settings(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a demo folder"):
        check_out_dir(foreign, QUICK, QUICK_CONFIG, force=True)
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / DEMO_FILE).write_text(json.dumps(demo_record(QUICK, QUICK_CONFIG)))
    check_out_dir(demo, QUICK, QUICK_CONFIG, force=False)  # same settings: reused
    elsewhere = demo_config(tmp_path / "other", QUICK_OVERRIDES)  # another cache folder: the same demo
    check_out_dir(demo, QUICK, elsewhere, force=False)
    with pytest.raises(OutputExistsError, match="--force"):
        check_out_dir(demo, DemoCohort(), QUICK_CONFIG, force=False)
    with pytest.raises(OutputExistsError, match="--force"):
        check_out_dir(demo, QUICK, demo_config(None), force=False)
    check_out_dir(demo, DemoCohort(), demo_config(None), force=True)


def test_a_demo_folder_of_the_old_layout_is_reused(tmp_path: Path) -> None:
    """A demo.json of the old layout: one "settings" mapping, a config with train.num_workers, inference.bf16..."""
    old_config = config_to_dict(QUICK_CONFIG)
    runtime = old_config.pop("runtime")
    old_config["train"].update({k: runtime[k] for k in ("num_workers", "cache_dir", "loader_benchmark_batches",
                                                        "deterministic", "sync_batchnorm")}, device="auto", amp="auto")
    old_config["inference"].update({k: runtime[k] for k in ("bf16", "threads", "channels_last", "batch_windows")},
                                   device="cpu")
    settings = {"cases": 3, "scale": 0.125, "style": "mixed", "seed": 0, "model": "unet-fv-paspp-ds",
                "base_width": 4, "depth": 2, "patch_size": [16, 32, 32], "batch_size": 2, "learning_rate": 1e-3,
                "epochs": 1, "patches_per_epoch": 4, "foreground_fraction": 0.5, "num_workers": 0}
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / DEMO_FILE).write_text(json.dumps({"settings": settings, "config": old_config}))
    check_out_dir(demo, QUICK, QUICK_CONFIG, force=False)
    with pytest.raises(OutputExistsError, match="--force"):
        check_out_dir(demo, DemoCohort(), demo_config(None), force=False)
