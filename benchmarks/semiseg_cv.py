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

With ``--pseudo DIR`` (Inf-Net's 1,600 pseudo-labelled slices, ``Imgs/Data-1_<case>_<k>.jpg`` + ``GT/``) the
protocol is semi-supervised, as Semi-Inf-Net's: each variant is first trained on the pseudo-labelled slices alone
(``--pretrain-epochs``, at ``--pretrain-size`` when given; they are never held out nor scored, so one pretrained
model starts every fold), then each
fold fine-tunes it on its 40 expert slices with ``--pseudo-per-batch`` pseudo-labelled slices mixed into every
batch, and the final model does the same on all 50. ``--epochs`` must then be a number. Every stage keeps its
state under ``OUT/state/<variant>/`` (saved every ``--save-every-s`` seconds; finished folds as JSON): the same
command, rerun after a kill, continues where it stopped.

Needs torch, numpy, pillow, scipy and covidseg (MONAI, tqdm optional)::

    python benchmarks/semiseg_cv.py --data ../shared/data/covid-semiseg/train --out out/semiseg --device cuda
    python benchmarks/semiseg_cv.py --data ../shared/data/covid-semiseg/train --out /tmp/s \\
        --device cpu --epochs 1 --folds 2 --variants unet-2d --size 64 --base-width 4     # CPU smoke test
    OMP_NUM_THREADS=2 python benchmarks/semiseg_cv.py --data ../shared/data/covid-semiseg/train \
        --pseudo ../shared/data/covid-semiseg/pseudo --out out/semiseg-pseudo --device cpu \
        --variants unet-fv-paspp-ds-2d --size 256 --pretrain-size 192 --base-width 8 --epochs 15 --lr 5e-4 \
        --pretrain-epochs 27 --pseudo-per-batch 4 --flip-tta all --deadline-s 100000 --save-every-s 240 \
        --no-progress --amp bf16 --augment-noise 0.3 --augment-kernel 0.3   # the shipped model (2 cores, 31-60 min)
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
from _stamp import commit_or_unknown

from covidseg.config import FLIP_TTA, AugmentConfig, SemisegConfig, flip_tta_name
from covidseg.io.atomic import atomic_write_text
from covidseg.losses import LOSSES
from covidseg.runtime import resolve_device
from covidseg.semiseg.data import load_folder, resize_stack
from covidseg.semiseg.train import VARIANTS_2D, cross_validate, make_folds, save_semiseg_checkpoint
from covidseg.training.slices import train_model

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


FLIP_TTA_WORDS = {"off": "no flip TTA", "lr": "flip TTA on (left-right mirror)",
                  "all": "flip TTA on (left-right, top-bottom and both mirrors of the image)"}
"""How the tables name each ``--flip-tta``."""


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
    p.add_argument("--no-final", action="store_true", help="cross-validation only: no final model on all slices")
    g = p.add_argument_group("semi-supervised (with --pseudo)")
    g.add_argument("--pseudo", help="folder of pseudo-labelled slices (Imgs/Data-1_<case>_<k>.jpg + GT/): "
                                    "pretrain on them, then mix them into every training batch of each fold")
    g.add_argument("--pretrain-epochs", type=int, default=3, help="epochs on the pseudo-labelled slices alone")
    g.add_argument("--pretrain-lr", type=float, default=1e-3)
    g.add_argument("--pretrain-size", type=int, default=None,
                   help="train the pseudo-label stage at this size (square) and the rest at --size "
                        "(progressive resizing; default: --size)")
    g.add_argument("--pseudo-per-batch", type=int, default=4,
                   help="pseudo-labelled slices in each batch of the labelled stage (of --batch-size)")
    g.add_argument("--flip-tta", nargs="?", const="lr", default="off", choices=list(FLIP_TTA),
                   help="predict with mirrors averaged in: lr (the bare flag) the left-right mirror, all also the "
                        "top-bottom mirror and both (default: off)")
    p.add_argument("--scales", default="1",
                   help="comma-separated resize factors of the labelled stage's batches, one drawn per batch "
                        "(Inf-Net: 0.75,1,1.25); 1 = every batch at --size")
    p.add_argument("--soup", type=int, default=1,
                   help="train this many models per fold and for the final model, from the same start with "
                        "other seeds, and average their weights into one (a model soup; 1 = one model)")
    p.add_argument("--dice-per-slice", action="store_true",
                   help="the labelled stage's soft Dice per slice, averaged over the batch (default: over the batch)")
    p.add_argument("--loss", default="bce-dice", choices=list(LOSSES),
                   help="the labelled stage's loss: bce-dice (the report's 0.5 BCE + Dice) or structure (Inf-Net's "
                        "border-weighted BCE + IoU per slice); the pseudo-label stage keeps bce-dice")
    g.add_argument("--pretrain-dice-per-slice", action="store_true",
                   help="the same for the pseudo-label stage")
    p.add_argument("--augment-noise", type=float, default=0.0, metavar="P",
                   help="probability of white noise on a training slice (AugmentConfig.p_noise; 0 = off)")
    p.add_argument("--augment-kernel", type=float, default=0.0, metavar="P",
                   help="probability of a sharper or softer reconstruction kernel (AugmentConfig.p_kernel; 0 = off)")
    g.add_argument("--relabel", type=int, default=0, metavar="N",
                   help="rounds of self-training: after the labelled stage its model relabels the pseudo-labelled "
                        "slices and the stage runs again from the same start on those labels (0 = off)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="end the labelled stage with the moving average of its weights at this decay (0 = off)")
    g.add_argument("--save-every-s", type=float, default=300.0,
                   help="seconds between saves of the training state (a rerun of the command resumes)")
    return p.parse_args(argv)


def parse_scales(text: str) -> tuple[float, ...]:
    """``--scales 0.75,1,1.25`` as a tuple of floats (checked by the trainer)."""
    from covidseg.errors import ConfigError

    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"--scales {text!r}: expected comma-separated numbers, e.g. 0.75,1,1.25") from None


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
        + (f" ({report['device_name']})" if report.get("device_name") else "") + ". Mean ± sd over folds.",
        f"Measured at the code of `{str(report.get('commit'))[:7]}` ({report.get('commit')}), "
        f"{report.get('machine')}, {report.get('date')}.",
        *([f"Pseudo-labelled slices: {report['n_pseudo']} (`{report['pseudo']}`), pretraining "
           f"{s['config']['pretrain_epochs']} epochs at lr {s['config']['pretrain_lr']:g}"
           + (f" and {s['config']['pretrain_size'][0]}x{s['config']['pretrain_size'][1]} px"
              if s['config'].get('pretrain_size') else "") + ", then "
           f"{s['config']['pseudo_per_batch']} of every {s['batch_size']} slices per batch; "
           f"{FLIP_TTA_WORDS[flip_tta_name(s['config']['flip_tta'])]}. Held-out folds hold expert slices only."]
          if report.get("pseudo") else []),
        *([f"Labelled stage: batches resized by one of {', '.join(f'{f:g}' for f in s['config']['scales'])} "
           "at random (multi-scale training)."] if list(s["config"].get("scales", [1.0])) != [1.0] else []),
        *([f"Augmentation also draws white noise (p {s['config']['augment']['p_noise']:g}) and a sharper or softer "
           f"reconstruction kernel (p {s['config']['augment']['p_kernel']:g}) per slice, in every stage."]
          if s["config"].get("augment", {}).get("p_noise") or s["config"].get("augment", {}).get("p_kernel")
          else []),
        *(["Labelled stage: Inf-Net's loss (border-weighted BCE + IoU per slice) instead of 0.5 BCE + Dice."]
          if s["config"].get("loss", "bce-dice") != "bce-dice" else []),
        *([f"Self-training: {s['config']['relabel']} round(s) in which the labelled stage's model relabels the "
           "pseudo-labelled slices and the stage is trained again from the same start on those labels."]
          if s["config"].get("relabel") else []),
        *([f"Labelled stage ends with the moving average of its weights (decay {s['config']['ema_decay']:g})."]
          if s["config"].get("ema_decay") else []),
        *([f"Labelled stage: {s['config']['soup']} models from the same start (other seeds), their weights "
           "averaged into one (model soup)."] if s["config"].get("soup", 1) > 1 else []),
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


def choose_epochs(args: argparse.Namespace, base: SemisegConfig, slices: list, device: torch.device,
                  progress: bool, report: dict[str, Any], t_start: float) -> int:
    """``--epochs`` as given, or (``auto``) the largest count that fits the protocol into ``--budget-s``."""
    if args.epochs != "auto":
        return int(args.epochs)
    n = len(slices)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
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
    report["calibration"] = {"seconds_per_epoch": per_epoch, "train_slices": train_n,
                             "budget_s": args.budget_s, "spent_before_cv_s": round(spent, 1)}
    return int(min(args.max_epochs, max(args.min_epochs, budget / (cost * EVAL_MARGIN))))


def print_console(text: str) -> None:
    """Print ``text``; characters the console cannot show (``±`` on an ASCII terminal) become ``?``."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, errors="replace").decode(encoding, errors="replace"), flush=True)


def log_line(stage: str, t_start: float) -> Any:
    """A per-epoch logger printing one plain line (no progress bar characters, fit for a log file)."""
    def log(rec: dict[str, Any]) -> None:
        fold = f" fold {rec['fold'] + 1}" if "fold" in rec else ""
        fold += f" relabel {rec['relabel']}" if "relabel" in rec else ""
        print(f"[{stage}{fold}] epoch {rec['epoch']} step {rec['step']}: loss {rec['loss']:.4f}, "
              f"lr {rec['lr']:.2e} ({rec['seconds']:.0f} s, t={time.perf_counter() - t_start:.0f} s)", flush=True)
    return log


def new_report(args: argparse.Namespace, argv: list[str] | None, slices: list, pseudo_slices: list,
               device: torch.device) -> dict[str, Any]:
    """The report's header: data, machine, code version, date, command, folds, published numbers."""
    from covidseg.training.trainer import code_version, machine_description

    n = len(slices)
    report: dict[str, Any] = {
        "benchmark": "semiseg_cv", "data": str(Path(args.data).resolve()), "n_images": n,
        "pseudo": str(Path(args.pseudo).resolve()) if args.pseudo else None, "n_pseudo": len(pseudo_slices),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "machine": machine_description(device), "threads": torch.get_num_threads(), "code": code_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": commit_or_unknown()[0],
        "command": "python benchmarks/semiseg_cv.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__, "python": platform.python_version(),
        "folds_test": [[slices[i].name for i in f] for f in make_folds(n, args.folds, args.seed)],
        "infnet_published_test_split": INFNET_PUBLISHED, "variants": {}, "chosen": None, "final": None,
        "notes": "CV on the 50 expert-labelled training slices; Inf-Net's numbers are on their 48-slice test split "
                 "(a different protocol). Slices of one patient may fall in different folds (no patient ids).",
    }
    report["config"] = {"command": report["command"], **{k: v for k, v in vars(args).items() if k != "out"}}
    if args.pseudo:
        report["notes"] += (" Pseudo-labelled slices are in the training folds only, never held out or scored; "
                            "their labels were made by Semi-Inf-Net, a model trained on these 50 expert slices, "
                            "so the held-out slices are not fully unseen.")
    return report


def main(argv: list[str] | None = None) -> int:
    from covidseg.errors import ConfigError
    from covidseg.semiseg.data import load_pseudo_folder
    from covidseg.semiseg.train import pretrain, pseudo_stacks, summarize_cv

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
    pseudo_slices = load_pseudo_folder(args.pseudo) if args.pseudo else []
    if args.pseudo and args.epochs == "auto":
        raise ConfigError("--pseudo needs --epochs N (the timing of --epochs auto covers labelled slices only)")
    base = SemisegConfig(size=(args.size, args.size), base_width=args.base_width, batch_size=args.batch_size,
                         learning_rate=args.lr, folds=args.folds, seed=args.seed, amp=args.amp,
                         device=str(device), flip_tta=args.flip_tta,
                         pretrain_epochs=args.pretrain_epochs if args.pseudo else 0,
                         pretrain_lr=args.pretrain_lr,
                         pretrain_size=(args.pretrain_size, args.pretrain_size) if args.pseudo and args.pretrain_size
                         else None, pseudo_per_batch=args.pseudo_per_batch if args.pseudo else 0,
                         scales=parse_scales(args.scales), ema_decay=args.ema, soup=args.soup,
                         batch_dice=not args.dice_per_slice, pretrain_batch_dice=not args.pretrain_dice_per_slice,
                         loss=args.loss, relabel=args.relabel if args.pseudo else 0,
                         augment=AugmentConfig(p_noise=args.augment_noise, p_kernel=args.augment_kernel))
    report = new_report(args, argv, slices, pseudo_slices, device)
    def write() -> None:
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        atomic_write_text(out / "semiseg_cv.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "semiseg_cv.md", markdown(report))

    epochs = choose_epochs(args, base, slices, device, progress, report, t_start)
    base.epochs = epochs
    report["settings"] = {"epochs": epochs, "batch_size": args.batch_size, "size": list(base.size),
                          "lr": args.lr, "base_width": args.base_width, "seed": args.seed, "folds": args.folds,
                          "amp": args.amp, "config": base.to_dict()}
    print(f"[plan] {len(variants)} variants x {args.folds} folds + final, {epochs} epochs each"
          + (f", after {base.pretrain_epochs} epochs on {len(pseudo_slices)} pseudo-labelled slices"
             if args.pseudo else ""), flush=True)
    write()
    pseudo_pretrain, pseudo = pseudo_stacks(pseudo_slices, base) if pseudo_slices else (None, None)
    pretrained: dict[str, dict[str, torch.Tensor] | None] = {}

    def past_deadline() -> bool:
        return time.perf_counter() - t_start > args.deadline_s

    # ---- (pretraining and) cross-validation of each variant
    for v in variants:
        cfg = SemisegConfig(**{**base.__dict__, "variant": v})
        work = out / "state" / v if args.pseudo else None
        partial: list[dict[str, Any]] = []

        def on_fold(fold: dict[str, Any], v: str = v, partial: list = partial) -> None:
            partial.append(fold)
            m = fold["metrics"]
            print(f"[cv] {v} fold {fold['fold'] + 1}/{args.folds}: mean Dice (Inf-Net) "
                  f"{m['mean_dice_infnet']:.4f}, Dice@0.5 {m['dice_at_0_5']:.4f} ({fold['seconds']:.1f} s, "
                  f"t={time.perf_counter() - t_start:.0f} s)", flush=True)
            report["variants"][v] = {**summarize_cv(v, partial), "complete": False}
            write()

        try:
            init = None
            if pseudo_pretrain is not None and work is not None and cfg.pretrain_epochs > 0:
                init = pretrain(pseudo_pretrain, cfg, device, progress=progress, log=log_line(f"pretrain {v}", t_start),
                                state_path=work / "pretrain.state.pt", save_every_s=args.save_every_s)
            pretrained[v] = init
            res = cross_validate(slices, cfg, device, progress=progress, on_fold=on_fold, should_stop=past_deadline,
                                 init=init, pseudo=pseudo, work_dir=work, save_every_s=args.save_every_s,
                                 log=log_line(f"cv {v}", t_start) if args.pseudo else None)
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
    if not args.no_final:
        train_and_save_final(args, report, slices, base, chosen, device, progress, pseudo, pretrained.get(chosen),
                             t_start)
        write()
    print_console(markdown(report))
    print(f"[done] {time.perf_counter() - t_start:.0f} s; results in {out}", flush=True)
    return 0


def train_and_save_final(args: argparse.Namespace, report: dict[str, Any], slices: list, base: SemisegConfig,
                         chosen: str, device: torch.device, progress: bool,
                         pseudo: tuple[torch.Tensor, torch.Tensor] | None,
                         init: dict[str, torch.Tensor] | None, t_start: float) -> None:
    """Train ``chosen`` on all labelled slices (from ``init``, with ``pseudo`` mixed in) and save it in fp16."""
    from covidseg.semiseg.train import train_final

    out = Path(args.out)
    n = len(slices)
    try:
        cfg = SemisegConfig(**{**base.__dict__, "variant": chosen})
        t0 = time.perf_counter()
        state = out / "state" / chosen / "final.state.pt" if pseudo is not None else None
        model = train_final(slices, cfg, device, progress=progress, init=init, pseudo=pseudo, state_path=state,
                            save_every_s=args.save_every_s,
                            log=log_line(f"final {chosen}", t_start) if pseudo is not None else None)
        seconds = time.perf_counter() - t0
        cv = report["variants"].get(chosen, {})
        data = "COVID-SemiSeg train (50 expert-labelled slices, Fan et al. 2020 / MedSeg)"
        if pseudo is not None:
            data += (f" + {report['n_pseudo']} slices of the 20 Zenodo cases (Ma et al.) with Semi-Inf-Net's "
                     "pseudo labels")
        path = save_semiseg_checkpoint(
            out / "semiseg-2d.pt", model, cfg, n_train=n, n_pseudo=report["n_pseudo"],
            train_seconds=round(seconds, 1), device=report["machine"], cv_mean=cv.get("mean", {}),
            cv_sd=cv.get("sd", {}), data=data, command=report["command"], code=report["code"])
        size_mb = path.stat().st_size / 1e6
        report["final"] = {"variant": chosen, "epochs": cfg.epochs, "seconds": seconds, "path": str(path),
                           "size_mb": size_mb, "under_limit": size_mb <= MAX_WEIGHTS_MB}
        print(f"[final] {chosen}: {seconds:.1f} s, {path} ({size_mb:.2f} MB)", flush=True)
    except Exception as exc:
        traceback.print_exc()
        report["final"] = {"variant": chosen, "error": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    from covidseg.errors import UserError

    try:
        raise SystemExit(main())
    except UserError as exc:  # bad data or settings: one line naming the file or option, exit code 2
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
