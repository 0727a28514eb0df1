"""OpenVINO backend (CPU): the stacked-folds graph compiled by OpenVINO, in fp32 or bf16.

On Intel CPUs with AMX or AVX512-BF16 (Sapphire Rapids and later) OpenVINO runs convolutions in bfloat16,
several times faster than fp32 and with a small, measured loss (``benchmarks/bench_engines.py``). OpenVINO
picks bf16 by itself on such CPUs; here the precision is always set explicitly, so an fp32 engine really
runs fp32 and a bf16 engine on a CPU without bf16 is refused instead of silently running something else.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from dermbatch.backends.base import TaskBackend, fold_selection
from dermbatch.backends.store import require_engine
from dermbatch.bundle import Bundle
from dermbatch.errors import BackendError

log = logging.getLogger(__name__)
HINTS = {"fp32": "f32", "bf16": "bf16"}  # our precision names -> OpenVINO's INFERENCE_PRECISION_HINT


def require_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendError("the OpenVINO engine needs the openvino package (pip install openvino; it comes "
                           "with dermbatch on x86-64 and ARM64), or use --backend onnxruntime") from None
    return openvino


def check_precision(capabilities: list[str], precision: str) -> None:
    """Refuse a precision this CPU cannot run natively (OpenVINO would otherwise fall back without a word);
    ``capabilities`` is the CPU plugin's OPTIMIZATION_CAPABILITIES."""
    if precision not in HINTS:
        raise BackendError(f"OpenVINO precision {precision!r}: choose {', '.join(HINTS)}")
    if precision == "bf16" and "BF16" not in capabilities:
        raise BackendError(f"bf16 needs a CPU with AMX or AVX512-BF16; this one offers {', '.join(capabilities)}. "
                           "Build the fp32 OpenVINO engine instead (--precision fp32)")


def cpu_has_bf16() -> bool:
    return "BF16" in require_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_model(core, path: Path, precision: str, threads: int | None = None):
    """One synchronous request at a time with every thread on it (the pipeline overlaps I/O itself)."""
    check_precision(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"), precision)
    config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": int(threads or os.cpu_count() or 1)}
    return core.compile_model(str(path), "CPU", config)


class OpenVinoBackend(TaskBackend):
    name = "openvino"

    def __init__(self, bundle: Bundle, device: str = "auto", folds: dict[str, tuple[int, ...]] | None = None,
                 precision: str | None = None, threads: int | None = None):
        if device.startswith("cuda"):
            raise BackendError(f"--backend openvino runs on the CPU, not --device {device}; "
                               "use --backend tensorrt or torch on a GPU")
        ov = require_openvino()
        self.folder, self.info = require_engine(bundle, "openvino", precision)
        self.precision = self.info["precision"]
        self.device = "cpu"
        core = ov.Core()
        self.requests, self.select = {}, {}
        for task, wanted in (folds or {}).items():
            task_info = self.info["tasks"][task]
            self.select[task] = fold_selection(tuple(task_info["folds"]), wanted, f"{self.folder} ({task})")
            compiled = compile_model(core, self.folder / task_info["file"], self.precision, threads)
            self.requests[task] = compiled.create_infer_request()
        log.info("openvino %s engine %s on the CPU", self.precision, self.folder)

    def _run(self, task: str, x: np.ndarray) -> np.ndarray:
        # infer() copies its outputs (share_outputs=False), so the next call cannot overwrite this result
        out = self.requests[task].infer({0: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return out if self.select[task] is None else out[self.select[task]]

    def describe(self) -> dict:
        import openvino

        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "engine": str(self.folder), "openvino": openvino.__version__}

    def close(self) -> None:
        self.requests.clear()
