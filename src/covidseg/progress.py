"""Progress bars: tqdm on a terminal, plain periodic lines everywhere else (log files, pipes, batch jobs).

tqdm redraws its bar with carriage returns, which a terminal overwrites in place but a log file keeps: thousands
of updates glued into one line. :func:`progress_bar` gives tqdm's bar when the stream is a terminal and otherwise
one plain, newline-terminated line (``cache: 3/6 case [00:05<00:05, 0.60 case/s]``) at most every
:data:`PLAIN_INTERVAL_S` seconds, plus the first and the last.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0
"""Seconds between two plain progress lines when the stream is not a terminal."""
PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
"""Line format without the bar (no total: tqdm leaves ``total_fmt`` as ``?``)."""
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\r")


class _LineWriter:
    """A file for tqdm that turns each redraw (``\\r`` + status) into one plain line and drops the clearing ones."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = _CONTROL.sub("", text).strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or odd stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str | None = None,
    total: float | None = None,
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
    file: IO[str] | None = None,
    interval_s: float = PLAIN_INTERVAL_S,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar over ``iterable`` on ``file`` (default stderr), as plain lines when ``file`` is not a terminal.

    Args:
        iterable, desc, total, unit, disable, leave: as tqdm's.
        file: where the bar goes (default ``sys.stderr``).
        interval_s: seconds between plain lines (not on a terminal, where tqdm redraws as usual).
        **kwargs: other tqdm arguments (``initial``, ``unit_scale``, ``postfix``...).

    Returns:
        The tqdm object (use it as an iterator, or call ``update``/``set_postfix``/``close``).
    """
    stream = file if file is not None else sys.stderr
    if is_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=leave, file=stream,
                    dynamic_ncols=True, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    return tqdm(iterable, desc=desc or "progress", total=total, unit=unit, disable=disable, leave=True,
                file=_LineWriter(stream), mininterval=interval_s, miniters=1,
                bar_format=PLAIN_FORMAT, ascii=True, **kwargs)


__all__ = ["PLAIN_INTERVAL_S", "is_terminal", "progress_bar"]
