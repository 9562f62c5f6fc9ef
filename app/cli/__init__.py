"""The `crosspatch` command line: one typer app; each command group lives in its own module.

Errors a user can cause (bad flags, bad files, bad models) print one line and exit non-zero;
`--debug` (or CROSSPATCH_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import click
import typer

from engine.errors import CrosspatchError

cli = typer.Typer(
    name="crosspatch",
    help="First-divergence cross-patching of PT/IT pairs and sparse-feature mediation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    """Import the command modules; each adds its commands to `cli`."""
    from app.cli import run_cmd  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script: run the CLI and turn user errors into one-line messages."""
    _register_commands()
    debug = os.environ.get("CROSSPATCH_DEBUG") == "1"
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args.remove("--debug")
        debug = True
    try:
        cli(args=args, prog_name="crosspatch", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print("crosspatch: aborted", file=sys.stderr)
        sys.exit(130)
    except click.UsageError as e:
        if debug:
            raise
        print(f"crosspatch: error: {e.format_message()}  (see 'crosspatch --help')", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as e:
        if debug:
            raise
        print(f"crosspatch: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code or 1)
    except (CrosspatchError, FileNotFoundError) as e:
        if debug:
            raise
        print(f"crosspatch: error: {e}", file=sys.stderr)
        sys.exit(1)
