"""`covidseg semiseg`: 2D training and evaluation on COVID-SemiSeg slices (Imgs/N.jpg + GT/N.png)."""

from __future__ import annotations

import argparse
from pathlib import Path

from covidseg.cli._common import formatter
from covidseg.config import FLIP_TTA

DESCRIPTION = """\
The report's network in 2D mode on the expert-labelled COVID-SemiSeg slices (Fan et al., Inf-Net, IEEE TMI 2020;
MedSeg). A data folder holds Imgs/N.jpg and GT/N.png (optional GT-multiclass/N.png), paired by file stem.

  covidseg semiseg train --data ../shared/data/covid-semiseg/train --out runs/semiseg
  covidseg semiseg train --data ../shared/data/covid-semiseg/train --pseudo ../shared/data/covid-semiseg/pseudo \
      --out runs/semi --pretrain-epochs 27 --pretrain-size 192 --size 256 --base-width 8 --epochs 15 --lr 5e-4 \
      --flip-tta all --amp bf16      # the shipped model's recipe (semi-supervised)
  covidseg semiseg evaluate --checkpoint default --data DIR [--json result.json]

'mean_dice_infnet' is Inf-Net's own "mean Dice": per image, min-max normalise the probability map, average the
Dice over the 256 thresholds 1, 254/255, ..., 0 (Dice 0 when no true positive), then average over images.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("semiseg", help="2D training/evaluation on COVID-SemiSeg slices (Inf-Net's metric)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: _usage(p))
    ssub = p.add_subparsers(dest="semiseg_command", metavar="ACTION")

    t = ssub.add_parser(
        "train", formatter_class=formatter(),
        help="k-fold cross-validation over the slices, then a final model on all of them",
        description="Train the 2D network (report's loss 0.5 BCE + Dice, Adam, slice augmentation) with k-fold "
                    "cross-validation for model choice, then a final model on every slice. Writes RUN/cv.json, "
                    "RUN/config.json and RUN/final.pt. With --pseudo, semi-supervised as Semi-Inf-Net: the network "
                    "first trains on the pseudo-labelled slices alone (never scored), then every fold and the final "
                    "model fine-tune it with pseudo-labelled slices mixed into each batch. Every stage keeps its "
                    "state in RUN/state/: the same command, rerun after a kill, continues where it stopped. On 2 "
                    "CPU cores one step of 8 slices at 352x352 takes about 5-10 s, so the defaults (5 folds x 150 "
                    "epochs + final) are for a GPU; use --epochs 1 --folds 2 for a CPU smoke test.",
    )
    t.add_argument("--data", required=True, help="folder with Imgs/ and GT/ (e.g. covid-semiseg/train)")
    t.add_argument("--out", required=True, help="run folder to create (must not hold a run unless --force)")
    t.add_argument("--folds", type=int, default=5, help="cross-validation folds (0 = skip cross-validation)")
    t.add_argument("--variant", default="unet-fv-paspp-ds-2d",
                   help="2D variant: unet-2d, unet-fv-se-2d, unet-fv-paspp-2d, unet-fv-paspp-ds-2d, ...")
    t.add_argument("--epochs", type=int, default=150, help="epochs per model (one epoch ~ every slice once)")
    t.add_argument("--batch-size", type=int, default=8, help="slices per batch")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (polynomial decay)")
    t.add_argument("--base-width", type=int, default=16, help="channels of the first level")
    t.add_argument("--size", type=int, default=352,
                   help="slices are resized to SIZE x SIZE pixels (a multiple of 16; Inf-Net used 352)")
    t.add_argument("--seed", type=int, default=0, help="seed of folds, weights, batch order and augmentation")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision (auto: bf16/fp16 on CUDA, off on CPU)")
    t.add_argument("--flip-tta", nargs="?", const="lr", default="off", choices=list(FLIP_TTA),
                   help="test-time mirroring of the scores and the saved model: lr (the bare flag) averages the "
                        "left-right mirror's logits in, all also the top-bottom mirror and both (default: off)")
    t.add_argument("--no-final", action="store_true", help="skip the final model on all slices")
    t.add_argument("--force", action="store_true",
                   help="start again in a run folder that holds a run (its results and saved states are replaced)")
    t.add_argument("--save-every-s", type=float, default=300.0,
                   help="seconds between two saves of the training state in RUN/state/")
    g = t.add_argument_group("semi-supervised (pseudo-labelled slices)")
    g.add_argument("--pseudo", default=None,
                   help="folder of pseudo-labelled slices (Imgs/Data-1_<case>_<k>.jpg + GT/, e.g. "
                        "covid-semiseg/pseudo): a stage on them alone, then mixed into every batch")
    g.add_argument("--pretrain-epochs", type=int, default=27, help="epochs of the stage on pseudo-labelled slices")
    g.add_argument("--pretrain-lr", type=float, default=1e-3, help="its Adam learning rate (polynomial decay)")
    g.add_argument("--pretrain-size", type=int, default=None,
                   help="its slice size, when lower than --size (progressive resizing; default: --size)")
    g.add_argument("--pseudo-per-batch", type=int, default=4,
                   help="pseudo-labelled slices in each batch of the folds and the final model")
    t.add_argument("--augment-noise", type=float, default=0.0, metavar="P",
                   help="probability of white noise on a training slice (a noisier scan; 0 = off)")
    t.add_argument("--augment-kernel", type=float, default=0.0, metavar="P",
                   help="probability of a sharper or softer reconstruction kernel on a training slice (an unsharp "
                        "mask; 0 = off)")
    t.set_defaults(func=run_train)

    e = ssub.add_parser(
        "evaluate", formatter_class=formatter(),
        help="score a checkpoint on a folder of slices (Inf-Net mean Dice, Dice@0.5, IoU, ...)",
        description="Predict every slice of --data with the checkpoint (resized to its training size, the "
                    "logits resized back to each GT's size), score it and write JSON with n_images, "
                    "mean_dice_infnet, dice_at_0_5, iou, sensitivity, specificity, precision and one row per "
                    "image (with --json; the table is always printed).",
    )
    e.add_argument("--checkpoint", required=True,
                   help="a .pt written by 'semiseg train', or 'default' for the model shipped with covidseg")
    e.add_argument("--data", required=True, help="folder with Imgs/ and GT/")
    e.add_argument("--json", default=None, help="also write the scores and one row per image to this JSON file "
                   "(written atomically)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.set_defaults(func=run_evaluate)


def _usage(p: argparse.ArgumentParser) -> int:
    from covidseg.errors import UserError

    raise UserError("give an action: 'covidseg semiseg train ...' or 'covidseg semiseg evaluate ...' "
                    "(see covidseg semiseg --help)")


def run(args: argparse.Namespace) -> int:
    """Dispatch (kept for the CLI convention; sub-actions set their own ``func``)."""
    return int(args.func(args))


def run_train(args: argparse.Namespace) -> int:
    import json
    import sys

    from covidseg import __version__
    from covidseg.config import AugmentConfig, SemisegConfig
    from covidseg.errors import ConfigError, OutputExistsError
    from covidseg.io.atomic import atomic_write_text
    from covidseg.runtime import resolve_device
    from covidseg.semiseg.data import load_folder, load_pseudo_folder
    from covidseg.semiseg.train import (
        cross_validate,
        pretrain,
        pretrain_config,
        pseudo_stacks,
        save_semiseg_checkpoint,
        train_final,
    )
    from covidseg.training.slices import build_model

    out = Path(args.out)
    work = out / "state"
    finished = (out / "final.pt").exists() or (args.no_final and (out / "cv.json").exists())
    if finished and not args.force:
        raise OutputExistsError(f"{out}: already holds a finished run (final.pt / cv.json); use another --out or "
                                "--force")
    if args.force:  # start again: no stage resumes from the replaced run, no old result stays beside the new ones
        _remove_states(work)  # (only files this command writes are removed)
        for name in ("cv.json", "cv.partial.json", "final.pt"):
            (out / name).unlink(missing_ok=True)
    semi = args.pseudo is not None
    if semi and args.pretrain_epochs < 1:
        raise ConfigError(f"--pretrain-epochs {args.pretrain_epochs}: expected at least 1 with --pseudo")
    cfg = SemisegConfig(variant=args.variant, epochs=args.epochs, batch_size=args.batch_size,
                        learning_rate=args.lr, base_width=args.base_width, size=(args.size, args.size),
                        folds=args.folds, seed=args.seed, amp=args.amp, device=args.device, flip_tta=args.flip_tta,
                        pretrain_epochs=args.pretrain_epochs if semi else 0, pretrain_lr=args.pretrain_lr,
                        pretrain_size=(args.pretrain_size, args.pretrain_size) if semi and args.pretrain_size
                        else None, pseudo_per_batch=args.pseudo_per_batch if semi else 0,
                        augment=AugmentConfig(p_noise=args.augment_noise, p_kernel=args.augment_kernel))
    for flag, value in (("--augment-noise", args.augment_noise), ("--augment-kernel", args.augment_kernel)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{flag} {value:g}: a probability must lie in [0, 1]")
    build_model(cfg)  # validate the variant and sizes before reading data
    build_model(pretrain_config(cfg))
    device = resolve_device(cfg.device)
    slices = load_folder(args.data)
    pseudo_slices = load_pseudo_folder(args.pseudo) if semi else []
    record = {"covidseg_version": __version__, "data": str(Path(args.data).resolve()), "n_images": len(slices),
              "pseudo": str(Path(args.pseudo).resolve()) if semi else None, "n_pseudo": len(pseudo_slices),
              "device": str(device), "config": cfg.to_dict()}
    if work.is_dir() and not args.force:  # an unfinished run: continue it, with the same data and settings only
        before = _read_record(out / "config.json")
        same = ("data", "n_images", "pseudo", "n_pseudo", "config")
        if before is None or any(before.get(k) != record[k] for k in same):
            raise OutputExistsError(f"{out}: holds an unfinished run with other data or settings (config.json); "
                                    "rerun its own command to continue it, or use another --out or --force")
        sys.stderr.write(f"{out}: continuing the unfinished run in it\n")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(record, indent=2) + "\n")
    init, pseudo = None, None
    if semi:
        pseudo_pretrain, pseudo = pseudo_stacks(pseudo_slices, cfg)
        init = pretrain(pseudo_pretrain, cfg, device, state_path=work / "pretrain.state.pt",
                        save_every_s=args.save_every_s)
    if cfg.folds:
        folds_done: list[dict] = []

        def on_fold(fold: dict) -> None:
            folds_done.append(fold)
            m = fold["metrics"]
            sys.stderr.write(f"fold {fold['fold'] + 1}/{cfg.folds}: mean Dice (Inf-Net) "
                             f"{m['mean_dice_infnet']:.4f}, Dice@0.5 {m['dice_at_0_5']:.4f} "
                             f"({fold['seconds']:.0f} s)\n")
            atomic_write_text(out / "cv.partial.json", json.dumps({"folds": folds_done}, indent=2) + "\n")

        cv = cross_validate(slices, cfg, device, on_fold=on_fold, init=init, pseudo=pseudo, work_dir=work,
                            save_every_s=args.save_every_s)
        atomic_write_text(out / "cv.json", json.dumps(cv, indent=2) + "\n")
        (out / "cv.partial.json").unlink(missing_ok=True)
        m, s = cv["mean"], cv["sd"]
        print(f"{cfg.variant}: {cfg.folds}-fold CV mean Dice (Inf-Net) {m['mean_dice_infnet']:.4f} "
              f"+- {s['mean_dice_infnet']:.4f}, Dice@0.5 {m['dice_at_0_5']:.4f} +- {s['dice_at_0_5']:.4f}")
    if not args.no_final:
        model = train_final(slices, cfg, device, init=init, pseudo=pseudo, state_path=work / "final.state.pt",
                            save_every_s=args.save_every_s)
        path = save_semiseg_checkpoint(out / "final.pt", model, cfg, n_train=len(slices),
                                       n_pseudo=len(pseudo_slices), data=str(Path(args.data).resolve()))
        print(f"final model on all {len(slices)} slices: {path}")
    return 0


def _remove_states(work: Path) -> None:
    """Delete the saved stages of a run (``*.state.pt``, ``fold<k>.json``) from ``work``, then ``work`` if empty."""
    import re

    if not work.is_dir():
        return
    for path in work.iterdir():
        if path.is_file() and (path.name.endswith(".state.pt") or re.fullmatch(r"fold\d+\.json", path.name)):
            path.unlink()
    try:
        work.rmdir()
    except OSError:  # something else is in it: keep it
        pass


def _read_record(path: Path) -> dict | None:
    """A run folder's ``config.json``, or ``None`` when missing or unreadable."""
    import json

    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run_evaluate(args: argparse.Namespace) -> int:
    from covidseg.semiseg.evaluate import evaluate_folder, format_table, write_json

    result = evaluate_folder(args.checkpoint, args.data, device=args.device)
    if args.json:
        write_json(result, args.json)
    print(f"{result['variant']} ({result['checkpoint']}) on {result['data']}")
    print(format_table(result))
    if args.json:
        print(f"written: {args.json}")
    return 0
