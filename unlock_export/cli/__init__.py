"""The `unlock-export` command line. Exit codes: 0 ok, 1 failure, 2 bad input, 130 interrupted.

The commands only parse, call the library and print; each module registers its commands on the group.
"""

from __future__ import annotations

import errno
import logging
import sys

import click

from ..errors import UserError, first_line
from . import export, measure, method, tools  # noqa: F401  (they register their commands)
from .app import cli

__all__ = ["cli", "main"]


def main(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="unlock-export", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {first_line(exc)}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see --help)", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
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
