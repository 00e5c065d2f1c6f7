"""The cross-validation's held-out slices again, as a sharper kernel or more noise would give them.

Each fold model of a finished ``benchmarks/semiseg_cv.py --pseudo`` run (its ``OUT/state/<variant>/fold<k>.state.pt``
and ``fold<k>.json``) scores its own 10 held-out expert slices of COVID-SemiSeg once as they are (which must give
the fold's own CV scores again: checked) and once per alteration of their 8-bit images:

- ``sharpen:A``: each slice plus ``A`` times its detail above a Gaussian of 1 px (an unsharp mask, the stand-in for
  a sharper reconstruction kernel of ``covidseg.phantom.perturb.sharpen``), clipped to [0, 255] and rounded to
  8-bit levels as a jpg holds them;
- ``noise:L``: white Gaussian noise of ``L`` 8-bit levels (5.3 HU a level in the window of the real-CT slices).

Prediction is the run's own (its ``--flip-tta`` mirrors); ``--flip-tta`` scores the same fold models with other
mirrors instead.

So the held-out Dice of the expert-labelled slices says whether a model still finds infection on scans with
other kernels, as the false positives of ``benchmarks/real_ct.py --sharpen`` say whether it stays quiet on normal
lungs. The altered slices keep their expert masks; the slices were windowed from their CTs before the alteration,
so this approximates a real kernel change only roughly.

Run: ``python benchmarks/semiseg_kernels.py --data ../shared/data/covid-semiseg/train --run out/semiseg-aug
--json docs/results/semiseg_kernels.json`` (under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

try:
    import covidseg  # noqa: F401
except ImportError:  # a plain checkout: use its src/ folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _stamp import write_results

from covidseg.config import FLIP_TTA, flip_tta_name

ALTERATIONS = ("none", "sharpen:2", "sharpen:3", "noise:8", "noise:15")
"""The default alterations: a moderately and a clearly sharper kernel; about 40 and 80 HU of white noise."""
REPRODUCE_TOL = 1e-6
"""The unaltered scores must equal the fold's own to this (same weights, same slices, same prediction)."""


def alter(image: np.ndarray, alteration: str, seed: int = 0) -> np.ndarray:
    """``image`` (``(H, W)`` float in [0, 1], 8-bit levels / 255) altered as ``alteration`` says, by the CT
    perturbations of ``covidseg.phantom.perturb`` applied to its levels as a one-slice volume."""
    from covidseg.phantom import perturb

    kind, _, value = alteration.partition(":")
    if kind == "none":
        return image
    levels = (np.asarray(image, dtype=np.float32) * np.float32(255.0))[None]  # (1, H, W): no value is padding
    if kind == "sharpen":
        levels = perturb.sharpen(levels, float(value))
    elif kind == "noise":
        levels = perturb.add_noise(levels, float(value), seed=seed)
    else:
        raise ValueError(f"alteration {alteration!r}: expected none, sharpen:A or noise:L")
    return (np.clip(np.round(levels[0]), 0.0, 255.0) / 255.0).astype(np.float32)


def fold_model(state_path: Path) -> tuple[Any, dict[str, Any]]:
    """The network of a fold's state file and that run's settings (a dict of ``SemisegConfig``)."""
    import torch

    from covidseg.config import SemisegConfig
    from covidseg.training.slices import build_model

    state = torch.load(state_path, map_location="cpu", weights_only=False)
    c = state["config"]
    model = build_model(SemisegConfig(variant=c["variant"], size=tuple(c["size"]), base_width=c["base_width"],
                                      depth=c["depth"]))
    model.load_state_dict(state["model"])
    return model, c


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """``--data``, ``--run`` and ``--variant``: the CV run whose fold models a script reads, and its slices."""
    p.add_argument("--data", required=True, type=Path, help="COVID-SemiSeg folder of the run (the 50 train slices)")
    p.add_argument("--run", required=True, type=Path, help="the --out folder of a finished semiseg_cv.py run")
    p.add_argument("--variant", default="unet-fv-paspp-ds-2d")


def fold_files(work: Path) -> list[Path]:
    """The ``fold<k>.json`` of a run's ``state/<variant>`` folder in fold order; none: says so on stderr."""
    folds = sorted(work.glob("fold*.json"), key=lambda f: int(f.stem[4:]))
    if not folds:
        print(f"{work}: no fold*.json; expected the --out folder of a finished semiseg_cv.py run", file=sys.stderr)
    return folds


