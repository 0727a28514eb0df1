"""ONNX Runtime backend: one session per task running all folds of a stacked-folds graph in one call.

CPU execution provider with intra-op threads = CPU cores and full graph optimisation; the CUDA provider when
``onnxruntime-gpu`` is installed and a GPU was asked for (or ``--device auto`` finds one).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from dermbatch.backends.base import TaskBackend, fold_selection
from dermbatch.backends.store import INPUT, OUTPUT, require_engine
from dermbatch.bundle import Bundle
from dermbatch.errors import BackendError

log = logging.getLogger(__name__)


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    return options


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wants_cuda = device.startswith("cuda")
    if wants_cuda and "CUDAExecutionProvider" not in available:
        raise BackendError(f"--device {device} with onnxruntime needs the onnxruntime-gpu package and a GPU "
                           f"(providers here: {', '.join(available)}); use --device cpu or --backend torch")
    if device == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if wants_cuda else ["CPUExecutionProvider"]


class OrtBackend(TaskBackend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "auto", folds: dict[str, tuple[int, ...]] | None = None,
                 precision: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.folder, self.info = require_engine(bundle, "onnxruntime", precision)
        self.precision = self.info["precision"]
        self.providers = providers_for(device)
        self.device = "cuda" if self.providers[0].startswith("CUDA") else "cpu"
        self.sessions, self.select = {}, {}
        for task, wanted in (folds or {}).items():
            task_info = self.info["tasks"][task]
            self.select[task] = fold_selection(tuple(task_info["folds"]), wanted, f"{self.folder} ({task})")
            self.sessions[task] = ort.InferenceSession(str(self.folder / task_info["file"]),
                                                       sess_options=session_options(threads),
                                                       providers=self.providers)
        log.info("onnxruntime %s engine %s on %s", self.precision, self.folder, ", ".join(self.providers))

    def _run(self, task: str, x: np.ndarray) -> np.ndarray:
        out = self.sessions[task].run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return out if self.select[task] is None else out[self.select[task]]

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "engine": str(self.folder), "providers": self.providers, "onnxruntime": ort.__version__}

    def close(self) -> None:
        self.sessions.clear()
