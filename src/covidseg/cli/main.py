"""The ``covidseg`` console script: one entry point, one module per subcommand.

Each sibling module defines ``add_parser(subparsers)`` (arguments and help) and a ``run(args)`` function that
calls the library; heavy imports happen inside ``run`` so that ``covidseg --help`` is instant.

Exit codes (see :mod:`covidseg.errors`): 0 success, 2 bad input or usage (one line on stderr, no traceback),
1 internal error (traceback and a hint to report it), 130 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from collections.abc import Sequence

from covidseg import __version__
from covidseg.cli import data, demo, experiment, export, model, phantom, segment, semiseg, train
from covidseg.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USER, UserError

COMMANDS = (demo, phantom, data, model, train, experiment, segment, semiseg, export)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the docs and the tests)."""
    parser = argparse.ArgumentParser(
        prog="covidseg",
        description=(
            "COVID-19 infection and lung segmentation in chest CT: a 3D U-Net with Feature Variation attention, "
            "Progressive ASPP and deep supervision. Start with `covidseg demo`."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"covidseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def fail(message: str, code: int = EXIT_USER) -> None:
    """Print ``covidseg: error: message`` on stderr and exit with ``code``."""
    sys.stderr.write(f"covidseg: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: parse, dispatch, and turn exceptions into exit codes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(EXIT_USER if argv is None and len(sys.argv) <= 1 else EXIT_USER)
    try:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    except ValueError:  # not in the main thread
        pass
    try:
        code = args.func(args)
    except UserError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("covidseg: interrupted; nothing incomplete was left looking complete\n")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except MemoryError:
        fail("out of memory; use a smaller window (--set inference.window=...) or a machine with more RAM")
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.stderr.write(
            "covidseg: internal error (a bug). Please report it, with the traceback above, at "
            "https://github.com/covidseg/covidseg/issues\n"
        )
        raise SystemExit(EXIT_INTERNAL) from None
    raise SystemExit(int(code or 0))
