"""`covidseg experiment`: a tiny ablation writes a 4-row table of 4 different models; table formatting."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

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




@pytest.mark.slow
def test_tiny_ablation_table(tmp_path):
    from covidseg.training.experiments import run_experiment

    data = write_tiny_cohort(tmp_path / "data", cases=5)
    overrides = [*TINY, f"train.cache_dir={tmp_path / 'cache'}", "train.loader_benchmark_batches=0"]
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
    weights = {(tmp_path / "out" / "runs" / f"{r['model']}-lung_only-report" / "best.pt").stat().st_size
               for r in rows}
    assert len(weights) == 4  # four really different models (their metrics differ once trained longer)
    # a second call reuses the complete runs (and their cached test metrics) and writes the same table
    before = (tmp_path / "out" / "TABLE.csv").read_text(encoding="utf-8")
    run_experiment("ablation", data, tmp_path / "out", epochs=1, overrides=overrides, progress=False,
                   command="covidseg experiment ablation (test)")
    assert (tmp_path / "out" / "TABLE.csv").read_text(encoding="utf-8") == before
    from covidseg.errors import ConfigError

    with pytest.raises(ConfigError, match="other settings"):
        run_experiment("ablation", data, tmp_path / "out", epochs=2, overrides=overrides, progress=False)


def test_per_case_table_format():
    from pathlib import Path

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
