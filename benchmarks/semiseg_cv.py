"""The COVID-SemiSeg protocol in one command: 5-fold CV of the 2D ablation, model choice, final model, tables.

On the 50 expert-labelled training slices of COVID-SemiSeg (Fan et al., Inf-Net, IEEE TMI 2020; MedSeg):

1. 5-fold cross-validation (seeded folds, ``covidseg.semiseg.train.make_folds``) of each 2D variant of the
   ablation: ``unet-2d`` (UNet), ``unet-fv-se-2d`` (+FV), ``unet-fv-paspp-2d`` (+FV+PASPP),
   ``unet-fv-paspp-ds-2d`` (+FV+PASPP+DS), every one with the same epochs, data and seeds;
2. the variant with the best cross-validated Inf-Net mean Dice is chosen (CV alone decides; no test data);
3. that variant is trained on all 50 slices and saved with fp16 weights (``OUT/semiseg-2d.pt``; copy it to
   ``src/covidseg/weights/semiseg-2d.pt`` to ship it);
4. ``OUT/semiseg_cv.json`` (every fold and slice) and ``OUT/semiseg_cv.md`` (the table) are written, and
   rewritten after every fold, so a run cut short still leaves its finished folds.

``--epochs auto`` (the default) times one epoch of each variant on the device first and picks the largest epoch
count that fits the whole protocol into ``--budget-s`` seconds of training (the same count for every variant).
A hard ``--deadline-s`` skips the folds not yet started once passed, and the final model is still trained.

Needs torch, numpy, pillow, scipy and covidseg (MONAI, tqdm optional)::

    python benchmarks/semiseg_cv.py --data ../shared/data/covid-semiseg/train --out out/semiseg --device cuda
    python benchmarks/semiseg_cv.py --data ../shared/data/covid-semiseg/train --out /tmp/s \\
        --device cpu --epochs 1 --folds 2 --variants unet-2d --size 64 --base-width 4     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

try:
    import covidseg  # noqa: F401
except ImportError:  # a plain checkout: use its src/ folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from covidseg.io.atomic import atomic_write_text
from covidseg.runtime import resolve_device
from covidseg.semiseg.data import load_folder, resize_stack
from covidseg.semiseg.train import (
    VARIANTS_2D,
    SemisegConfig,
    cross_validate,
    make_folds,
    save_semiseg_checkpoint,
    train_model,
)

INFNET_PUBLISHED = {"U-Net": 0.439, "U-Net++": 0.581, "Inf-Net": 0.682, "Semi-Inf-Net": 0.739}
"""Mean Dice on Inf-Net's 48-slice test split (Fan et al. 2020, Table 2); not the protocol run here."""
LABELS = {"unet-2d": "UNet", "unet-fv-se-2d": "+FV", "unet-fv-paspp-2d": "+FV+PASPP",
          "unet-fv-paspp-ds-2d": "+FV+PASPP+DS"}