def run_flip_tta(run: Path) -> str | None:
    """The ``--flip-tta`` a finished ``semiseg_cv.py`` run scored its folds with (its ``semiseg_cv.json``), or
    ``None`` when the run folder has no report (then each fold state's own setting is used)."""
    report = run / "semiseg_cv.json"
    if not report.is_file():
        return None
    value = json.loads(report.read_text(encoding="utf-8")).get("settings", {}).get("config", {}).get("flip_tta")
    return None if value is None else flip_tta_name(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--alterations", default=",".join(ALTERATIONS), help="comma-separated: none, sharpen:A, noise:L")
    p.add_argument("--flip-tta", default=None, choices=list(FLIP_TTA),
                   help="predict with these mirrors instead of the run's own --flip-tta (its semiseg_cv.json); "
                        "then the unaltered scores are the fold models' under it, not checked against the run's")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    import torch

    from covidseg.semiseg.data import load_folder
    from covidseg.semiseg.metric import summarize
    from covidseg.semiseg.train import predict_slices, score_slices

    work = args.run / "state" / args.variant
    folds = fold_files(work)
    if not folds:
        return 2
    run_tta = run_flip_tta(args.run)
    flip_tta = args.flip_tta or run_tta
    by_name = {s.name: s for s in load_folder(args.data)}
    alterations = [a.strip() for a in args.alterations.split(",") if a.strip()]
    if "none" not in alterations:
        alterations.insert(0, "none")
    scores: dict[str, list[dict[str, float]]] = {a: [] for a in alterations}
    settings: dict[str, Any] = {}
    for fold_file in folds:
        fold = json.loads(fold_file.read_text(encoding="utf-8"))
        model, settings = fold_model(work / f"{fold_file.stem}.state.pt")
        used_tta = flip_tta or flip_tta_name(settings["flip_tta"])
        test = [by_name[name] for name in fold["test"]]
        for a in alterations:
            altered = [dataclasses.replace(s, image=alter(s.image, a, seed=i)) for i, s in enumerate(test)]
            with torch.no_grad():  # not torch.set_grad_enabled(False): it would outlive main() in a caller
                probs = predict_slices(model, altered, tuple(settings["size"]), torch.device("cpu"),
                                       settings["amp"], flip_tta=used_tta)
            scores[a].append(summarize(score_slices(probs, altered)))
        own = fold["metrics"]["mean_dice_infnet"]
        again = scores["none"][-1]["mean_dice_infnet"]
        if (args.flip_tta in (None, run_tta)) and not math.isclose(own, again, abs_tol=REPRODUCE_TOL):
            print(f"{fold_file}: unaltered mean Dice {again:.6f}, the run's own {own:.6f}: not the run's model "
                  "or data", file=sys.stderr)
            return 1
        print(f"fold {fold['fold']}: " + ", ".join(f"{a} {scores[a][-1]['mean_dice_infnet']:.4f}"
                                                   for a in alterations), flush=True)
    rows = {}
    for a in alterations:
        per = [s["mean_dice_infnet"] for s in scores[a]]
        rows[a] = {"mean_dice_infnet": float(np.mean(per)), "sd": float(np.std(per, ddof=1)) if len(per) > 1 else 0.0,
                   "folds": per, "dice_at_0_5": float(np.mean([s["dice_at_0_5"] for s in scores[a]])),
                   "sensitivity": float(np.mean([s["sensitivity"] for s in scores[a]])),
                   "precision": float(np.mean([s["precision"] for s in scores[a]]))}
        print(f"{a:12s} mean Dice (Inf-Net) {rows[a]['mean_dice_infnet']:.3f} ± {rows[a]['sd']:.3f}  Dice@0.5 "
              f"{rows[a]['dice_at_0_5']:.3f}  sensitivity {rows[a]['sensitivity']:.3f}  precision "
              f"{rows[a]['precision']:.3f}")
    if args.json:
        write_results(args.json, {"benchmark": "semiseg_kernels", "run": str(args.run), "variant": args.variant,
                                  "augment": settings.get("augment"),
                                  "flip_tta": used_tta, "alterations": rows},
                      {"data": str(args.data), "run_command": "benchmarks/semiseg_cv.py --out " + str(args.run)})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
