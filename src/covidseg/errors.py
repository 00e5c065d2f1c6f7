"""Errors and exit codes, in one place.

Every error a user can cause is a :class:`UserError`: the CLI prints its one-line message (naming the file, what
was expected, what was found and the fix) on stderr and exits with :data:`EXIT_USER`, never with a traceback.
Anything else is a bug: the CLI prints the traceback with a hint to report it and exits with
:data:`EXIT_INTERNAL`.
"""

from __future__ import annotations

EXIT_OK = 0
"""Success."""
EXIT_INTERNAL = 1
"""An internal error (a bug): a traceback is printed with a hint to report it."""
EXIT_USER = 2
"""Bad input or usage, or an environment problem the user can fix (full disk, no write permission, no GPU): a
one-line message, no traceback (the same code argument parsing uses)."""
EXIT_INTERRUPTED = 130
"""Interrupted by Ctrl-C / SIGTERM; nothing left that looks complete."""


class CovidsegError(Exception):
    """Base class of the errors covidseg raises on purpose."""


class UserError(CovidsegError):
    """Something the user can fix: a bad file, a bad setting, a missing device.

    Args:
        message: one line naming the file or value, what was wrong and how to fix it.
    """

    exit_code = EXIT_USER


class InputError(UserError):
    """An input file or folder is missing, unreadable, corrupt or inconsistent."""


class ConfigError(UserError):
    """A configuration key does not exist or its value has the wrong type."""


class OutputExistsError(UserError):
    """The output already holds results and ``--force`` was not given."""
