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
seconds; ``force=True`` (``--force``) starts over. The demo's settings (:class:`DemoSettings`) shrink the report's
setting to what learns in a few minutes on 2 CPU cores: smaller phantoms (``scale`` 0.25), a narrower and shallower
network (width 8, 3 poolings) with every component of the final model (FV attention, PASPP, deep supervision),
16 x 64 x 64 patches, Adam at 1e-3 and half of each batch centred on infection; the step budget is fixed, so a run
is deterministic. See ``docs/demo.md``.

**Phantoms are not patients.** Every number the demo prints checks the pipeline on synthetic data; none says how
well covidseg segments a patient's CT.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from covidseg.config import Config, Triple, config_to_dict
from covidseg.errors import ConfigError, InputError, OutputExistsError
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


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo makes and how it trains (the report's values are in :class:`covidseg.config.Config`).

    Attributes:
        cases: phantoms in the cohort (split 70/10/20 % into training, validation and held-out test).
        scale: phantom size factor (0.25: about 128 x 128 x 60 voxels of about 2.7 x 2.7 x 4 mm).
        style: ``mixed`` alternates coronacases-style (HU) and radiopaedia-style (pre-windowed) phantoms.
        seed: seed of the cohort and of the training run.
        model: variant (the report's final model, ``unet-fv-paspp-ds``).
        base_width: channels of the first level (report: 16).
        depth: poolings (report: 4).
        patch_size: training patch and inference window, ``(D, H, W)`` voxels (report: 8 x 128 x 128).
        batch_size: patches per step (report: 5).
        learning_rate: Adam learning rate (report: 1e-4; 1e-3 learns within the demo's few hundred steps).
        epochs: epochs; one validation pass each.
        patches_per_epoch: patches per epoch (the step budget is ``epochs * patches_per_epoch / batch_size``).
        foreground_fraction: share of each batch centred on an infection voxel (lesions are about 1 % of a
            phantom's lungs).
        num_workers: loader worker processes (0: patches are drawn in the training process, best on 2 cores).
    """

    cases: int = 10
    scale: float = 0.25
    style: str = "mixed"
    seed: int = 0
    model: str = "unet-fv-paspp-ds"
    base_width: int = 8
    depth: int = 3
    patch_size: Triple = (16, 64, 64)
    batch_size: int = 4
    learning_rate: float = 1e-3
    epochs: int = 10
    patches_per_epoch: int = 160
    foreground_fraction: float = 0.5
    num_workers: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        """A tiny demo for tests (3 small phantoms, 2 steps of a width-4 model): checks the plumbing only."""
        return cls(cases=3, scale=0.125, base_width=4, depth=2, patch_size=(16, 32, 32), batch_size=2, epochs=1,
                   patches_per_epoch=4)

    @property
    def steps(self) -> int:
        """Optimizer steps of the training run."""
        return max(1, self.patches_per_epoch // self.batch_size) * self.epochs

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def config(self, out: Path) -> Config:
        """The run's :class:`Config`: the report's defaults with the demo's changes (cache inside ``out``)."""
        from covidseg.training.trainer import model_config_for

        base = Config()
        model = dataclasses.replace(base.model, name=self.model, base_width=self.base_width, depth=self.depth)
        train = dataclasses.replace(
            base.train, target="infection", input="lung_only", patch_size=self.patch_size,
            batch_size=self.batch_size, learning_rate=self.learning_rate, epochs=self.epochs,
            patches_per_epoch=self.patches_per_epoch, foreground_fraction=self.foreground_fraction,
            num_workers=self.num_workers, seed=self.seed, loader_benchmark_batches=0,
            cache_dir=str((out / CACHE_DIR).resolve()),
        )
        inference = dataclasses.replace(base.inference, window=self.patch_size)
        return model_config_for(dataclasses.replace(base, model=model, train=train, inference=inference))


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


# ------------------------------------------------------------------------------------------------ folder


def check_out_dir(out: Path, settings: DemoSettings, force: bool) -> None:
    """Refuse an ``out`` that is a file, a non-empty non-demo folder, or a demo made with other settings.

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
    if not force and record.get("settings") != settings.to_dict():
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


def ensure_cohort(folder: Path, settings: DemoSettings, progress: bool) -> bool:
    """Write the phantom cohort unless all its files are there. Returns True when it was (re)written."""
    from covidseg.phantom import cohort_plan, write_cohort

    plan = cohort_plan(folder, settings.cases, settings.style)
    if all(p.is_file() for f in plan for p in f.all()):
        return False
    write_cohort(folder, settings.cases, settings.seed, settings.style, scale=settings.scale, force=True,
                 progress=progress)
    return True


def ensure_trained(run_dir: Path, config: Config, data: Path, progress: bool) -> bool:
    """Train the demo model into ``run_dir`` unless a complete run is there (an interrupted one is resumed).

    Returns:
        True when steps were trained now, False when the finished run was reused.
    """
    from covidseg.training.trainer import CONFIG_FILE, run_progress, train

    state = run_progress(run_dir)
    if state is not None and state["complete"] and (run_dir / "best.pt").is_file():
        return False
    command = "covidseg demo"
    if (run_dir / CONFIG_FILE).is_file():
        train(run_dir, data=data, split=SPLIT, resume=True, progress=progress, command=command)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a run folder without its config never started training
        train(run_dir, config=config, data=data, split=SPLIT, progress=progress, command=command)
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
    per_case = evaluate_run(run_dir, cached, dataset, progress=progress)
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
                log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """Segment one phantom CT with the ``segment`` pipeline; compare with the phantom's own masks.

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
    results = segment(case.ct, out_dir, options, config, log=log)
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


def run_demo(out: Path | str = DEFAULT_OUT, settings: DemoSettings | None = None, force: bool = False,
             progress: bool = True, log: Callable[[str], None] | None = None) -> DemoResult:
    """Make a phantom cohort, train the full model briefly, evaluate it, and segment one held-out phantom.

    Args:
        out: the demo folder (created if missing; an earlier demo's cohort and checkpoint in it are reused).
        settings: cohort and training settings; default :class:`DemoSettings` ().
        force: remove what an earlier demo wrote into ``out`` and start over (retrains).
        progress: progress bars (stderr).
        log: where step messages go (default: stderr).

    Returns:
        A :class:`DemoResult`.

    Raises:
        InputError: ``out`` is a file or a non-demo folder.
        OutputExistsError: ``out`` holds a demo with other settings and ``force`` is false.
    """
    settings = settings or DemoSettings()
    out = Path(out)
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if settings.cases < 3:
        raise ConfigError(f"demo cases {settings.cases}: the demo needs at least 3 (train, validation, held-out)")
    check_out_dir(out, settings, force)
    if force:
        clear_demo(out)
    out.mkdir(parents=True, exist_ok=True)
    config = settings.config(out)
    record: dict[str, Any] = {"note": PHANTOM_NOTE, "status": "running", "settings": settings.to_dict(),
                              "config": config_to_dict(config)}
    _write_record(out, record)
    timings: dict[str, float] = {}
    data, run_dir = out / PHANTOM_DIR, out / RUN_DIR
    checkpoint = run_dir / "best.pt"

    t = time.perf_counter()
    say(f"[1/5] phantom cohort: {settings.cases} {settings.style} synthetic cases at scale {settings.scale:g} "
        f"-> {data}")
    made = ensure_cohort(data, settings, progress)
    if not made:
        say("      reusing the cohort of an earlier demo run")
    timings["cohort_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"[2/5] training {settings.model} (width {settings.base_width}, {settings.depth} poolings, patch "
        f"{'x'.join(map(str, settings.patch_size))}, {settings.steps} steps of {settings.batch_size} patches) "
        f"-> {run_dir}")
    trained = ensure_trained(run_dir, config, data, progress)
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
    report, reference, pipeline_metrics = segment_one(data, case_id, checkpoint, config, segment_dir, say)
    timings["segment_s"] = time.perf_counter() - t
    say("[5/5] done")

    result = DemoResult(out=out, trained=trained, checkpoint=checkpoint, evaluation=evaluation,
                        segmented_case=case_id, segment_dir=segment_dir, report=report, reference=reference,
                        pipeline_metrics=pipeline_metrics, timings=timings)
    record.update({
        "status": "done", "trained_now": trained, "checkpoint": str(checkpoint),
        "held_out": test_ids, "evaluation_mean": evaluation["mean"], "segmented_case": case_id,
        "segment_dir": str(segment_dir), "pipeline_metrics": pipeline_metrics,
        "percent_involved": {k: report["lungs"][k]["percent"] for k in ("left", "right", "both")},
        "reference_percent_involved": {k: reference[k]["percent"] for k in ("left", "right", "both")},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    })
    _write_record(out, record)
    return result


def summary_text(result: DemoResult, settings: DemoSettings | None = None) -> str:
    """The demo's closing summary (stdout): the table, where the files are, the headline numbers."""
    settings = settings or DemoSettings()
    rep, ref = result.report["lungs"], result.reference
    seg = result.segment_dir
    window = "x".join(map(str, settings.patch_size))
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
    "DEFAULT_OUT", "DemoResult", "DemoSettings", "check_out_dir", "evaluation_table", "run_demo", "summary_text",
]
