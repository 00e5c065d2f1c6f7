"""Progress bars: tqdm's redraws on a terminal, plain newline-terminated lines in log files and pipes."""

from __future__ import annotations

import io
import re
from pathlib import Path

from covidseg.progress import progress_bar

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "covidseg"
class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_plain_lines_not_carriage_returns():
    log = io.StringIO()
    for _ in progress_bar(range(4), desc="cache", unit="case", file=log, interval_s=0):
        pass
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("cache: 0/4 case") and lines[-1].startswith("cache: 4/4 case")
    assert all(re.match(r"cache: \d/4 case \[", line) for line in lines)


def test_plain_lines_are_rate_limited_and_carry_the_postfix():
    log = io.StringIO()
    bar = progress_bar(total=100, desc="train", unit="step", file=log)  # default interval: 30 s
    for _ in range(100):
        bar.set_postfix({"loss": "0.5"}, refresh=False)
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2  # the first line and the last one, not one per step
    assert lines[-1].startswith("train: 100/100 step") and lines[-1].endswith("loss=0.5")


def test_a_terminal_gets_tqdm_redraws():
    tty = Terminal()
    for _ in progress_bar(range(3), desc="cache", file=tty, mininterval=0):
        pass
    assert "\r" in tty.getvalue()


def test_disabled_bars_write_nothing():
    log = io.StringIO()
    for _ in progress_bar(range(3), desc="cache", file=log, disable=True):
        pass
    assert log.getvalue() == ""


def test_every_bar_of_the_package_goes_through_the_helper():
    direct = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
              if re.search(r"^\s*from tqdm(\.\w+)? import", p.read_text(encoding="utf-8"), re.M)}
    assert direct == {"progress.py"}
