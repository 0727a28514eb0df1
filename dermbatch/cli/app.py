"""The Typer app, logging set-up, and the one error translator at the CLI edge (``run_app``).

Exit codes: 0 all processed; 3 some inputs failed; 2 usage error; 1 fatal error (one ``Error: …`` line,
a traceback only with ``DERMBATCH_DEBUG=1``); 130 interrupted (Ctrl-C), 143 stopped by SIGTERM, 129 by SIGHUP.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler
from typer.core import TyperCommand

from dermbatch import __version__
from dermbatch.errors import DermbatchError


class Command(TyperCommand):
    """Plain help text: arguments by their metavar (``INPUT...``) in the usage line and the arguments list,
    options as ``--out CSV``, examples kept as written (a ``\b`` paragraph)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(param.metavar or param.name.upper())
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx, formatter) -> None:
        arguments = [(p.metavar or p.name.upper(), (p.help or "") + ("  [required]" if p.required else ""))
                     for p in self.get_params(ctx) if p.param_type_name == "argument"]
        options = [r for p in self.get_params(ctx) if p.param_type_name != "argument"
                   if (r := p.get_help_record(ctx)) is not None]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


app = typer.Typer(name="dermbatch", add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False, pretty_exceptions_show_locals=False,
                  help="Segment, crop and classify dermoscopic images in batches (ISIC 2018 classes).")
NO_WRAP_WIDTH = 10_000  # off a terminal (a log file, a pipe): lines are never wrapped or cut


def console(to_stderr: bool = False) -> Console:
    """A Rich console that wraps to the terminal's width on a terminal, and not at all elsewhere."""
    stream = sys.stderr if to_stderr else sys.stdout
    terminal = stream.isatty()
    return Console(stderr=to_stderr, width=None if terminal else NO_WRAP_WIDTH, soft_wrap=not terminal)


stderr = console(to_stderr=True)


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Log lines on stderr: Rich's on a terminal, plain unwrapped lines elsewhere."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        handler = RichHandler(console=stderr, show_time=False, show_path=False, markup=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
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
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a run's loop (a run says how far it got itself)
        print("Interrupted.", file=sys.stderr)
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
