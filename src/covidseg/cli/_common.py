"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import textwrap


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE|PRESET`` and repeatable ``--set section.key=value``."""
    p.add_argument("--config", type=str, default=None, metavar="FILE",
                   help="YAML file holding only the settings that differ from the defaults, or the name of a preset "
                        "(report, demo, 2d: src/covidseg/configs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set train.epochs=5 (repeatable)")


DESCRIPTION_WIDTH = 112
"""Width of the descriptions written in the source (the lines of ``DESCRIPTION`` strings)."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Options with their defaults; descriptions as written (their examples keep their own lines), except a
    one-line description longer than :data:`DESCRIPTION_WIDTH`, which is wrapped to it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines: list[str] = []
        for line in text.splitlines():
            if len(line) > DESCRIPTION_WIDTH:
                lines.extend(textwrap.wrap(line, DESCRIPTION_WIDTH, initial_indent=indent, subsequent_indent=indent))
            else:
                lines.append(indent + line)
        return "\n".join(lines)


def formatter() -> type[argparse.HelpFormatter]:
    return _Formatter
