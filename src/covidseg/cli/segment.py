"""`covidseg segment` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="(not yet available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidseg.errors import UserError

    raise UserError("'covidseg segment' is not available in this version yet")