"""Ablation row names."""
TABLE_KEYS = ("mean_dice_infnet", "dice_at_0_5", "iou", "sensitivity", "specificity", "precision")
"""Table columns."""
MAX_WEIGHTS_MB = 20.0
"""The shipped model must stay below this size."""
CALIBRATION_EPOCHS = 2
"""Epochs timed per variant for ``--epochs auto`` (after one warm-up epoch)."""
EVAL_MARGIN = 1.1
"""Budget factor for fold evaluation and bookkeeping around the timed training."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="COVID-SemiSeg folder with Imgs/ and GT/ (the 50 train slices)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--variants", default=",".join(VARIANTS_2D), help="comma-separated 2D variants")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", default="auto", help="epochs per model, or 'auto' to fit --budget-s")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="seconds of training for the whole protocol when --epochs auto")
    p.add_argument("--deadline-s", type=float, default=270.0,
                   help="after this many seconds no new fold starts (the final model is still trained)")
    p.add_argument("--min-epochs", type=int, default=5)
    p.add_argument("--max-epochs", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=352, help="training size in pixels (square)")
    p.add_argument("--base-width", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(cfg: SemisegConfig, images: torch.Tensor, masks: torch.Tensor, device: torch.device,
              progress: bool) -> float:
    """Seconds per epoch of ``cfg.variant`` on ``images`` (one warm-up epoch, then the mean of a few)."""
    warm = SemisegConfig(**{**cfg.__dict__, "epochs": 1})
    train_model(images, masks, warm, device, desc=f"warm-up {cfg.variant}", progress=progress)
    timed = SemisegConfig(**{**cfg.__dict__, "epochs": CALIBRATION_EPOCHS})
    _sync(device)
    t0 = time.perf_counter()
    train_model(images, masks, timed, device, desc=f"timing {cfg.variant}", progress=progress)
    _sync(device)
    return (time.perf_counter() - t0) / CALIBRATION_EPOCHS


def fmt(mean: float, sd: float | None = None) -> str:
    if mean is None or not math.isfinite(mean):
        return "—"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None and math.isfinite(sd) else f"{mean:.3f}"


def markdown(report: dict[str, Any]) -> str:
    """The ablation table beside Inf-Net's published numbers."""
    s = report["settings"]
    lines = [
        f"### COVID-SemiSeg, {s['folds']}-fold cross-validation on the {report['n_images']} training slices",
        "",
        f"{s['epochs']} epochs, batch {s['batch_size']}, {s['size'][0]}x{s['size'][1]} px, Adam {s['lr']:g} "
        f"(poly decay), base width {s['base_width']}, seed {s['seed']}, device {report['device']}"
        f" ({report.get('device_name', '')}). Mean ± sd over folds.",
        "",
        "| model | mean Dice (Inf-Net) | Dice@0.5 | IoU | sensitivity | specificity | precision | folds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in report["variants"].items():
        label = f"{LABELS.get(name, name)} (`{name}`)"
        if "error" in res and not res.get("folds"):
            lines.append(f"| {label} | failed: {res['error'][:60]} | | | | | | 0 |")
            continue
        cells = [fmt(res["mean"].get(k), res["sd"].get(k)) for k in TABLE_KEYS]
        mark = " **(chosen)**" if name == report.get("chosen") else ""
        lines.append(f"| {label}{mark} | " + " | ".join(cells) + f" | {len(res['folds'])}/{s['folds']} |")
    lines += ["", "Published (Inf-Net's own 48-slice test split, a different protocol):", "",
              "| model | mean Dice |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in INFNET_PUBLISHED.items()]
    final = report.get("final")
    if final:
        lines += ["", f"Final model: `{final.get('variant')}` on all {report['n_images']} slices, "
                      f"{final.get('epochs')} epochs, {final.get('seconds', 0):.0f} s, "
                      f"{final.get('size_mb', 0):.2f} MB ({final.get('path')})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    progress = not args.no_progress
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    slices = load_folder(args.data)
    n = len(slices)
    base = SemisegConfig(size=(args.size, args.size), base_width=args.base_width, batch_size=args.batch_size,
                         learning_rate=args.lr, folds=args.folds, seed=args.seed, amp=args.amp,
                         device=str(device))
    report: dict[str, Any] = {
        "benchmark": "semiseg_cv", "data": str(Path(args.data).resolve()), "n_images": n,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "python": platform.python_version(),
        "folds_test": [[slices[i].name for i in f] for f in make_folds(n, args.folds, args.seed)],
        "infnet_published_test_split": INFNET_PUBLISHED, "variants": {}, "chosen": None, "final": None,
        "notes": "CV on the 50 training slices; Inf-Net's numbers are on their 48-slice test split "
                 "(a different protocol). Slices of one patient may fall in different folds (no patient ids).",
    }

    def write() -> None:
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        atomic_write_text(out / "semiseg_cv.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "semiseg_cv.md", markdown(report))

    # ---- epochs
    if args.epochs == "auto":
        train_n = n - math.ceil(n / args.folds)
        images, masks = resize_stack(slices[:train_n], base.size)
        per_epoch = {}
        for v in variants:
            try:
                per_epoch[v] = calibrate(SemisegConfig(**{**base.__dict__, "variant": v}), images, masks, device,
                                         progress)
                print(f"[calibrate] {v}: {per_epoch[v]:.3f} s/epoch on {train_n} slices", flush=True)
            except Exception as exc:  # keep going: the variant will fail again below and be reported
                print(f"[calibrate] {v} failed: {exc}", flush=True)
        steps_cv = max(1, train_n // min(args.batch_size, train_n))
        steps_all = max(1, n // min(args.batch_size, n))
        spent = time.perf_counter() - t_start
        cost = sum(args.folds * t for t in per_epoch.values()) + max(per_epoch.values(), default=1.0) * (
            steps_all / steps_cv)
        budget = max(1.0, args.budget_s - spent)
        epochs = int(min(args.max_epochs, max(args.min_epochs, budget / (cost * EVAL_MARGIN))))
        report["calibration"] = {"seconds_per_epoch": per_epoch, "train_slices": train_n,
                                 "budget_s": args.budget_s, "spent_before_cv_s": round(spent, 1)}
    else:
        epochs = int(args.epochs)
    base.epochs = epochs
    report["settings"] = {"epochs": epochs, "batch_size": args.batch_size, "size": list(base.size),
                          "lr": args.lr, "base_width": args.base_width, "seed": args.seed, "folds": args.folds,
                          "amp": args.amp, "config": base.to_dict()}
    print(f"[plan] {len(variants)} variants x {args.folds} folds + final, {epochs} epochs each", flush=True)
    write()

    # ---- cross-validation of the ablation
    def past_deadline() -> bool:
        return time.perf_counter() - t_start > args.deadline_s

    for v in variants:
        cfg = SemisegConfig(**{**base.__dict__, "variant": v})
        partial: list[dict[str, Any]] = []

        def on_fold(fold: dict[str, Any], v: str = v, partial: list = partial) -> None:
            partial.append(fold)
            m = fold["metrics"]
            print(f"[cv] {v} fold {fold['fold'] + 1}/{args.folds}: mean Dice (Inf-Net) "
                  f"{m['mean_dice_infnet']:.4f}, Dice@0.5 {m['dice_at_0_5']:.4f} ({fold['seconds']:.1f} s, "
                  f"t={time.perf_counter() - t_start:.0f} s)", flush=True)
            from covidseg.semiseg.train import summarize_cv

            report["variants"][v] = {**summarize_cv(v, partial), "complete": False}
            write()

        try:
            res = cross_validate(slices, cfg, device, progress=progress, on_fold=on_fold, should_stop=past_deadline)
            report["variants"][v] = res
            if not res["complete"]:
                print(f"[cv] {v}: deadline reached after {len(res['folds'])} folds", flush=True)
        except Exception as exc:
            traceback.print_exc()
            report["variants"][v] = {**report["variants"].get(v, {"folds": [], "mean": {}, "sd": {}}),
                                     "error": f"{type(exc).__name__}: {exc}"}
        write()

    # ---- model choice by CV only
    scored = {v: r for v, r in report["variants"].items() if r.get("folds") and "mean_dice_infnet" in r["mean"]}
    complete = {v: r for v, r in scored.items() if r.get("complete")}
    pool = complete or scored
    chosen = max(pool, key=lambda v: pool[v]["mean"]["mean_dice_infnet"]) if pool else variants[-1]
    report["chosen"] = chosen
    report["choice_rule"] = "highest mean over folds of the Inf-Net mean Dice, among variants with all folds"
    print(f"[choice] {chosen} (CV mean Dice {pool.get(chosen, {}).get('mean', {}).get('mean_dice_infnet')})",
          flush=True)
    write()

    # ---- final model on all slices
    try:
        cfg = SemisegConfig(**{**base.__dict__, "variant": chosen})
        images, masks = resize_stack(slices, cfg.size)
        t0 = time.perf_counter()
        model = train_model(images, masks, cfg, device, seed=cfg.seed, desc=f"{chosen} final", progress=progress)
        seconds = time.perf_counter() - t0
        cv = report["variants"].get(chosen, {})
        path = save_semiseg_checkpoint(
            out / "semiseg-2d.pt", model, cfg, n_train=n, train_seconds=round(seconds, 1),
            device=report["device_name"], cv_mean=cv.get("mean", {}), cv_sd=cv.get("sd", {}),
            data="COVID-SemiSeg train (50 expert-labelled slices, Fan et al. 2020 / MedSeg)",
            command="python benchmarks/semiseg_cv.py " + " ".join(sys.argv[1:] if argv is None else argv))
        size_mb = path.stat().st_size / 1e6
        report["final"] = {"variant": chosen, "epochs": cfg.epochs, "seconds": seconds, "path": str(path),
                           "size_mb": size_mb, "under_limit": size_mb <= MAX_WEIGHTS_MB}
        print(f"[final] {chosen}: {seconds:.1f} s, {path} ({size_mb:.2f} MB)", flush=True)
    except Exception as exc:
        traceback.print_exc()
        report["final"] = {"variant": chosen, "error": f"{type(exc).__name__}: {exc}"}
    write()
    print(markdown(report))
    print(f"[done] {time.perf_counter() - t_start:.0f} s; results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
