"""`covidseg experiment`: a tiny ablation writes a 4-row table of 4 different models; table formatting."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest


@pytest.mark.slow
def test_tiny_ablation_table(tmp_path, make_cohort, tiny_overrides):
    import torch

    from covidseg.checkpoint import load_checkpoint
    from covidseg.training.experiments import run_experiment

    data = make_cohort(5)
    overrides = [*tiny_overrides, f"runtime.cache_dir={tmp_path / 'cache'}", "runtime.loader_benchmark_batches=0"]
    md = run_experiment("ablation", data, tmp_path / "out", epochs=1, overrides=overrides, progress=False,
                        command="covidseg experiment ablation (test)")
    rows = list(csv.DictReader((tmp_path / "out" / "TABLE.csv").open()))
    assert [r["model"] for r in rows] == ["unet", "unet-fv-se", "unet-fv-paspp", "unet-fv-paspp-ds"]
    for key in ("dice", "iou", "sensitivity", "precision", "nsd", "hd95", "published_dice", "lung_mask"):
        assert key in rows[0]
    assert float(rows[3]["published_dice"]) == pytest.approx(76.27)
    text = md.read_text(encoding="utf-8")
    assert "command: `covidseg experiment ablation (test)`" in text and "machine:" in text
    assert "ground truth" in text and "±" in text
    # each row's checkpoint is the model of its row: its own variant and switches, weights trained from it
    expected = {"unet": ("none", False, False), "unet-fv-se": ("se", False, False),
                "unet-fv-paspp": ("se", True, False), "unet-fv-paspp-ds": ("se", True, True)}
    states = {}
    for r in rows:
        model, config, meta = load_checkpoint(tmp_path / "out" / "runs" / f"{r['model']}-lung_only-report" / "best.pt")
        m = config.model
        assert m.name == r["model"] and (m.fv, m.paspp, m.deep_supervision) == expected[r["model"]]
        assert meta["input"] == "lung_only" and meta["target"] == "infection"
        states[r["model"]] = model.state_dict()
    # the shared part (the first encoder block) differs between runs: four trainings, not one copied four times
    first = [name for name in states["unet"] if name.startswith("encoders.0.")]
    assert first and all(name in s for s in states.values() for name in first)
    for a, b in [("unet", "unet-fv-se"), ("unet-fv-se", "unet-fv-paspp"), ("unet-fv-paspp", "unet-fv-paspp-ds")]:
        assert any(not torch.equal(states[a][n], states[b][n]) for n in first), (a, b)
    # a second call reuses the complete runs (and their cached test metrics) and writes the same table
    before = (tmp_path / "out" / "TABLE.csv").read_text(encoding="utf-8")
    run_experiment("ablation", data, tmp_path / "out", epochs=1, overrides=overrides, progress=False,
                   command="covidseg experiment ablation (test)")
    assert (tmp_path / "out" / "TABLE.csv").read_text(encoding="utf-8") == before
    from covidseg.errors import ConfigError

    with pytest.raises(ConfigError, match="other settings"):
        run_experiment("ablation", data, tmp_path / "out", epochs=2, overrides=overrides, progress=False)


def test_per_case_table_format():

    from covidseg.config import Config
    from covidseg.training.experiments import EXPERIMENTS, build_table
    from covidseg.training.tables import to_csv, to_markdown

    exp = EXPERIMENTS["per-case"]
    per_case = {
        "coronacases_001": {"dice": 0.8, "iou": 0.8 / 1.2, "sensitivity": 0.7, "precision": 0.9, "nsd": 0.85,
                            "hd95": 4.0, "resolution": "(512, 512, 301)"},
        "radiopaedia_4_85506_1": {"dice": 0.6, "iou": 0.6 / 1.4, "sensitivity": 0.5, "precision": 0.75,
                                  "nsd": 0.6, "hd95": 12.0, "resolution": "(630, 630, 93)"},
    }
    table = build_table("per-case", exp, [(exp.rows[0], per_case)], "report", Path("/data/real"), "cmd", 1.0,
                        Config())
    md, cs = to_markdown(table), to_csv(table)
    assert "(512, 512, 301)" in md and "83.04" in md  # ours and the published Table 4
    assert "70.00 ± 14.14" in md  # mean ± sd of the Dice in %
    assert "Synthetic phantoms" not in md
    rows = list(csv.DictReader(cs.splitlines()))
    assert [r["row"] for r in rows] == ["coronacases_001", "radiopaedia_4_85506_1", "mean ± sd"]
    assert float(rows[0]["dice"]) == pytest.approx(80.0) and float(rows[1]["hd95"]) == pytest.approx(12.0)
