"""The `unlock-export` command line. Exit codes: 0 ok, 1 failure, 2 bad input, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM).

The commands only parse, call the library and print; each module registers its commands on the group.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
from contextlib import contextmanager

import click

from ..errors import Terminated, UserError, first_line
from . import export, measure, method, tools  # noqa: F401  (they register their commands)
from .app import Stopped, cli

__all__ = ["cli", "main"]


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


@contextmanager
def _sigterm_unwinds():
    """While the block runs, SIGTERM raises Terminated, which unwinds like Ctrl-C (partial outputs
    removed, progress kept). A SIGTERM ignored at start stays ignored; off the main thread nothing
    changes."""
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous == signal.SIG_IGN:
            previous = None
        else:
            signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stopped(exc: BaseException) -> int:
    """Ctrl-C or SIGTERM: one line saying which, and where resumable progress was kept."""
    terminated = isinstance(exc, Terminated)
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    kept = getattr(exc, "progress_kept", None)
    tail = (f"; progress kept in '{kept}': rerun the same command with --resume to continue" if kept
            else "; partial outputs were removed")
    click.echo(f"error: {what}{tail}", err=True)
    return Terminated.exit_code if terminated else 130


def main(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    with _sigterm_unwinds():
        return _main(argv)


def _main(argv) -> int:
    try:
        cli.main(args=argv, prog_name="unlock-export", standalone_mode=False)
    except Stopped as exc:
        return _stopped(exc.interrupt)
    except UserError as exc:
        click.echo(f"error: {first_line(exc)}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see --help)", err=True)
        return 2
    except click.exceptions.Abort as exc:
        return _stopped(exc.__cause__ if isinstance(exc.__cause__, KeyboardInterrupt) else KeyboardInterrupt())
    except KeyboardInterrupt as exc:
        return _stopped(exc)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            where = f" writing '{exc.filename}'" if exc.filename else ""
            reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                      errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}[exc.errno]
            click.echo(f"error: {reason}{where}: free space or choose another output location "
                       "(nothing was written; partial files were removed)", err=True)
            return 2
        logging.getLogger("unlock_export").debug("failure", exc_info=True)
        click.echo(f"error: {type(exc).__name__}: {first_line(exc)} (rerun with --log-level debug for details)",
                   err=True)
        return 1
    except Exception as exc:  # a failure, not bad input: one line, the traceback only when asked
        logging.getLogger("unlock_export").debug("failure", exc_info=True)
        click.echo(f"error: {type(exc).__name__}: {first_line(exc)} (rerun with --log-level debug for details)",
                   err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
