"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeatable ``--set section.key=value``."""
    p.add_argument("--config", type=str, default=None, metavar="FILE",
                   help="YAML file holding only the settings that differ from the defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set train.epochs=5 (repeatable)")


def formatter() -> type[argparse.HelpFormatter]:
    return argparse.ArgumentDefaultsHelpFormatter
