"""Errors the user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""

    exit_code = 2


class ExportFailure(UserError):
    """The export ran but failed its own check (e.g. verification above tolerance): exit code 1."""

    exit_code = 1


class AlphaBreaksText(UserError):
    """The paper form at `alpha` makes the model stop writing text (its continuations score `ratio` times
    the unsteered perplexity, more than 1 + `margin` allows): a fold is not matched to such a reference."""

    def __init__(self, message: str, alpha: float, ratio: float, margin: float):
        super().__init__(message)
        self.alpha, self.ratio, self.margin = alpha, ratio, margin


def first_line(exc: BaseException, limit: int = 400) -> str:
    """The first non-empty line of an exception's message (at most `limit` characters), or its type."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(exc).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `timeout`, a container stop), raised by the command line's handler so that
    it unwinds like Ctrl-C: partial outputs are removed and progress is kept. Exit code 143."""

    exit_code = 143
