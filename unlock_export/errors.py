"""Errors the user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""

    exit_code = 2


class ExportFailure(UserError):
    """The export ran but failed its own check (e.g. verification above tolerance): exit code 1."""

    exit_code = 1
