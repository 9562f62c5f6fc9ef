"""The `crosspatch` command line: one typer app; each command group lives in its own module.

Errors a user can cause (bad flags, bad files, bad models) print one line and exit non-zero;
`--debug` (or CROSSPATCH_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import typer

try:  # typer >= 0.20 vendors click as typer._click; older releases use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    from typer.exceptions import Abort, Exit
except ImportError:  # pragma: no cover
    from click.exceptions import Abort, ClickException, Exit, UsageError

    NoArgsIsHelpError = UsageError

from crosspatch.engine.errors import CrosspatchError

cli = typer.Typer(
    name="crosspatch",
    help="First-divergence cross-patching of PT/IT pairs and sparse-feature mediation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@cli.callback()
def _root() -> None:
    """First-divergence cross-patching of PT/IT pairs and sparse-feature mediation."""


def _register_commands() -> None:
    """Import the command modules; each adds its commands to `cli`."""
    from crosspatch.app.cli import (  # noqa: F401
        admin_cmd,
        cache_cmd,
        client_cmd,
        demo_cmd,
        dict_cmd,
        feature_cmd,
        lineage_cmd,
        mediate_cmd,
        recipe_cmd,
        run_cmd,
        serve_cmd,
        summarize_cmd,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script: run the CLI and turn user errors into one-line messages."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _register_commands()
    debug = os.environ.get("CROSSPATCH_DEBUG") == "1"
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args.remove("--debug")
        debug = True
    try:
        cli(args=args, prog_name="crosspatch", standalone_mode=False)
    except NoArgsIsHelpError:
        sys.exit(0)
    except Exit as e:
        sys.exit(e.exit_code)
    except Abort:
        print("crosspatch: aborted", file=sys.stderr)
        sys.exit(130)
    except UsageError as e:
        if debug:
            raise
        print(f"crosspatch: error: {e.format_message()}  (see 'crosspatch --help')", file=sys.stderr)
        sys.exit(2)
    except ClickException as e:
        if debug:
            raise
        print(f"crosspatch: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code or 1)
    except (CrosspatchError, FileNotFoundError) as e:
        if debug:
            raise
        print(f"crosspatch: error: {e}", file=sys.stderr)
        sys.exit(1)
