"""``covidseg demo``: the whole job on a synthetic phantom cohort, on the CPU, in a few minutes.

Five stages, everything written under one folder ``DIR`` (default ``covidseg-demo``)::

    DIR/demo.json          the demo's settings, stage timings, paths and headline numbers (written first: it
                           marks the folder as a demo folder, and last again when the demo has finished)
    DIR/phantoms/          1. a phantom cohort in the Zenodo layout (covidseg.phantom.write_cohort)
    DIR/cache/             the training cache of the preprocessed phantoms
    DIR/run/               2. a training run of the full model (config.yaml, run.json, metrics.csv, last.pt,
                              best.pt), made by covidseg.training.trainer.train, the code of ``covidseg train``
    DIR/evaluation.csv     3. infection Dice, IoU, sensitivity, precision (+ NSD, HD95) per held-out phantom
    DIR/evaluation.json       and their mean
    DIR/segment/<case>/    4. one held-out phantom CT segmented by the ``covidseg segment`` pipeline (classical
                              lungs + the trained model): lungs.nii.gz, infection.nii.gz, report.json/csv,
                              overview.png
                           5. a summary on stdout: where the files are and how much of each lung is involved

A second run reuses the cohort and the trained checkpoint (an interrupted training run is resumed), so it takes
seconds; ``force=True`` (``--force``) starts over. The demo trains with the ``demo`` preset
(``covidseg/configs/demo.yaml``, :func:`demo_config`), which shrinks the report's setting to what learns in a few
minutes on 2 CPU cores: a narrower and shallower network (width 8, 3 poolings) with every component of the final
model (FV attention, PASPP, deep supervision), 16 x 64 x 64 patches, Adam at 1e-3 and half of each batch centred on
infection; the step budget is fixed, so a run is deterministic. What only the demo has is its cohort
(:class:`DemoCohort`: 10 phantoms at ``scale`` 0.25, seeded by ``train.seed``). See ``docs/demo.md``.

**Phantoms are not patients.** Every number the demo prints checks the pipeline on synthetic data; none says how
well covidseg segments a patient's CT.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covidseg.config import Config, config_from_dict, config_to_dict, load_config
from covidseg.errors import ConfigError, InputError, OutputExistsError, UserError
from covidseg.io.atomic import atomic_write_text

DEFAULT_OUT = "covidseg-demo"
"""Default demo folder (relative to the working directory)."""
DEMO_FILE = "demo.json"
"""Marker and record of a demo folder."""
PHANTOM_DIR, CACHE_DIR, RUN_DIR, SEGMENT_DIR = "phantoms", "cache", "run", "segment"
"""Sub-folders of the demo folder; ``--force`` removes exactly these (and the evaluation files)."""
EVALUATION_CSV, EVALUATION_JSON = "evaluation.csv", "evaluation.json"
"""Per-case and mean metrics of the held-out phantoms."""
SPLIT = "report"
"""Case split of the demo cohort (70/10/20 % train/validation/test, both phantom styles in each)."""
EVAL_KEYS = ("dice", "iou", "sensitivity", "precision", "nsd", "hd95")
"""Metrics written per held-out case (fractions; ``hd95`` in mm); the first four are printed."""
PRINTED_KEYS = ("dice", "iou", "sensitivity", "precision")
PHANTOM_NOTE = "synthetic phantom, not a patient: these numbers check the pipeline, they say nothing about patients"


DEMO_PRESET = "demo"
"""The preset the demo trains with (``covidseg/configs/demo.yaml``)."""
QUICK_OVERRIDES = (
    "model.base_width=4", "model.depth=2", "train.patch_size=[16,32,32]", "inference.window=[16,32,32]",
    "train.batch_size=2", "train.epochs=1", "train.patches_per_epoch=4",
)
"""``covidseg demo --quick`` (tests): 2 steps of a width-4 model over the demo preset; checks the plumbing only."""


@dataclasses.dataclass(frozen=True)
class DemoCohort:
    """The phantom cohort the demo writes (the demo's own settings; how it trains is :func:`demo_config`).

    Attributes:
        cases: phantoms in the cohort (split 70/10/20 % into training, validation and held-out test).
        scale: phantom size factor (0.25: about 128 x 128 x 60 voxels of about 2.7 x 2.7 x 4 mm).
        style: ``mixed`` alternates coronacases-style (HU) and radiopaedia-style (pre-windowed) phantoms.
    """

    cases: int = 10
    scale: float = 0.25
    style: str = "mixed"

    @classmethod
    def quick(cls) -> DemoCohort:
        """3 small phantoms (``covidseg demo --quick``, with :data:`QUICK_OVERRIDES`)."""
        return cls(cases=3, scale=0.125)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def demo_config(out: Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The demo's run config: the ``demo`` preset, then ``overrides``; the cache inside ``out`` when given."""
    from covidseg.training.trainer import model_config_for

    config = load_config(DEMO_PRESET, list(overrides))
    if out is not None:
        config.runtime.cache_dir = str((Path(out) / CACHE_DIR).resolve())
    return model_config_for(config)


def demo_record(cohort: DemoCohort, config: Config) -> dict[str, Any]:
    """What ``demo.json`` records of how the demo was made (compared by :func:`check_out_dir`)."""
    return {"cohort": cohort.to_dict(), "config": config_to_dict(config)}


def _recorded_setting(record: dict[str, Any]) -> tuple[Any, Any]:
    """``(cohort, config without runtime)`` a ``demo.json`` recorded; also reads the single ``settings``
    mapping of the old layout (its seed is ``train.seed`` of the recorded config)."""
    cohort = record.get("cohort")
    if cohort is None and isinstance(record.get("settings"), dict):
        cohort = {k: record["settings"].get(k) for k in DemoCohort.__dataclass_fields__}
    try:
        config = config_to_dict(config_from_dict(record["config"]), runtime=False)
    except (KeyError, TypeError, UserError):
        config = None
    return cohort, config


@dataclasses.dataclass
class DemoResult:
    """What :func:`run_demo` did and where it put it."""

    out: Path
    trained: bool
    """False when the checkpoint of an earlier run was reused."""
    checkpoint: Path
    evaluation: dict[str, Any]
    """``{"cases": {case_id: metrics}, "mean": metrics}``."""
    segmented_case: str
    segment_dir: Path
    report: dict[str, Any]
    """The segmented case's ``report.json``."""
    reference: dict[str, Any]
    """Involvement computed from the phantom's own masks (the truth the report can be compared with)."""
    pipeline_metrics: dict[str, float]
    """Dice of the pipeline's lungs and infection against the phantom's masks."""
    timings: dict[str, float]
    config: Config
    """The run's config (the ``demo`` preset)."""


# ------------------------------------------------------------------------------------------------ folder


def check_out_dir(out: Path, cohort: DemoCohort, config: Config, force: bool) -> None:
    """Refuse an ``out`` that is a file, a non-empty non-demo folder, or a demo made with another cohort or model
    (another runtime, such as the device or the cache folder, is the same demo).

    Raises:
        InputError: ``out`` is a file or a folder that is not a demo folder.
        OutputExistsError: ``out`` holds a demo made with other settings and ``force`` is false.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; give a folder for the demo (it is created if missing)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    record_path = out / DEMO_FILE
    if not record_path.is_file():
        raise InputError(f"--out {out}: a non-empty folder that is not a demo folder (no {DEMO_FILE}); give a new "
                         f"or empty folder, e.g. --out {DEFAULT_OUT}")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    if not force and _recorded_setting(record) != (cohort.to_dict(), config_to_dict(config, runtime=False)):
        raise OutputExistsError(f"--out {out}: holds a demo made with other settings; add --force to start it "
                                "over, or give another --out")


def clear_demo(out: Path) -> None:
    """Remove what a demo wrote into ``out`` (only its own sub-folders and files)."""
    for name in (PHANTOM_DIR, CACHE_DIR, RUN_DIR, SEGMENT_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (EVALUATION_CSV, EVALUATION_JSON, DEMO_FILE):
        (out / name).unlink(missing_ok=True)


def _write_record(out: Path, record: dict[str, Any]) -> None:
    atomic_write_text(out / DEMO_FILE, json.dumps(record, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------------ stages


def ensure_cohort(folder: Path, cohort: DemoCohort, seed: int, progress: bool) -> bool:
    """Write the phantom cohort (seeded by ``seed``) unless all its files are there. Returns True when it was
    (re)written."""
    from covidseg.phantom import cohort_plan, write_cohort

    plan = cohort_plan(folder, cohort.cases, cohort.style)
    if all(p.is_file() for f in plan for p in f.all()):
        return False
    write_cohort(folder, cohort.cases, seed, cohort.style, scale=cohort.scale, force=True, progress=progress)
    return True


def held_out_cases(run_dir: Path) -> list[str]:
    """The test case ids the run recorded (never trained on, never used to pick the checkpoint)."""
    from covidseg.training.trainer import RUN_FILE

    record = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    test = list(record["cases"].get("test") or [])
    if not test:
        raise InputError(f"{run_dir / RUN_FILE}: the split left no held-out case; the demo needs at least 3 cases")
    return test


def evaluate(run_dir: Path, config: Config, data: Path, test_ids: list[str], progress: bool) -> dict[str, Any]:
    """Infection metrics of ``run_dir/best.pt`` on the held-out phantoms (the report's protocol: whole volumes,
    lung-only input made with the reference lung mask), per case and their mean."""
    from covidseg.metrics import mean_sd
    from covidseg.training.experiments import evaluate_run
    from covidseg.training.trainer import cache_cases, find_dataset

    dataset = find_dataset(data)
    cached = cache_cases(config, [dataset[c] for c in test_ids], progress=progress)
    per_case = evaluate_run(run_dir, cached, dataset, progress=progress, runtime=config.runtime)
    from covidseg.data.layouts import find_cases
    from covidseg.io.image import read_mask

    layout = {c.case_id: c for c in find_cases(data)}
    cases: dict[str, dict[str, Any]] = {}
    for cid in test_ids:
        cases[cid] = {k: float(per_case[cid][k]) for k in EVAL_KEYS}
        truth = layout[cid].infection
        cases[cid]["truth_voxels"] = int(np.count_nonzero(read_mask(truth))) if truth else 0
    # A phantom without infection has no Dice to speak of (0 with any false positive, 1 without): like the
    # report, whose 20 cases are all infected, the mean is over the cases with infection.
    scored = [c for c in test_ids if cases[c]["truth_voxels"] > 0] or list(test_ids)
    mean = {k: mean_sd([cases[c][k] for c in scored])[0] for k in EVAL_KEYS}
    return {"cases": cases, "mean": mean, "mean_over": scored}


def write_evaluation(out: Path, evaluation: dict[str, Any], checkpoint: Path) -> None:
    """``evaluation.csv`` (one row per case, then ``mean``) and ``evaluation.json``."""
    rows = ["case," + ",".join(EVAL_KEYS)]
    for cid, m in [*evaluation["cases"].items(), ("mean", evaluation["mean"])]:
        rows.append(cid + "," + ",".join(f"{m[k]:.4f}" for k in EVAL_KEYS))
    atomic_write_text(out / EVALUATION_CSV, "\n".join(rows) + "\n")
    record = {
        "note": PHANTOM_NOTE,
        "checkpoint": str(checkpoint),
        "protocol": "infection mask (threshold inference.threshold) on whole held-out volumes; lung-only input made "
                    "with the phantom's reference lung mask, as in the report; fractions, hd95 in mm",
        **evaluation,
    }
    atomic_write_text(out / EVALUATION_JSON, json.dumps(record, indent=2) + "\n")


def evaluation_table(evaluation: dict[str, Any]) -> str:
    """The printed table: one row per held-out phantom and the mean (values in %)."""
    ids = list(evaluation["cases"])
    width = max(len("mean"), *(len(c) for c in ids))
    head = f"{'held-out phantom':<{width}}  " + "  ".join(f"{k:>11}" for k in PRINTED_KEYS)
    lines = [head, "-" * len(head)]
    for cid, m in [*evaluation["cases"].items(), ("mean", evaluation["mean"])]:
        row = f"{cid:<{width}}  " + "  ".join(f"{100 * m[k]:10.1f}%" for k in PRINTED_KEYS)
        if m.get("truth_voxels") == 0:
            row += "  (no infection in this phantom: Dice is 0 with any false positive; not in the mean)"
        lines.append(row)
    return "\n".join(lines)


def pick_case(data: Path, test_ids: list[str]) -> str:
    """The held-out case with the most reference infection (its picture shows the most lesions)."""
    from covidseg.data.layouts import find_cases
    from covidseg.io.image import read_mask

    cases = {c.case_id: c for c in find_cases(data)}
    volumes = {}
    for cid in test_ids:
        case = cases[cid]
        volumes[cid] = int(np.count_nonzero(read_mask(case.infection))) if case.infection else 0
    return max(test_ids, key=lambda c: (volumes[c], c))


def segment_one(data: Path, case_id: str, checkpoint: Path, config: Config, out_dir: Path,
                log: Callable[[str], None], progress: bool = True
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """Segment one phantom CT with the ``segment`` pipeline (``progress``: its bar over the windows); compare with
    the phantom's own masks.

    Returns:
        ``(report, reference involvement, {"lung_dice", "infection_dice"})``.
    """
    from covidseg.data.layouts import find_cases
    from covidseg.inference.pipeline import SegmentOptions, segment
    from covidseg.io.image import read_image, read_mask
    from covidseg.metrics import binary_metrics
    from covidseg.report import involvement

    case = {c.case_id: c for c in find_cases(data)}[case_id]
    options = SegmentOptions(checkpoint=checkpoint, force=True)
    results = segment(case.ct, out_dir, options, config, log=log, progress=progress)
    report = results[0].report
    assert report is not None
    image = read_image(case.ct)
    ref_lungs = read_mask(case.lung, like=image) if case.lung else np.zeros(image.shape, np.uint8)
    ref_inf = read_mask(case.infection, like=image) if case.infection else np.zeros(image.shape, np.uint8)
    reference = involvement(ref_lungs, (ref_inf > 0) & (ref_lungs > 0), image.spacing)
    lungs = read_mask(out_dir / "lungs.nii.gz", like=image)
    infection = read_mask(out_dir / "infection.nii.gz", like=image)
    metrics = {
        "lung_dice": binary_metrics(lungs > 0, ref_lungs > 0)["dice"],
        "infection_dice": binary_metrics(infection > 0, ref_inf > 0)["dice"],
    }
    return report, reference, metrics


# ------------------------------------------------------------------------------------------------ demo


def run_demo(out: Path | str = DEFAULT_OUT, cohort: DemoCohort | None = None, config: Config | None = None,
             force: bool = False, progress: bool = True, log: Callable[[str], None] | None = None) -> DemoResult:
    """Make a phantom cohort, train the full model briefly, evaluate it, and segment one held-out phantom.

    Args:
        out: the demo folder (created if missing; an earlier demo's cohort and checkpoint in it are reused).
        cohort: the phantoms; default :class:`DemoCohort` ().
        config: how the model trains and runs; default :func:`demo_config` ``(out)`` (the ``demo`` preset, the
            cache in ``out``).
        force: remove what an earlier demo wrote into ``out`` and start over (retrains).
        progress: progress bars (stderr).
        log: where step messages go (default: stderr).

    Returns:
        A :class:`DemoResult`.

    Raises:
        InputError: ``out`` is a file or a non-demo folder.
        OutputExistsError: ``out`` holds a demo of another cohort or model and ``force`` is false.
    """
    from covidseg.training.trainer import ensure_trained, total_steps

    cohort = cohort or DemoCohort()
    out = Path(out)
    config = config or demo_config(out)
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if cohort.cases < 3:
        raise ConfigError(f"demo cases {cohort.cases}: the demo needs at least 3 (train, validation, held-out)")
    check_out_dir(out, cohort, config, force)
    if force:
        clear_demo(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"note": PHANTOM_NOTE, "status": "running", **demo_record(cohort, config)}
    _write_record(out, record)
    timings: dict[str, float] = {}
    data, run_dir = out / PHANTOM_DIR, out / RUN_DIR
    checkpoint = run_dir / "best.pt"

    t = time.perf_counter()
    say(f"[1/5] phantom cohort: {cohort.cases} {cohort.style} synthetic cases at scale {cohort.scale:g} -> {data}")
    if not ensure_cohort(data, cohort, config.train.seed, progress):
        say("      reusing the cohort of an earlier demo run")
    timings["cohort_s"] = time.perf_counter() - t

    t = time.perf_counter()
    m, tc = config.model, config.train
    say(f"[2/5] training {m.name} (width {m.base_width}, {m.depth} poolings, patch "
        f"{'x'.join(map(str, tc.patch_size))}, {total_steps(config)} steps of {tc.batch_size} patches) -> {run_dir}")
    trained = ensure_trained(run_dir, config, data, SPLIT, progress, command="covidseg demo")
    if not trained:
        say(f"      reusing the trained checkpoint {checkpoint} (add --force to train again)")
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    test_ids = held_out_cases(run_dir)
    say(f"[3/5] evaluating {checkpoint.name} on {len(test_ids)} held-out phantom(s): {', '.join(test_ids)}")
    evaluation = evaluate(run_dir, config, data, test_ids, progress)
    write_evaluation(out, evaluation, checkpoint)
    timings["evaluate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    case_id = pick_case(data, test_ids)
    segment_dir = out / SEGMENT_DIR / case_id
    say(f"[4/5] segmenting held-out phantom {case_id} (classical lungs + the trained model) -> {segment_dir}")
    report, reference, pipeline_metrics = segment_one(data, case_id, checkpoint, config, segment_dir, say, progress)
    timings["segment_s"] = time.perf_counter() - t
    say("[5/5] done")

    record.update({
        "status": "done", "trained_now": trained, "checkpoint": str(checkpoint),
        "held_out": test_ids, "evaluation_mean": evaluation["mean"], "segmented_case": case_id,
        "segment_dir": str(segment_dir), "pipeline_metrics": pipeline_metrics,
        "percent_involved": {k: report["lungs"][k]["percent"] for k in ("left", "right", "both")},
        "reference_percent_involved": {k: reference[k]["percent"] for k in ("left", "right", "both")},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    })
    _write_record(out, record)
    return DemoResult(out=out, trained=trained, checkpoint=checkpoint, evaluation=evaluation,
                      segmented_case=case_id, segment_dir=segment_dir, report=report, reference=reference,
                      pipeline_metrics=pipeline_metrics, timings=timings, config=config)


def summary_text(result: DemoResult) -> str:
    """The demo's closing summary (stdout): the table, where the files are, the headline numbers."""
    rep, ref = result.report["lungs"], result.reference
    seg = result.segment_dir
    window = "x".join(map(str, result.config.inference.window))
    lines = [
        "",
        f"covidseg demo: {PHANTOM_NOTE}.",
        "",
        f"Held-out phantoms, infection ({'trained now' if result.trained else 'reused checkpoint'}: "
        f"{result.checkpoint}; table in {result.out / EVALUATION_CSV}):",
        evaluation_table(result.evaluation),
        "",
        f"Segmented phantom {result.segmented_case} -> {seg}/",
        f"  masks:    {seg / 'lungs.nii.gz'} (1 left, 2 right), {seg / 'infection.nii.gz'}",
        f"  report:   {seg / 'report.json'}, {seg / 'report.csv'}",
        f"  picture:  {seg / 'overview.png'}",
        "  involved (synthetic phantom, not a patient):   "
        f"left {rep['left']['percent']:.1f} %, right {rep['right']['percent']:.1f} %, "
        f"both {rep['both']['percent']:.1f} % ({rep['both']['severity']})",
        "  the phantom's true involvement:                "
        f"left {ref['left']['percent']:.1f} %, right {ref['right']['percent']:.1f} %, "
        f"both {ref['both']['percent']:.1f} %",
        f"  pipeline vs the phantom's masks: lungs Dice {100 * result.pipeline_metrics['lung_dice']:.1f} %, "
        f"infection Dice {100 * result.pipeline_metrics['infection_dice']:.1f} %",
        "",
        "Segment your own CT with this model (a demo model trained on phantoms: not for patients):",
        f"  covidseg segment CT.nii.gz -o OUT --checkpoint {result.checkpoint} --set inference.window={window}",
    ]
    return "\n".join(lines)


__all__ = [
    "DEFAULT_OUT", "QUICK_OVERRIDES", "DemoCohort", "DemoResult", "check_out_dir", "demo_config", "demo_record",
    "evaluation_table", "run_demo", "summary_text",
]
