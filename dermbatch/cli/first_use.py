"""The first-use hook the ``run`` and ``evaluate`` commands hand to the backend registry.

On CPU, the first ``--backend auto`` run of the installed default bundle builds its fp32 engine (OpenVINO when
installed, else ONNX Runtime) into the per-user cache, once (about half a minute), in one log line. A
failure is logged and the run goes on with torch. Processes sharing the cache (Ray actors on one node) build
one at a time; the ones that waited use what the first built. The builder (``engines/``) is imported here,
lazily: the registry itself never builds anything.
"""

from __future__ import annotations

import importlib.util
import logging
import time

from dermbatch.backends.store import ENGINE_NAMES, build_lock, find_engine, read_info
from dermbatch.bundle import Bundle

log = logging.getLogger("dermbatch.backends")  # the registry's logger: the line reads as its decision


def build_default_engine(bundle: Bundle) -> str | None:
    """Build the default bundle's first-use engine; its target, or None (torch) when that failed."""
    start = time.perf_counter()
    try:
        from engines.build import build_first_use_engine

        with build_lock(bundle):
            wanted = "openvino" if importlib.util.find_spec("openvino") is not None else "onnxruntime"
            if find_engine(bundle, wanted, "fp32"):  # built by another process while this one waited
                log.info("backend: %s (auto; its engine was just built by another process)", wanted)
                return wanted
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
        return None
    log.info("backend: %s (auto; first use of the default bundle: built its %s fp32 engine into %s in %.0f s, "
             "reused from now on; DERMBATCH_NO_AUTO_ENGINE=1 skips this)", target, ENGINE_NAMES[target], folder,
             time.perf_counter() - start)
    return target
