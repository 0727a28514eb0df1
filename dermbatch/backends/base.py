"""What every inference backend is: the ``Backend`` protocol, and the pieces the runtimes share."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from dermbatch.errors import BackendError


class Backend(Protocol):
    name: str
    device: str

    def segment(self, x: np.ndarray) -> np.ndarray: ...

    def classify(self, x: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


class TaskBackend:
    """``segment``/``classify`` over one ``_run(task, x)``; shared by every backend."""

    def _run(self, task: str, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def segment(self, x: np.ndarray) -> np.ndarray:
        return self._run("segmentation", x)

    def classify(self, x: np.ndarray) -> np.ndarray:
        return self._run("classification", x)


def fold_selection(present: tuple[int, ...], wanted: tuple[int, ...], where: str) -> list[int] | None:
    """Indices into an engine's stacked fold outputs for ``wanted``; None when it is all of them, in order."""
    missing = sorted(set(wanted) - set(present))
    if missing:
        raise BackendError(f"{where}: holds folds {present}, not {missing}; rebuild it with those folds")
    return None if tuple(wanted) == tuple(present) else [present.index(f) for f in wanted]
