"""`covidseg model info`: every named variant with its parameter count and FLOPs per voxel."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from covidseg.cli._common import formatter

_DESCRIPTION = """\
Inspect the network family (report Tables 2 and 3; docs/model.md).

  info   every named variant and its 2D twin: parameters and FLOPs per voxel of one forward pass
         (deep-supervision heads off, as at inference), counted by torch.utils.flop_counter.FlopCounterMode
         on a patch of --patch D H W (2D twins use H W).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model", help="list the network variants with their size and cost", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    info = msub.add_parser(
        "info", help="parameters and FLOPs/voxel of every named variant", formatter_class=formatter(),
        description="Print every named variant and its 2D twin with parameter count and FLOPs per voxel "
                    "(forward pass, heads off), measured by a FLOP counter on the meta device (no compute).",
    )
    info.add_argument("--patch", nargs=3, type=int, default=[8, 128, 128], metavar=("D", "H", "W"),
                      help="patch size (slices, rows, columns) the cost is measured on; 2D twins use H W")
    info.add_argument("--base-width", type=int, default=None, help="channels of the first level (default: config's)")
    info.add_argument("--depth", type=int, default=None, help="number of poolings (default: config's)")
    info.add_argument("--slice-poolings", type=int, default=None,
                      help="how many poolings also halve the slice axis (default: config's)")
    info.add_argument("--markdown", action="store_true", help="print a Markdown table (as in docs/model.md)")
    info.set_defaults(func=run)
    p.set_defaults(func=_usage(p))


def _usage(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``covidseg model`` without an action: print the help and exit 2."""

    def show(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    return show


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from covidseg.config import ModelConfig
    from covidseg.models.flops import measure_all
    from covidseg.models.registry import describe

    base = ModelConfig()
    changes = {k: v for k, v in (("base_width", args.base_width), ("depth", args.depth),
                                 ("slice_poolings", args.slice_poolings)) if v is not None}
    base = dataclasses.replace(base, **changes)
    patch = (int(args.patch[0]), int(args.patch[1]), int(args.patch[2]))
    costs = measure_all(patch, base)
    header = ("variant", "dims", "parameters", "GFLOP/patch", "kFLOP/voxel", "description")
    rows = [
        (c.name, f"{c.spatial_dims}D", f"{c.params:,}", f"{c.flops / 1e9:.2f}", f"{c.flops_per_voxel / 1e3:.1f}",
         describe(c.name))
        for c in costs
    ]
    print(f"base_width {base.base_width}, depth {base.depth}, slice_poolings {base.slice_poolings}; "
          f"patch {'x'.join(map(str, patch))} (D x H x W; 2D: H x W); FLOPs of one forward pass, heads off")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] * len(header)) + "|")
        for r in rows:
            print("| " + " | ".join((f"`{r[0]}`", *r[1:])) + " |")
        return 0
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    right = {2, 3, 4}
    for line in (header, *rows):
        print("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip())
    return 0
