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


def providers_for(device: str) -> list:
    """The execution providers for ``device``: ``cuda:N`` passes ``device_id`` N to the CUDA provider.

    ``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the same module and cannot be installed together:
    for the CUDA provider, ``pip uninstall onnxruntime`` first, then ``pip install onnxruntime-gpu``."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wants_cuda = device.startswith("cuda")
    if wants_cuda and "CUDAExecutionProvider" not in available:
        raise BackendError(f"--device {device} with onnxruntime needs the onnxruntime-gpu package (in place of "
                           f"onnxruntime) and a GPU (providers here: {', '.join(available)}); use --device cpu or "
                           "--backend torch")
    if device.startswith("cuda:"):
        if not device[5:].isdigit():
            raise BackendError(f"--device {device!r}: use cuda:N with a GPU number")
        return [("CUDAExecutionProvider", {"device_id": int(device[5:])}), "CPUExecutionProvider"]
    if wants_cuda or (device == "auto" and "CUDAExecutionProvider" in available):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_device(requested: str, providers: list, used: list[str]) -> str:
    """What the session really runs on, from ``session.get_providers()``; an explicit CUDA request that ONNX
    Runtime could not honour (it falls back to the CPU without a word) is an error."""
    if used and used[0] == "CUDAExecutionProvider":
        first = providers[0]
        return f"cuda:{first[1]['device_id']}" if isinstance(first, tuple) else "cuda"
    if requested.startswith("cuda"):
        raise BackendError(f"--device {requested}: ONNX Runtime could not start its CUDA provider (it would run on "
                           f"{', '.join(used) or 'nothing'}); check the CUDA and cuDNN libraries onnxruntime-gpu needs")
    return "cpu"


class OrtBackend(TaskBackend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "auto", folds: dict[str, tuple[int, ...]] | None = None,
                 precision: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.folder, self.info = require_engine(bundle, "onnxruntime", precision)
        self.precision = self.info["precision"]
        requested = providers_for(device)
        self.sessions, self.select = {}, {}
        for task, wanted in (folds or {}).items():
            task_info = self.info["tasks"][task]
            self.select[task] = fold_selection(tuple(task_info["folds"]), wanted, f"{self.folder} ({task})")
            self.sessions[task] = ort.InferenceSession(str(self.folder / task_info["file"]),
                                                       sess_options=session_options(threads),
                                                       providers=requested)
        used = next(iter(self.sessions.values())).get_providers() if self.sessions else ["CPUExecutionProvider"]
        self.device = session_device(device, requested, used)
        self.providers = used
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
