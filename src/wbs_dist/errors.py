"""Exceptions that map to the exit statuses of DESIGN 3.1.

Code raises these for problems a user can fix; the CLI turns them into a one-line message and an
exit status, never a traceback.
"""


class WbsError(Exception):
    """Base class: a problem reported to the user without a traceback (exit 1)."""

    exit_code = 1


class UsageError(WbsError):
    """Bad command line, bad config value, bad input file contents the user must fix (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config key that is unknown, mistyped or out of range. The message names the key."""


class InputError(UsageError):
    """An input file (CSV, PNG, YAML, ...) that cannot be used; the message names file, row, column."""


# Exit statuses (DESIGN 3.1).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SKIPPED = 3
