"""The report's experiments, one command per table (report Tables 2-5).

``covidseg experiment NAME --data DIR --out DIR`` trains every model the table needs, each into its own run
folder ``DIR/runs/<variant>-<input>-<split>/`` (a complete run is reused, an interrupted one resumed, so a table
can be built up over several sessions and several tables share models), evaluates each model's ``best.pt`` on the
split's test cases, and writes ``DIR/TABLE.md`` and ``DIR/TABLE.csv``.

=============  ==========  =================================================================================
name           report      rows
=============  ==========  =================================================================================
channel        Table 2     UNet+FV with the SE channel branch vs the CE branch
ablation       Table 3     unet, unet-fv-se, unet-fv-paspp, unet-fv-paspp-ds
per-case       Table 4     the final model (unet-fv-paspp-ds), one row per test case with its resolution
preprocessing  Table 5     the final model on the lung-only input vs the original image
=============  ==========  =================================================================================

Metrics are those of the binary infection mask (threshold ``inference.threshold``) on whole test volumes, per
case, then mean ± sample sd over the test cases: Dice, IoU, sensitivity, precision, NSD at 3 mm and HD95 (mm)
at each scan's own spacing (:mod:`covidseg.metrics`). As in the report, the lung-only input uses the dataset's
ground-truth lung mask at training *and* at test time; the tables say so. ``--split benchmark-5fold`` trains
each model on the five benchmark folds and pools the 20 test cases.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covidseg.config import Config, RuntimeConfig, load_config
from covidseg.errors import ConfigError, InputError
from covidseg.io.atomic import atomic_write_text
from covidseg.metrics import METRIC_KEYS, NSD_TOLERANCE_MM, binary_metrics, mean_sd
from covidseg.training.tables import PERCENT_KEYS, Table, mean_sd_text, metric_columns, write_table
from covidseg.training.trainer import (
    cache_cases,
    code_version,
    ensure_trained,
    find_dataset,
    machine_description,
    model_config_for,
    predict_case,
    resolve_split,
)

FIVE_FOLD = "benchmark-5fold"
N_FOLDS = 5
TEST_METRICS_FILE = "test_metrics.json"
LUNG_MASK_GT = "ground truth (Lung_Mask), at training and test, as in the report"
LUNG_MASK_NONE = "none (original image)"
PUBLISHED_KEYS = ("dice", "iou", "sensitivity", "precision")
"""Metrics the report published (in %)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One model of a table."""

    label: str
    model: str
    input: str = "lung_only"
    published: dict[str, float] | None = None


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A table of the report."""

    table: str
    title: str
    rows: tuple[Row, ...]
    per_case: bool = False


def _pub(dice: float, iou: float, sensitivity: float, precision: float | None) -> dict[str, float]:
    out = {"dice": dice, "iou": iou, "sensitivity": sensitivity}
    if precision is not None:
        out["precision"] = precision
    return out


FINAL = "unet-fv-paspp-ds"
EXPERIMENTS: dict[str, Experiment] = {
    "channel": Experiment("Table 2", "FV block with different channel-wise attention", (
        Row("UNet+FV (SE block)", "unet-fv-se", published=_pub(72.29, 57.31, 70.09, 77.27)),
        Row("UNet+FV (CE block)", "unet-fv-ce", published=_pub(72.03, 57.22, 70.02, 75.78)),
    )),
    "ablation": Experiment("Table 3", "Performance of the network with different blocks", (
        Row("UNet (baseline)", "unet", published=_pub(71.96, 57.04, 64.80, 84.35)),
        Row("UNet+FV", "unet-fv-se", published=_pub(72.29, 57.31, 70.09, 77.27)),
        Row("UNet+FV+PASPP", "unet-fv-paspp", published=_pub(74.71, 60.55, 71.06, 79.83)),
        Row("UNet+FV+PASPP+DS", FINAL, published=_pub(76.27, 62.37, 69.38, 85.63)),
    )),
    "per-case": Experiment("Table 4", "Performance of the final model per test case", (
        Row("UNet+FV+PASPP+DS", FINAL),
    ), per_case=True),
    "preprocessing": Experiment("Table 5", "Performance with different data preprocessing", (
        Row("Lung only", FINAL, "lung_only", published=_pub(76.27, 62.37, 69.38, 85.63)),
        Row("Original image", FINAL, "original", published=_pub(50.74, 39.55, 73.28, 52.47)),
    )),
}
"""The four experiments; published numbers are the report's (infection, 4 test cases, %)."""

PUBLISHED_PER_CASE = (
    ("A", "(512, 512, 301)", 83.04, 76.93, 71.00),
    ("B", "(512, 512, 256)", 65.66, 57.22, 48.88),
    ("C", "(630, 401, 110)", 70.74, 58.98, 54.72),
    ("D", "(630, 630, 93)", 85.64, 84.36, 74.88),
)
"""Report Table 4: subject, resolution, Dice, sensitivity, IoU (%)."""


