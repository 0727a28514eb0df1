"""Entry point: wires the command modules into the app (``dermbatch.cli.app``) and runs it."""

from __future__ import annotations

import sys

from dermbatch.cli import engine, models, run, screen, train  # noqa: F401  (each module registers its commands)
from dermbatch.cli.app import run_app


def main(argv: list[str] | None = None) -> int:
    return run_app(argv)


def entry_point() -> None:
    sys.exit(main())
