"""Inference backends behind a name -> constructor registry.

A backend runs every selected fold of one task on a batch and returns the stacked outputs:
``segment(x) -> (F, N, 1, H, W)`` and ``classify(x) -> (F, N, K)`` logits, float32 numpy arrays.
Engine backends (ONNX Runtime, TensorRT) register here from ``engines/`` and are imported lazily.
"""

from __future__ import annotations

import importlib
import logging
from typing import Protocol

import numpy as np

from dermbatch.bundle import Bundle
from dermbatch.errors import BackendError, UsageError

log = logging.getLogger(__name__)

# name -> "module:ClassName", imported only when chosen
BACKENDS: dict[str, str] = {
    "torch": "dermbatch.backends.torch_backend:TorchBackend",
}


class Backend(Protocol):
    name: str
    device: str

    def segment(self, x: np.ndarray) -> np.ndarray: ...

    def classify(self, x: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


def backend_names() -> list[str]:
    return ["auto", *BACKENDS]


def resolve_backend_name(name: str) -> str:
    """``auto`` -> the best available backend; log the decision."""
    if name == "auto":
        log.info("backend: torch (auto; no compiled engine backend in this build)")
        return "torch"
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; available: {', '.join(backend_names())}")
    return name


def create_backend(name: str, bundle: Bundle, device: str, folds: dict[str, tuple[int, ...]],
                   **options) -> Backend:
    name = resolve_backend_name(name)
    module_name, _, attr = BACKENDS[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} cannot be loaded: {exc}") from None
    return cls(bundle, device=device, folds=folds, **options)
