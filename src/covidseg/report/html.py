"""``report.html``: one self-contained page (the overview PNG inlined as base64) with the report's tables."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:72em}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #bbb;padding:.3em .7em;text-align:right}th{background:#eee}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%}.note{color:#555;font-size:.9em}"
)


def render_html(report: dict[str, Any], png: Path | str, path: Path | str) -> Path:
    """Write ``path`` (atomically): the involvement table, the settings, and the picture ``png`` inlined.

    Args:
        report: the ``report.json`` content (see :mod:`covidseg.inference.pipeline`).
        png: the overview picture.
        path: the ``.html`` to write.
    """
    from covidseg.io.atomic import atomic_write_text

    image = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    rows = []
    for name in ("left", "right", "both"):
        e = report["lungs"][name]
        rows.append(
            f"<tr><td>{name}</td><td>{e['lung_ml']:.1f}</td><td>{e['infection_ml']:.1f}</td>"
            f"<td>{e['percent']:.2f}</td><td>{e['severity_score']} ({html.escape(e['severity'])}, "
            f"{html.escape(e['severity_band'])})</td></tr>"
        )
    esc = html.escape
    info = [
        ("input", report["input"]),
        ("spacing (mm, D x H x W)", " x ".join(f"{s:.3g}" for s in report["spacing_mm"])),
        ("shape (D x H x W)", " x ".join(map(str, report["shape"]))),
        ("model", f"{report['model']['name']} ({report['model']['checkpoint']})"),
        ("lungs", report["lung_method"]),
        ("infection predicted outside the lungs (clipped)", f"{report['infection_outside_lungs_ml']:.1f} mL"),
        ("run time", f"{report['run_time_s']:.1f} s"),
        ("versions", ", ".join(f"{k} {v}" for k, v in report["versions"].items())),
    ]
    info_rows = "".join(f"<tr><td>{esc(k)}</td><td style='text-align:left'>{esc(str(v))}</td></tr>" for k, v in info)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>covidseg report: {esc(report['case'])}</title>
<style>{_STYLE}</style></head><body>
<h1>covidseg report: {esc(report['case'])}</h1>
<p class="note">Automatic segmentation for research; not a diagnosis.</p>
<table><tr><th>lung</th><th>lung (mL)</th><th>infection (mL)</th><th>involved (%)</th><th>severity</th></tr>
{''.join(rows)}</table>
<p class="note">Severity: {esc(report['severity_source'])}.</p>
<img alt="overview: axial slices and a coronal view with lung and infection outlines"
 src="data:image/png;base64,{image}">
<table>{info_rows}</table>
</body></html>
"""
    path = Path(path)
    atomic_write_text(path, page)
    return path
