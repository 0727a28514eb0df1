"""``python -m dermbatch`` == ``dermbatch``."""

from dermbatch.cli.main import entry_point

entry_point()
