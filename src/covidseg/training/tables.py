"""Writing the report's tables: ``TABLE.md`` (for people) and ``TABLE.csv`` (for programs), atomically."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covidseg.io.atomic import atomic_write_text

PERCENT_KEYS = ("dice", "iou", "sensitivity", "precision", "nsd")
"""Metrics shown in percent (fractions x 100); ``hd95`` stays in mm."""


@dataclasses.dataclass
class Table:
    """A table of results.

    Attributes:
        title: first heading of TABLE.md.
        notes: lines under the title (what was measured, units, the lung mask used).
        columns: CSV column names, in order.
        md_columns: ``(header, csv column or callable(row) -> str)`` pairs shown in TABLE.md.
        rows: one mapping per row (values: numbers, text or ``None``).
        extra_md: markdown blocks after the table (e.g. the published per-case table).
        footer: lines at the end (command, machine, date, version).
    """

    title: str
    notes: list[str]
    columns: list[str]
    md_columns: list[tuple[str, Any]]
    rows: list[dict[str, Any]]
    extra_md: list[str] = dataclasses.field(default_factory=list)
    footer: list[str] = dataclasses.field(default_factory=list)


def fmt(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals, ``-`` for missing/NaN, text unchanged."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def mean_sd_text(row: dict[str, Any], key: str, digits: int = 2) -> str:
    """``"mean ± sd"`` of ``row[key]`` and ``row[key + '_sd']`` (just the value when there is no sd)."""
    sd = row.get(f"{key}_sd")
    if sd is None or (isinstance(sd, float) and math.isnan(sd)):
        return fmt(row.get(key), digits)
    return f"{fmt(row.get(key), digits)} ± {fmt(sd, digits)}"


def to_markdown(table: Table) -> str:
    """The whole TABLE.md text."""
    lines = [f"# {table.title}", ""]
    lines += [*table.notes, ""] if table.notes else []
    headers = [h for h, _ in table.md_columns]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for row in table.rows:
        cells = [getter(row) if callable(getter) else fmt(row.get(getter)) for _, getter in table.md_columns]
        lines.append("| " + " | ".join(cells) + " |")
    for block in table.extra_md:
        lines += ["", block]
    if table.footer:
        lines += ["", "---", ""] + [f"{line}  " for line in table.footer]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The whole TABLE.csv text (numbers with 6 significant digits)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=table.columns, extrasaction="ignore")
    writer.writeheader()
    for row in table.rows:
        writer.writerow({
            k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}" if isinstance(v, float)
                else v)
            for k, v in row.items()
        })
    return buf.getvalue()


def write_table(table: Table, out_dir: Path) -> tuple[Path, Path]:
    """Write ``TABLE.md`` and ``TABLE.csv`` into ``out_dir`` (atomically); returns both paths."""
    out_dir = Path(out_dir)
    md, cs = out_dir / "TABLE.md", out_dir / "TABLE.csv"
    atomic_write_text(cs, to_csv(table))
    atomic_write_text(md, to_markdown(table))
    return md, cs


def metric_columns(keys: Sequence[str], with_sd: bool = True) -> list[str]:
    """``["dice", "dice_sd", "iou", ...]``."""
    out: list[str] = []
    for k in keys:
        out += [k, f"{k}_sd"] if with_sd else [k]
    return out
