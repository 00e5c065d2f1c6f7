"""`covidseg train`: train one model (infection, lungs or both) into a run folder; `--resume` continues it."""

from __future__ import annotations

import argparse

from covidseg.cli._common import add_config_args

EPILOG = """\
Defaults are the report's (Table 1): patch 8x128x128 (D x H x W = the report's 128x128x8), batch 5, Adam 1e-4,
200 epochs, loss 0.5 BCE + Dice with deep supervision, input "lung only" (the CT outside the ground-truth lung
mask set to air; `segment` makes its own lungs at inference). An epoch is train.patches_per_epoch patches (250);
a third of each batch is centred on foreground (train.foreground_fraction). The run folder gets config.yaml,
run.json, metrics.csv, last.pt and best.pt (best validation Dice). Where it runs is the runtime section
(--device, --set runtime.num_workers=N, runtime.cache_dir=DIR, runtime.amp=bf16). 3D variants only: the 2D ones
(*-2d, --config 2d) train on CT slices with `covidseg semiseg train`.

examples:
  covidseg train --data COVID-19-CT-Seg --out runs/final
  covidseg train --data DIR --out runs/unet --set model.name=unet --set train.epochs=50
  covidseg train --data DIR --out runs/lungs --target lung
  covidseg train --data phantoms --out runs/phantom --config demo   # the demo's small model (a preset)
  covidseg train --resume runs/final                    # after a crash or kill -9: same end, same steps
  torchrun --standalone --nproc_per_node 4 -m covidseg train --data DIR --out runs/ddp   # DDP, batch = global
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (the report's defaults); --resume continues an interrupted run",
        description="Train the 3D U-Net (+FV, +PASPP, +DS) on a CT dataset folder (Zenodo, Kaggle or nnU-Net "
                    "layout).", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", type=str, default=None, metavar="DIR",
                   help="dataset folder (optional with --resume: the run remembers it)")
    p.add_argument("--out", type=str, default=None, metavar="RUN", help="new run folder")
    p.add_argument("--resume", type=str, default=None, metavar="RUN",
                   help="continue the run in this folder with its own settings")
    add_config_args(p)
    p.add_argument("--target", choices=("infection", "lung", "joint"), default=None,
                   help="infection (1 channel, the report's), lung (left, right) or joint (left, right, infection); "
                        "default: train.target = infection")
    p.add_argument("--split", type=str, default=None,
                   help="report (14/2/4 on the real 20 cases), benchmark-fold-K (K = 0..4; validation carved from "
                        "the training cases), few-shot; default report")
    p.add_argument("--epochs", type=int, default=None, help="shortcut for --set train.epochs=N")
    p.add_argument("--device", type=str, default=None, help="auto, cpu, cuda, cuda:N (runtime.device)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from covidseg.config import load_config
    from covidseg.errors import UserError
    from covidseg.training.trainer import train

    command = " ".join(["covidseg", *sys.argv[1:]])
    if args.resume:
        if args.config or args.overrides or args.target or args.epochs or args.device:
            raise UserError("--resume keeps the run's own settings; drop --config/--set/--target/--epochs/--device "
                            "(or start a new run with --out)")
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise UserError(f"--resume {args.resume} continues that folder; drop --out {args.out}")
        result = train(args.resume, data=args.data, split=args.split, resume=True, progress=not args.quiet,
                       command=command)
    else:
        if not args.out or not args.data:
            raise UserError("give --data DIR and --out RUN (or --resume RUN to continue a run)")
        overrides = list(args.overrides)
        if args.target:
            overrides.append(f"train.target={args.target}")
        if args.epochs is not None:
            overrides.append(f"train.epochs={args.epochs}")
        if args.device:
            overrides.append(f"runtime.device={args.device}")
        config = load_config(Path(args.config) if args.config else None, overrides)
        result = train(args.out, config=config, data=args.data, split=args.split, progress=not args.quiet,
                       command=command)
    from covidseg.runtime import process_rank

    if process_rank().is_main:
        print(f"{result.run_dir}: step {result.step}/{result.total_steps}, best validation Dice "
              f"{result.best_dice:.4f} (epoch {result.best_epoch}); weights in {result.run_dir / 'best.pt'}")
    return 0
