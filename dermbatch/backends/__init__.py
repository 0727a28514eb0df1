"""Inference backends behind a name -> constructor registry.

A backend runs every selected fold of one task on a batch and returns the stacked outputs:
``segment(x) -> (F, N, 1, H, W)`` and ``classify(x) -> (F, N, K)`` logits, float32 numpy arrays.
Engine backends (ONNX Runtime, OpenVINO, TensorRT) register here from ``engines/`` and are imported lazily.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import time
from typing import Protocol

import numpy as np

from dermbatch.bundle import Bundle
from dermbatch.errors import BackendError, UsageError

log = logging.getLogger(__name__)

# name -> "module:ClassName", imported only when chosen
BACKENDS: dict[str, str] = {
    "torch": "dermbatch.backends.torch_backend:TorchBackend",
    "onnxruntime": "engines.ort_backend:OrtBackend",
    "openvino": "engines.openvino_backend:OpenVinoBackend",
    "tensorrt": "engines.trt_backend:TrtBackend",
}


ENGINE_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "tensorrt": "TensorRT"}


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


def backend_names() -> list[str]:
    return ["auto", *BACKENDS]


def resolve_backend_name(name: str, bundle: Bundle | None = None, device: str = "auto") -> str:
    """``auto`` -> the best engine built for this bundle and device, else torch; the decision is logged.

    An explicitly named backend is never swapped for another: if it cannot run, that is an error.
    """
    if name not in ("auto", *BACKENDS):
        raise UsageError(f"unknown backend {name!r}; available: {', '.join(backend_names())}")
    if name != "auto":
        return name
    if bundle is None:
        return "torch"
    try:
        from engines.store import find_engine
        from engines.tensorrt_common import current_device, device_tag, tensorrt_available
    except ImportError as exc:  # a core-only install
        log.info("backend: torch (auto; engines package unavailable: %s)", exc)
        return "torch"
    trt_ok, reason = tensorrt_available()
    if trt_ok and device != "cpu" and find_engine(bundle, "tensorrt", None, device_tag(current_device())):
        log.info("backend: tensorrt (auto; a plan for this GPU and TensorRT is built)")
        return "tensorrt"
    if device.startswith("cuda") or (device == "auto" and _cuda_available()):
        log.info("backend: torch on CUDA (auto; no TensorRT plan for this GPU%s)", f": {reason}" if reason else "")
        return "torch"
    if find_engine(bundle, "openvino") and importlib.util.find_spec("openvino") is not None:
        log.info("backend: openvino (auto; an OpenVINO engine is built for this bundle)")
        return "openvino"
    if find_engine(bundle, "onnxruntime"):
        log.info("backend: onnxruntime (auto; an ONNX Runtime engine is built for this bundle)")
        return "onnxruntime"
    if bundle.is_installed_default and not os.environ.get("DERMBATCH_NO_AUTO_ENGINE"):
        return _build_default_engine(bundle)
    log.info("backend: torch (auto; no engine built: `dermbatch build-engine` makes one)")
    return "torch"


def _build_default_engine(bundle: Bundle) -> str:
    """First use of the installed default bundle on CPU: build its fp32 engine (OpenVINO when installed, else
    ONNX Runtime) into the per-user cache (once; about half a minute), in one log line. A failure is logged and
    the run goes on with torch."""
    start = time.perf_counter()
    try:
        from engines.build import build_first_use_engine
        from engines.store import read_info

        previous = logging.root.manager.disable
        logging.disable(logging.INFO)  # the build's own steps; the line below says what happened
        try:
            folder = build_first_use_engine(bundle)
        finally:
            logging.disable(previous)
        target = read_info(folder)["target"]
    except Exception as exc:  # any failure: say so, and run the same models with torch
        log.warning("backend: torch (auto; building the default bundle's engine failed: %s: %s)",
                    type(exc).__name__, exc)
        return "torch"
    log.info("backend: %s (auto; first use of the default bundle: built its %s fp32 engine into %s in %.0f s, "
             "reused from now on; DERMBATCH_NO_AUTO_ENGINE=1 skips this)", target, ENGINE_NAMES[target], folder,
             time.perf_counter() - start)
    return target


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def create_backend(name: str, bundle: Bundle, device: str, folds: dict[str, tuple[int, ...]],
                   **options) -> Backend:
    name = resolve_backend_name(name, bundle, device)
    module_name, _, attr = BACKENDS[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} cannot be loaded: {exc}") from None
    return cls(bundle, device=device, folds=folds, **{k: v for k, v in options.items() if v is not None})