def folds_of(split: str) -> list[str]:
    """The split names a table is trained on (five for ``benchmark-5fold``)."""
    if split == FIVE_FOLD:
        return [f"benchmark-fold-{k}" for k in range(N_FOLDS)]
    return [split]


def row_config(base: Config, row: Row) -> Config:
    """``base`` with the row's variant and input; the tables are about the infection target."""
    model = dataclasses.replace(base.model, name=row.model)
    train_cfg = dataclasses.replace(base.train, input=row.input, target="infection")  # type: ignore[arg-type]
    return model_config_for(dataclasses.replace(base, model=model, train=train_cfg))


def evaluate_run(
    run_dir: Path, cases: Sequence[Any], data_cases: dict[str, Any], progress: bool = True,
    runtime: RuntimeConfig | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-case metrics of ``run_dir/best.pt`` on the cached ``cases`` (reused from ``test_metrics.json``).

    The model, its input and its window come from the checkpoint; ``runtime`` (default
    :class:`~covidseg.config.RuntimeConfig`: a GPU when there is one) says where and how the windows run.

    Returns:
        ``case_id -> {dice, iou, sensitivity, precision, nsd, hd95, resolution}`` (fractions; hd95 in mm).
    """
    from covidseg.checkpoint import load_checkpoint
    from covidseg.progress import progress_bar
    from covidseg.runtime import resolve_device

    best = run_dir / "best.pt"
    if not best.is_file():
        raise InputError(f"{best}: missing; the run did not finish an epoch, run the experiment again to resume it")
    stamp = best.stat().st_mtime_ns
    cache_file = run_dir / TEST_METRICS_FILE
    ids = [c.case_id for c in cases]
    if cache_file.is_file():
        saved = json.loads(cache_file.read_text(encoding="utf-8"))
        if saved.get("best_mtime_ns") == stamp and list(saved.get("cases", {})) == ids:
            return saved["cases"]
    rt = runtime or RuntimeConfig()
    device = resolve_device(rt.device, setting="runtime.device")
    model, config, _ = load_checkpoint(best, device=device)
    tol = NSD_TOLERANCE_MM["infection"]
    out: dict[str, dict[str, Any]] = {}
    for case in progress_bar(cases, desc=f"test {run_dir.name}", unit="case", disable=not progress, leave=False):
        probs = predict_case(model, case, config, device, runtime=rt)
        pred = probs[0] >= config.inference.threshold
        gt = case.infection(mmap=False) > 0
        metrics = binary_metrics(pred, gt, spacing=case.spacing, tolerance_mm=tol)
        out[case.case_id] = {**metrics, "resolution": str(tuple(case.original_shape))}
    atomic_write_text(cache_file, json.dumps({"best_mtime_ns": stamp, "cases": out}, indent=1))
    return out


def _is_phantom(data: Path) -> bool:
    """Whether ``data`` looks like a cohort written by ``covidseg phantom`` (marker file or name)."""
    names = [p.name.lower() for p in Path(data).iterdir()] if Path(data).is_dir() else []
    return "phantom" in str(data).lower() or any("phantom" in n for n in names)


def run_experiment(
    name: str,
    data: Path | str,
    out: Path | str,
    split: str = "report",
    epochs: int | None = None,
    config_file: Path | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Train and evaluate every model of experiment ``name`` and write ``TABLE.md`` / ``TABLE.csv`` in ``out``.

    Args:
        name: ``channel``, ``ablation``, ``per-case`` or ``preprocessing``.
        data: dataset folder.
        out: output folder (run folders under ``out/runs``).
        split: ``report``, ``benchmark-fold-K`` or ``benchmark-5fold``.
        epochs: overrides ``train.epochs`` for every model.
        config_file: YAML with settings that differ from the defaults (all models).
        overrides: ``--set key=value`` items (all models).
        progress: progress bars.
        command: the command line for the footer.

    Returns:
        Path of ``TABLE.md``.
    """
    if name not in EXPERIMENTS:
        raise ConfigError(f"experiment {name!r} is not known; choose one of {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    data, out = Path(data), Path(out)
    command = command or " ".join(["covidseg", *sys.argv[1:]])
    base = load_config(config_file, list(overrides))
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"--epochs: expected a positive number, got {epochs}")
        base.train.epochs = int(epochs)
    data_cases = find_dataset(data)
    t0 = time.perf_counter()
    results: list[tuple[Row, dict[str, dict[str, Any]]]] = []
    for row in exp.rows:
        config = row_config(base, row)
        per_case: dict[str, dict[str, Any]] = {}
        for fold in folds_of(split):
            lists = resolve_split(sorted(data_cases), fold, config.train.val_cases)
            if not lists["test"]:
                raise InputError(f"split {fold!r} of {data} has no test cases; use a dataset with more cases")
            run_dir = out / "runs" / f"{row.model}-{row.input}-{fold}"
            ensure_trained(run_dir, config, data, fold, progress, command)
            test_cases = cache_cases(config, [data_cases[c] for c in lists["test"]], progress=progress)
            per_case.update(evaluate_run(run_dir, test_cases, data_cases, progress, runtime=base.runtime))
        results.append((row, per_case))
    table = build_table(name, exp, results, split, data, command, time.perf_counter() - t0, base)
    md, _ = write_table(table, out)
    return md


def _summary_row(row: Row, per_case: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"row": row.label, "model": row.model, "input": row.input, "n_cases": len(per_case),
                           "lung_mask": LUNG_MASK_GT if row.input == "lung_only" else LUNG_MASK_NONE}
    for key in METRIC_KEYS:
        scale = 100.0 if key in PERCENT_KEYS else 1.0
        m, s = mean_sd([v[key] * scale for v in per_case.values()])
        out[key], out[f"{key}_sd"] = m, s
    for key in PUBLISHED_KEYS:
        out[f"published_{key}"] = (row.published or {}).get(key)
    return out


def build_table(
    name: str, exp: Experiment, results: Sequence[tuple[Row, dict[str, dict[str, Any]]]], split: str, data: Path,
    command: str, seconds: float, base: Config,
) -> Table:
    """The :class:`Table` of an experiment from per-case results."""
    version = code_version()
    notes = [
        f"{exp.table} of the report, reproduced: {exp.title}. Binary infection mask on whole test volumes, split "
        f"`{split}`; Dice, IoU, sensitivity, precision and NSD (tolerance {NSD_TOLERANCE_MM['infection']:g} mm) in "
        "%, HD95 in mm at each scan's spacing; mean ± sample sd over test cases. `published` = the report's "
        "numbers (4 test cases of its own 14/2/4 split, which it did not publish).",
        f"Lung mask used for the lung-only input: {LUNG_MASK_GT}.",
    ]
    if _is_phantom(data):
        notes.append("**Synthetic phantoms: these numbers check the pipeline; they are not results on patients.**")
    footer = [
        f"command: `{command}`",
        f"machine: {machine_description('cuda' if _cuda() else 'cpu')}",
        f"date: {time.strftime('%Y-%m-%d %H:%M')}; wall time {seconds / 60:.1f} min (including reused runs' "
        "evaluation only)",
        f"covidseg {version['covidseg']} (git {version['git'] or 'unknown'}), torch {version['torch']}; "
        f"epochs {base.train.epochs}, patches/epoch {base.train.patches_per_epoch}, batch {base.train.batch_size}, "
        f"patch {'x'.join(map(str, base.train.patch_size))} (D x H x W), seed {base.train.seed}",
    ]
    if exp.per_case:
        row, per_case = results[0]
        rows = [{"row": cid, "model": row.model, "input": row.input, "resolution": v["resolution"],
                 "lung_mask": LUNG_MASK_GT if row.input == "lung_only" else LUNG_MASK_NONE,
                 **{k: v[k] * (100.0 if k in PERCENT_KEYS else 1.0) for k in METRIC_KEYS}}
                for cid, v in per_case.items()]
        mean_row = _summary_row(Row("mean ± sd", row.model, row.input), per_case)
        mean_row["resolution"] = ""
        rows.append(mean_row)
        columns = ["row", "model", "input", "resolution", "lung_mask", *metric_columns(METRIC_KEYS)]
        md_cols: list[tuple[str, Any]] = [("case", "row"), ("resolution (file shape)", "resolution")]
        md_cols += [(f"{k} ({'mm' if k == 'hd95' else '%'})", _ms(k)) for k in METRIC_KEYS]
        published = ["Published (report Table 4; subjects not named):", "",
                     "| subject | resolution | dice (%) | sensitivity (%) | iou (%) |", "|---|---|---|---|---|"]
        published += [f"| {s} | {r} | {d:.2f} | {se:.2f} | {i:.2f} |" for s, r, d, se, i in PUBLISHED_PER_CASE]
        extra = ["\n".join(published)]
    else:
        rows = [_summary_row(row, per_case) for row, per_case in results]
        columns = ["row", "model", "input", "lung_mask", "n_cases", *metric_columns(METRIC_KEYS),
                   *[f"published_{k}" for k in PUBLISHED_KEYS]]
        md_cols = [("model", "row"), ("input", "input"), ("cases", "n_cases")]
        md_cols += [(f"{k} ({'mm' if k == 'hd95' else '%'})", _ms(k)) for k in METRIC_KEYS]
        md_cols += [(f"published {k}", f"published_{k}") for k in PUBLISHED_KEYS]
        extra = []
    return Table(title=f"{exp.table}: {exp.title} (`covidseg experiment {name}`)", notes=notes, columns=columns,
                 md_columns=md_cols, rows=rows, extra_md=extra, footer=footer)


def _ms(key: str) -> Any:
    return lambda row: mean_sd_text(row, key)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


__all__ = ["EXPERIMENTS", "Experiment", "Row", "build_table", "evaluate_run", "folds_of", "run_experiment"]
