"""The Typer app, logging set-up, and the one error translator at the CLI edge (``run_app``).

Exit codes: 0 all processed; 3 some inputs failed; 2 usage error; 1 fatal error (one ``Error: …`` line,
a traceback only with ``DERMBATCH_DEBUG=1``); 130 interrupted.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler

from dermbatch import __version__
from dermbatch.errors import DermbatchError

app = typer.Typer(name="dermbatch", add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, pretty_exceptions_show_locals=False,
                  help="Segment, crop and classify dermoscopic images in batches (ISIC 2018 classes).")
stderr = Console(stderr=True)


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = RichHandler(console=stderr, show_time=False, show_path=False, markup=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("dermbatch", "trainer", "engines"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dermbatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Segment, crop and classify dermoscopic images in batches (ISIC 2018 classes)."""


def run_app(argv: list[str] | None = None) -> int:
    """Run the app on ``argv`` and turn what it raised into an exit code (and one ``Error:`` line)."""
    debug = os.environ.get("DERMBATCH_DEBUG") == "1"
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="dermbatch", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        stderr.print("Aborted.")
        return 130
    except KeyboardInterrupt:
        stderr.print("Interrupted; rows written so far are kept (continue with --resume).")
        return 130
    except DermbatchError as exc:
        if debug:
            raise
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()  # option-parsing errors (Click's, vendored by Typer): usage line + message
            return exc.exit_code
        if debug:
            raise
        print(f"Error: unexpected {type(exc).__name__}: {exc} (set DERMBATCH_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
