"""Inference backends behind a name -> constructor registry.

A backend runs every selected fold of one task on a batch and returns the stacked outputs:
``segment(x) -> (F, N, 1, H, W)`` and ``classify(x) -> (F, N, K)`` logits, float32 numpy arrays.
Each runtime is a module of this package, imported only when chosen; the registry maps names to them and
never builds an engine. Building (``engines/``) is the job of ``dermbatch build-engine``, and of the
``first_use`` hook that the ``run`` and ``evaluate`` commands pass in for the installed default bundle.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable

from dermbatch.backends.base import Backend, TaskBackend, fold_selection
from dermbatch.backends.store import ENGINE_NAMES, find_engine, purge_changed_cache
from dermbatch.bundle import Bundle
from dermbatch.errors import BackendError, UsageError

log = logging.getLogger(__name__)

# name -> "module:ClassName", imported only when chosen
BACKENDS: dict[str, str] = {
    "torch": "dermbatch.backends.torch:TorchBackend",
    "onnxruntime": "dermbatch.backends.onnxruntime:OrtBackend",
    "openvino": "dermbatch.backends.openvino:OpenVinoBackend",
    "tensorrt": "dermbatch.backends.tensorrt:TrtBackend",
}
__all__ = ["BACKENDS", "ENGINE_NAMES", "Backend", "TaskBackend", "backend_names", "create_backend",
           "fold_selection", "resolve_backend_name"]
FirstUse = Callable[[Bundle], "str | None"]  # builds an engine on first use; returns its target, or None


def backend_names() -> list[str]:
    return ["auto", *BACKENDS]


def resolve_backend_name(name: str, bundle: Bundle | None = None, device: str = "auto",
                         first_use: FirstUse | None = None) -> str:
    """``auto`` -> the best engine built for this bundle and device, else torch; the decision is logged.
    With no engine built for the installed default bundle on CPU, ``first_use(bundle)`` (when given) may build
    one and name its target.

    An explicitly named backend is never swapped for another: if it cannot run, that is an error.
    """
    if name not in ("auto", *BACKENDS):
        raise UsageError(f"unknown backend {name!r}; available: {', '.join(backend_names())}")
    if name != "auto":
        return name
    if bundle is None:
        return "torch"
    purged = first_use is not None and purge_changed_cache(bundle)  # damaged first-use engines: built again below
    from dermbatch.backends.tensorrt import current_device, device_tag, tensorrt_available, usable_plans

    trt_ok, reason = tensorrt_available()
    if trt_ok and device != "cpu":
        here = current_device()
        found = find_engine(bundle, "tensorrt", None, device_tag(here))
        refused = usable_plans(*found, here, bundle.path) if found else None
        if found and refused is None:
            log.info("backend: tensorrt (auto; a plan for this GPU and TensorRT is built)")
            return "tensorrt"
        if refused:  # e.g. built with another TensorRT patch release: the runner would refuse it
            reason = f"its plan is not usable here: {refused}"
    if device.startswith("cuda") or (device == "auto" and _cuda_available()):
        log.info("backend: torch on CUDA (auto; no TensorRT plan for this GPU%s)", f": {reason}" if reason else "")
        return "torch"
    if purged and not os.environ.get("DERMBATCH_NO_AUTO_ENGINE"):
        return first_use(bundle) or "torch"
    if find_engine(bundle, "openvino") and importlib.util.find_spec("openvino") is not None:
        log.info("backend: openvino (auto; an OpenVINO engine is built for this bundle)")
        return "openvino"
    if find_engine(bundle, "onnxruntime"):
        log.info("backend: onnxruntime (auto; an ONNX Runtime engine is built for this bundle)")
        return "onnxruntime"
    if first_use is not None and bundle.is_installed_default and not os.environ.get("DERMBATCH_NO_AUTO_ENGINE"):
        return first_use(bundle) or "torch"  # the hook logs its decision, a failure included
    log.info("backend: torch (auto; no engine built: `dermbatch build-engine` makes one)")
    return "torch"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def create_backend(name: str, bundle: Bundle, device: str, folds: dict[str, tuple[int, ...]],
                   first_use: FirstUse | None = None, **options) -> Backend:
    name = resolve_backend_name(name, bundle, device, first_use)
    module_name, _, attr = BACKENDS[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} cannot be loaded: {exc}") from None
    return cls(bundle, device=device, folds=folds, **{k: v for k, v in options.items() if v is not None})
