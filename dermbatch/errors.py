"""Typed exceptions. Messages say what is wrong and how to fix it; the CLI prints them as one line."""

from __future__ import annotations


class DermbatchError(Exception):
    """Base class of every error dermbatch raises on purpose."""

    exit_code = 1


class UsageError(DermbatchError):
    """The command line or API call asks for something impossible (exit code 2)."""

    exit_code = 2


class BundleError(DermbatchError):
    """A model bundle is missing, malformed, tampered with or inconsistent."""


class BackendError(DermbatchError):
    """An inference backend cannot be used on this machine (missing package, device, engine)."""


class ImageError(DermbatchError):
    """One input image cannot be read; the batch goes on without it."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class OutputError(DermbatchError):
    """An output cannot be written (permissions, disk full, locked by another run)."""
