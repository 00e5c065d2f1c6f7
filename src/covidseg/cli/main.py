"""The ``covidseg`` console script: one entry point, one module per subcommand.

Each sibling module defines ``add_parser(subparsers)`` (arguments and help) and a ``run(args)`` function that
calls the library; heavy imports happen inside ``run`` so that ``covidseg --help`` is instant.

Exit codes (see :mod:`covidseg.errors` and docs/reliability.md): 0 success; 2 bad input, bad usage or an
environment problem the user can fix (full disk, no write permission, no GPU) — one line on stderr, no traceback;
1 internal error (traceback and a hint to report it); 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from covidseg import __version__
from covidseg.cli import data, demo, evaluate, experiment, export, model, phantom, segment, semiseg, train
from covidseg.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USER, UserError

COMMANDS = (demo, phantom, data, model, train, experiment, segment, semiseg, export, evaluate)


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


def fail(message: str, code: int = EXIT_USER) -> NoReturn:
    """Print ``covidseg: error: message`` on stderr and exit with ``code``."""
    sys.stderr.write(f"covidseg: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_WRONG_KIND = (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG)
ENVIRONMENT_ERRNOS = _DISK_FULL + _NOT_WRITABLE + _WRONG_KIND
"""OS errors the user can fix (full disk, no permission, a file where a folder is needed): exit 2, no traceback."""


def environment_message(exc: OSError) -> str:
    """One line for an OS error of :data:`ENVIRONMENT_ERRNOS`: the path, the system's reason and the fix."""
    where = f"{exc.filename}: " if exc.filename else ""
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "OS error")
    if exc.errno in _DISK_FULL:
        fix = ("the disk is full; free some space or write to another disk (-o/--out); files being written were "
               "removed, nothing incomplete was kept")
    elif exc.errno in _NOT_WRITABLE:
        fix = "no permission to write there; choose an output folder you can write to (-o/--out)"
    else:
        fix = "a file stands where a folder is needed (or the reverse); choose another output path"
    return f"{where}{reason}; {fix}"


def run(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: parse, dispatch, and turn exceptions into exit codes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(EXIT_USER)
    previous_sigterm = None
    try:
        previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
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
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            _internal_error()
        fail(environment_message(exc))
    except SystemExit:
        raise
    except BaseException:
        _internal_error()
    finally:
        if previous_sigterm is not None:  # in-process callers (tests, notebooks) get their handler back
            signal.signal(signal.SIGTERM, previous_sigterm)
    raise SystemExit(int(code or 0))


def _internal_error() -> NoReturn:
    """Print the traceback of the exception being handled with a hint to report it; exit :data:`EXIT_INTERNAL`."""
    traceback.print_exc()
    sys.stderr.write(
        "covidseg: internal error (a bug). Please report it, with the traceback above, at "
        "https://github.com/covidseg/covidseg/issues\n"
    )
    raise SystemExit(EXIT_INTERNAL) from None
